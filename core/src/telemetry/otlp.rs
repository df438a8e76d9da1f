//! Batches in OpenTelemetry's OTLP/JSON encoding (the protobuf JSON mapping with hex trace
//! ids and decimal-string 64-bit integers), ready for any OTel collector's `/v1/traces`,
//! `/v1/metrics` and `/v1/logs` endpoints.
//!
//! - Spans → one span per inference (`tern.run`), with a child span per stage.
//! - Metrics → per model/version/backend: `tern.inference.duration` as an exponential
//!   histogram (mergeable in the collector) and as a summary with p50/p95/p99, call counts by
//!   outcome, error counts by kind; `tern.telemetry.dropped` by reason; app counters; model
//!   health gauges (NaN rate, mean, top score per tensor).
//! - Logs → app events.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::record::{AttrValue, Record};
use super::sketch::{ExpHistogram, SCALE};
use super::TelemetryConfig;
use crate::kinds::TensorRole;

/// The three OTLP signals a batch can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signal {
    /// Inference spans (`/v1/traces`).
    Traces,
    /// Latency, call, error, drop, counter and health metrics (`/v1/metrics`).
    Metrics,
    /// App events (`/v1/logs`).
    Logs,
}

impl Signal {
    /// `traces`, `metrics` or `logs`.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
        }
    }

    /// The collector path: `/v1/traces`, `/v1/metrics` or `/v1/logs`.
    pub fn path(self) -> &'static str {
        match self {
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
            Signal::Logs => "/v1/logs",
        }
    }

    /// The request body's nesting: the resource list, scope list and item list keys.
    fn keys(self) -> [&'static str; 3] {
        match self {
            Signal::Traces => ["resourceSpans", "scopeSpans", "spans"],
            Signal::Metrics => ["resourceMetrics", "scopeMetrics", "metrics"],
            Signal::Logs => ["resourceLogs", "scopeLogs", "logRecords"],
        }
    }

    /// One request of this signal carrying `items` for `resource`.
    fn payload(self, resource: &Value, items: Vec<Value>) -> Payload {
        let [resources, scopes, list] = self.keys();
        let body = json!({ resources: [{ "resource": resource, scopes: [{ "scope": scope(), list: items }] }] });
        Payload {
            signal: self,
            json: body.to_string(),
        }
    }
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One OTLP request body.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    /// Which signal it carries (and so the collector path, [`Signal::path`]).
    pub signal: Signal,
    /// The JSON body.
    pub json: String,
}

/// A batch handed to the [`Uploader`](super::Uploader): one stored segment as OTLP requests.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadBatch {
    /// Stable id of the batch (the segment number): the same batch retried keeps its id, so
    /// a collector can de-duplicate.
    pub id: u64,
    /// Records in the batch.
    pub records: u64,
    /// One request per signal present.
    pub payloads: Vec<Payload>,
}

fn kv(key: &str, value: Value) -> Value {
    json!({ "key": key, "value": value })
}

fn s(v: &str) -> Value {
    json!({ "stringValue": v })
}

fn attr(v: &AttrValue) -> Value {
    match v {
        AttrValue::Bool(b) => json!({ "boolValue": b }),
        AttrValue::Int(i) => json!({ "intValue": i.to_string() }),
        AttrValue::Float(f) => json!({ "doubleValue": f }),
        AttrValue::Str(x) => s(x),
    }
}

fn resource(config: &TelemetryConfig) -> Value {
    let mut attrs = vec![
        kv("service.name", s(&config.service_name)),
        kv("telemetry.sdk.name", s("tern")),
        kv("telemetry.sdk.version", s(env!("CARGO_PKG_VERSION"))),
        kv("os.type", s(std::env::consts::OS)),
        kv("host.arch", s(std::env::consts::ARCH)),
    ];
    attrs.extend(config.resource.iter().map(|(k, v)| kv(k, s(v))));
    json!({ "attributes": attrs })
}

fn scope() -> Value {
    json!({ "name": "tern", "version": env!("CARGO_PKG_VERSION") })
}

/// Derives an 8-byte span id (16 hex digits) from a trace id and an index.
fn span_id(trace_id: &str, ix: usize) -> String {
    let base = u64::from_str_radix(trace_id.get(..16).unwrap_or("0"), 16).unwrap_or(0);
    format!("{:016x}", base.wrapping_add(ix as u64).max(1))
}

/// (model, version, backend).
type Key = (String, String, &'static str);
/// Counter name and its attributes (as text, for grouping) → total and OTLP attributes.
type Counters = BTreeMap<(String, Vec<(String, String)>), (u64, Vec<Value>)>;
/// (model, version, tensor, io) → (elements, NaNs, sum of means, sum of top scores, samples).
type Health = BTreeMap<TensorKey, (u64, u64, f64, f64, u64)>;
/// (model, version, tensor, io) → summed bin counts and the baseline's shares.
type Drift = BTreeMap<TensorKey, (Vec<Vec<u64>>, Vec<Vec<f64>>)>;
/// (model, version, tensor, io).
type TensorKey = (String, String, String, &'static str);

#[derive(Default)]
struct ModelAgg {
    latency: Option<ExpHistogram>,
    calls: BTreeMap<&'static str, u64>,
    errors: BTreeMap<&'static str, u64>,
}

/// Builds the OTLP requests for one stored segment.
pub fn build(id: u64, records: &[Record], config: &TelemetryConfig) -> UploadBatch {
    let (mut start, mut end) = (u64::MAX, 0u64);
    let mut spans = Vec::new();
    let mut logs = Vec::new();
    let mut per_model: BTreeMap<Key, ModelAgg> = BTreeMap::new();
    // Keyed by name, not by enum, so data points come in the same (alphabetical) order.
    let mut dropped: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut counters: Counters = BTreeMap::new();
    let mut health: Health = BTreeMap::new();
    let mut drift: Drift = BTreeMap::new();

    for r in records {
        match r {
            Record::Span(sp) => {
                let dur = sp.duration_ns();
                start = start.min(sp.start_ns);
                end = end.max(sp.start_ns + dur);
                let root = span_id(&sp.trace_id, 0);
                let mut attrs = vec![
                    kv("tern.model", s(&sp.model)),
                    kv("tern.model.version", s(&sp.version)),
                    kv("tern.backend", s(sp.backend.name())),
                    kv("tern.outcome", s(sp.outcome.label())),
                ];
                attrs.extend(sp.labels.iter().map(|(k, v)| kv(k, s(v))));
                let status = match &sp.outcome {
                    super::Outcome::Error(kind) => {
                        attrs.push(kv("tern.error.kind", s(kind.as_str())));
                        json!({ "code": 2, "message": kind.as_str() })
                    }
                    _ => json!({ "code": 1 }),
                };
                spans.push(json!({
                    "traceId": sp.trace_id, "spanId": root, "name": "tern.run", "kind": 1,
                    "startTimeUnixNano": sp.start_ns.to_string(),
                    "endTimeUnixNano": (sp.start_ns + dur).to_string(),
                    "attributes": attrs, "status": status,
                }));
                let mut t = sp.start_ns;
                for (i, (stage, d)) in sp.stages.iter().enumerate() {
                    spans.push(json!({
                        "traceId": sp.trace_id, "spanId": span_id(&sp.trace_id, i + 1), "parentSpanId": root,
                        "name": format!("tern.{stage}"), "kind": 1,
                        "startTimeUnixNano": t.to_string(), "endTimeUnixNano": (t + d).to_string(),
                    }));
                    t += d;
                }
                let agg = per_model
                    .entry((sp.model.clone(), sp.version.clone(), sp.backend.name()))
                    .or_default();
                agg.latency
                    .get_or_insert_with(ExpHistogram::new)
                    .record(dur as f64 / 1e6);
                *agg.calls.entry(sp.outcome.label()).or_default() += 1;
                if let super::Outcome::Error(kind) = &sp.outcome {
                    *agg.errors.entry(kind.as_str()).or_default() += 1;
                }
            }
            Record::Event(ev) => {
                start = start.min(ev.at_ns);
                end = end.max(ev.at_ns);
                match ev.increment {
                    Some(n) => {
                        let key_attrs = ev.attributes.iter().map(|(k, v)| (k.clone(), format!("{v:?}"))).collect();
                        let entry = counters.entry((ev.name.clone(), key_attrs)).or_insert_with(|| {
                            (0, ev.attributes.iter().map(|(k, v)| kv(k, attr(v))).collect())
                        });
                        entry.0 += n;
                    }
                    None => logs.push(json!({
                        "timeUnixNano": ev.at_ns.to_string(),
                        "observedTimeUnixNano": ev.at_ns.to_string(),
                        "severityNumber": 9, "severityText": "INFO",
                        "body": s(&ev.name),
                        "attributes": ev.attributes.iter().map(|(k, v)| kv(k, attr(v))).collect::<Vec<_>>(),
                    })),
                }
            }
            Record::Health(h) => {
                start = start.min(h.at_ns);
                end = end.max(h.at_ns);
                for t in &h.tensors {
                    let key = (
                        h.model.clone(),
                        h.version.clone(),
                        t.name.clone(),
                        t.io.name(),
                    );
                    if let Some(d) = &t.drift {
                        let e = drift.entry(key.clone()).or_insert_with(|| {
                            (
                                d.counts.iter().map(|r| vec![0; r.len()]).collect(),
                                d.expected.clone(),
                            )
                        });
                        if e.0.len() == d.counts.len() && e.1 == d.expected {
                            for (acc, row) in e.0.iter_mut().zip(&d.counts) {
                                acc.iter_mut().zip(row).for_each(|(a, c)| *a += c);
                            }
                        }
                    }
                    let e = health.entry(key).or_insert((0, 0, 0.0, 0.0, 0));
                    e.0 += t.count;
                    e.1 += t.nan;
                    e.2 += t.mean;
                    e.3 += t.top;
                    e.4 += 1;
                }
            }
            Record::Dropped {
                at_ns,
                count,
                reason,
            } => {
                start = start.min(*at_ns);
                end = end.max(*at_ns);
                *dropped.entry(reason.as_str()).or_default() += count;
            }
        }
    }
    if start == u64::MAX {
        start = super::record::now_ns();
        end = start;
    }
    let (t0, t1) = (start.to_string(), end.max(start).to_string());
    let sum_metric = |name: &str, unit: &str, points: Vec<Value>| {
        json!({ "name": name, "unit": unit, "sum": {
            "aggregationTemporality": 1, "isMonotonic": true, "dataPoints": points } })
    };
    let gauge_metric = |name: &str, unit: &str, points: Vec<Value>| json!({ "name": name, "unit": unit, "gauge": { "dataPoints": points } });
    let point = |attrs: Vec<Value>, value: u64| json!({ "attributes": attrs, "startTimeUnixNano": t0, "timeUnixNano": t1, "asInt": value.to_string() });

    let mut metrics = Vec::new();
    let (mut hist_points, mut summary_points, mut call_points, mut error_points) =
        (vec![], vec![], vec![], vec![]);
    for ((model, version, backend), agg) in &per_model {
        let base = vec![
            kv("tern.model", s(model)),
            kv("tern.model.version", s(version)),
            kv("tern.backend", s(backend)),
        ];
        if let Some(h) = &agg.latency {
            let (offset, counts) = h.dense_buckets();
            hist_points.push(json!({
                "attributes": base, "startTimeUnixNano": t0, "timeUnixNano": t1,
                "count": h.count.to_string(), "sum": h.sum, "scale": SCALE,
                "zeroCount": h.zero_count.to_string(),
                "positive": { "offset": offset, "bucketCounts": counts.iter().map(u64::to_string).collect::<Vec<_>>() },
                "min": h.min, "max": h.max,
            }));
            let quantiles: Vec<Value> = [0.5, 0.95, 0.99]
                .iter()
                .map(|q| json!({ "quantile": q, "value": h.quantile(*q).unwrap_or(0.0) }))
                .collect();
            summary_points.push(json!({
                "attributes": base, "startTimeUnixNano": t0, "timeUnixNano": t1,
                "count": h.count.to_string(), "sum": h.sum, "quantileValues": quantiles,
            }));
        }
        for (outcome, n) in &agg.calls {
            let mut a = base.clone();
            a.push(kv("tern.outcome", s(outcome)));
            call_points.push(point(a, *n));
        }
        for (kind, n) in &agg.errors {
            let mut a = base.clone();
            a.push(kv("tern.error.kind", s(kind)));
            error_points.push(point(a, *n));
        }
    }
    if !hist_points.is_empty() {
        metrics.push(json!({ "name": "tern.inference.duration", "unit": "ms",
            "exponentialHistogram": { "aggregationTemporality": 1, "dataPoints": hist_points } }));
        metrics.push(
            json!({ "name": "tern.inference.duration.quantiles", "unit": "ms",
            "summary": { "dataPoints": summary_points } }),
        );
        metrics.push(sum_metric("tern.inference.calls", "{call}", call_points));
    }
    if !error_points.is_empty() {
        metrics.push(sum_metric("tern.inference.errors", "{error}", error_points));
    }
    if !dropped.is_empty() {
        let points = dropped
            .iter()
            .map(|(r, n)| point(vec![kv("reason", s(r))], *n))
            .collect();
        metrics.push(sum_metric("tern.telemetry.dropped", "{record}", points));
    }
    for ((name, _), (n, attrs)) in counters {
        metrics.push(sum_metric(&name, "1", vec![point(attrs, n)]));
    }
    if !health.is_empty() {
        let (mut nan_rate, mut mean, mut top) = (vec![], vec![], vec![]);
        for ((model, version, tensor, io), (count, nan, mean_sum, top_sum, samples)) in &health {
            let a = vec![
                kv("tern.model", s(model)),
                kv("tern.model.version", s(version)),
                kv("tern.tensor", s(tensor)),
                kv("tern.io", s(io)),
            ];
            let g = |v: f64| json!({ "attributes": a, "timeUnixNano": t1, "asDouble": v });
            nan_rate.push(g(*nan as f64 / (*count).max(1) as f64));
            mean.push(g(mean_sum / *samples as f64));
            if *io == TensorRole::Output.name() {
                top.push(g(top_sum / *samples as f64));
            }
        }
        metrics.push(gauge_metric("tern.health.nan_rate", "1", nan_rate));
        metrics.push(gauge_metric("tern.health.mean", "1", mean));
        if !top.is_empty() {
            metrics.push(gauge_metric("tern.health.top_score", "1", top));
        }
    }
    if !drift.is_empty() {
        let mut points = Vec::new();
        for ((model, version, tensor, io), (counts, expected)) in &drift {
            for (feature, (c, e)) in counts.iter().zip(expected).enumerate() {
                let a = vec![
                    kv("tern.model", s(model)),
                    kv("tern.model.version", s(version)),
                    kv("tern.tensor", s(tensor)),
                    kv("tern.io", s(io)),
                    kv("tern.feature", json!({ "intValue": feature.to_string() })),
                ];
                points.push(json!({ "attributes": a, "timeUnixNano": t1, "asDouble": super::drift::psi(c, e) }));
            }
        }
        metrics.push(gauge_metric("tern.health.drift.psi", "1", points));
    }

    let res = resource(config);
    let payloads = [
        (Signal::Traces, spans),
        (Signal::Metrics, metrics),
        (Signal::Logs, logs),
    ]
    .into_iter()
    .filter(|(_, items)| !items.is_empty())
    .map(|(signal, items)| signal.payload(&res, items))
    .collect();
    UploadBatch {
        id,
        records: records.len() as u64,
        payloads,
    }
}
