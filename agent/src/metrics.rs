//! `/metrics`: the agent's counters in the Prometheus (OpenMetrics) text format — requests
//! by model, version and outcome, latency histograms, runs in flight and waiting, model
//! loads, and the telemetry buffer's backlog.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// How a request ended, as counted.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// Answered.
    ok,
    /// Refused as malformed or not matching the model (4xx).
    bad_request,
    /// No such model or version.
    not_found,
    /// Refused because the agent was full (503).
    overloaded,
    /// The model failed to run (5xx).
    failed,
}

/// How a model load ended, as counted.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum LoadOutcome {
    /// Loaded and now served.
    loaded,
    /// Refused (corrupt, unsigned, failed its golden check); the previous version, if
    /// any, keeps serving.
    refused,
    /// Its file went away and it is no longer served.
    removed,
}

/// How a scheduled update of one model ended, as counted.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum UpdateResult {
    /// A newer version was installed and made active.
    installed,
    /// The repository had nothing newer.
    up_to_date,
    /// The check failed (network, metadata, verification, golden check).
    failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpdateLabels {
    model: String,
    outcome: UpdateResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: String,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    version: String,
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    model: String,
    version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoadLabels {
    model: String,
    outcome: LoadOutcome,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms … 8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    loads: Family<LoadLabels, Counter>,
    updates: Family<UpdateLabels, Counter>,
    in_flight: Gauge,
    queued: Gauge,
    models: Gauge,
    telemetry_backlog: Gauge<u64, AtomicU64>,
    telemetry_dropped: Gauge<u64, AtomicU64>,
    telemetry_upload_failures: Gauge<u64, AtomicU64>,
    breaker_open: Family<StepLabels, Gauge>,
    cache_lookups: Family<CacheLabels, Gauge<u64, AtomicU64>>,
    flows: std::sync::OnceLock<std::sync::Arc<tern_flows::Flows>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric, at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tern_agent");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let loads = Family::<LoadLabels, Counter>::default();
        let updates = Family::<UpdateLabels, Counter>::default();
        let in_flight = Gauge::default();
        let queued = Gauge::default();
        let models = Gauge::default();
        let telemetry_backlog = Gauge::<u64, AtomicU64>::default();
        let telemetry_dropped = Gauge::<u64, AtomicU64>::default();
        let telemetry_upload_failures = Gauge::<u64, AtomicU64>::default();
        let breaker_open = Family::<StepLabels, Gauge>::default();
        let cache_lookups = Family::<CacheLabels, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "requests",
            "Infer requests by model, version and outcome",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Infer request latency, from admission to the response, by model and version",
            latency.clone(),
        );
        registry.register("model_loads", "Model loads by outcome", loads.clone());
        registry.register(
            "model_updates",
            "Scheduled update checks by model and outcome",
            updates.clone(),
        );
        registry.register("in_flight", "Inferences running", in_flight.clone());
        registry.register(
            "queue_depth",
            "Admitted requests waiting for a run",
            queued.clone(),
        );
        registry.register("models", "Models being served", models.clone());
        registry.register(
            "telemetry_backlog_bytes",
            "Telemetry buffered on the device and not yet uploaded",
            telemetry_backlog.clone(),
        );
        registry.register(
            "telemetry_dropped_records",
            "Telemetry records dropped since start (buffer full, too old, refused by the collector)",
            telemetry_dropped.clone(),
        );
        registry.register(
            "telemetry_upload_failures",
            "Consecutive failed telemetry uploads",
            telemetry_upload_failures.clone(),
        );
        registry.register(
            "flow_breaker_open",
            "Flow steps whose circuit breaker is open or half open (1), else 0",
            breaker_open.clone(),
        );
        registry.register(
            "flow_cache_lookups",
            "Flow result cache lookups since start, by cache and result (hit, miss)",
            cache_lookups.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            loads,
            updates,
            in_flight,
            queued,
            models,
            telemetry_backlog,
            telemetry_dropped,
            telemetry_upload_failures,
            breaker_open,
            cache_lookups,
            flows: std::sync::OnceLock::new(),
        }
    }

    /// Reports the breakers and caches of `flows` in every exposition.
    pub fn watch_flows(&self, flows: std::sync::Arc<tern_flows::Flows>) {
        let _ = self.flows.set(flows);
    }

    /// Counts a request (`version` empty when no model answered) and, when it was
    /// answered, its latency.
    pub fn request(&self, model: &str, version: &str, outcome: Outcome, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                model: model.to_string(),
                version: version.to_string(),
                outcome,
            })
            .inc();
        if outcome == Outcome::ok {
            self.latency
                .get_or_create(&LatencyLabels {
                    model: model.to_string(),
                    version: version.to_string(),
                })
                .observe(took.as_secs_f64());
        }
    }

    /// Counts a model load.
    pub fn load(&self, model: &str, outcome: LoadOutcome) {
        self.loads
            .get_or_create(&LoadLabels {
                model: model.to_string(),
                outcome,
            })
            .inc();
    }

    /// Counts a scheduled update check.
    pub fn update(&self, model: &str, outcome: UpdateResult) {
        self.updates
            .get_or_create(&UpdateLabels {
                model: model.to_string(),
                outcome,
            })
            .inc();
    }

    /// The gauge of inferences running.
    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// The gauge of admitted requests waiting.
    pub fn queued(&self) -> &Gauge {
        &self.queued
    }

    /// Sets the number of models served.
    pub fn set_models(&self, n: usize) {
        self.models.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The text exposition, with the telemetry backlog read now.
    pub fn render(&self) -> String {
        if let Some(t) = tern::telemetry::global() {
            let stats = t.stats();
            self.telemetry_backlog.set(stats.bytes_on_disk);
            self.telemetry_dropped.set(stats.dropped);
            self.telemetry_upload_failures
                .set(u64::from(stats.upload_failures));
        }
        if let Some(flows) = self.flows.get() {
            for (step, state) in flows.breaker_states() {
                let open = !matches!(state, tern_flows::BreakerState::Closed);
                self.breaker_open
                    .get_or_create(&StepLabels { step })
                    .set(i64::from(open));
            }
            for (cache, stats) in flows.cache_stats() {
                for (result, n) in [("hit", stats.hits), ("miss", stats.misses)] {
                    self.cache_lookups
                        .get_or_create(&CacheLabels {
                            cache: cache.clone(),
                            result,
                        })
                        .set(n);
                }
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_the_exposition() {
        let m = Metrics::new();
        m.request("magika", "1", Outcome::ok, Duration::from_millis(3));
        m.request("magika", "1", Outcome::ok, Duration::from_millis(5));
        m.request("magika", "", Outcome::not_found, Duration::ZERO);
        m.load("magika", LoadOutcome::refused);
        m.in_flight().inc();
        let text = m.render();
        assert!(text
            .contains(r#"tern_agent_requests_total{model="magika",version="1",outcome="ok"} 2"#));
        assert!(text.contains(
            r#"tern_agent_request_duration_seconds_count{model="magika",version="1"} 2"#
        ));
        assert!(
            text.contains(r#"tern_agent_model_loads_total{model="magika",outcome="refused"} 1"#)
        );
        assert!(text.contains("tern_agent_in_flight 1"));
        assert!(text.ends_with("# EOF\n"));
    }
}
