//! Request-path flows across the FFI: a flow file (`tern_flows::FlowFile`) built into
//! [`TernFlows`], its `callback = …` steps and `rule = …` fallbacks served by the app's
//! [`FlowCallback`] objects (Kotlin, Swift, Python), answers as typed records.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tern_flows::{BreakerState, CacheStats, Source, StepStats};

use crate::{from_tern, on_worker, to_tern, Result, SessionConfig, TensorData, TernError};

/// Implemented by the app: what a `callback = "name"` step (pre/post-processing, a rule,
/// another runtime) computes from its inputs. An exception it throws — of any type — or a
/// panic fails the step with `Flow(Callback)`, which its fallbacks may then answer.
#[uniffi::export(with_foreign)]
pub trait FlowCallback: Send + Sync {
    /// The outputs for `inputs`.
    fn compute(&self, inputs: Vec<TensorData>) -> Result<Vec<TensorData>>;
}

impl From<uniffi::UnexpectedUniFFICallbackError> for TernError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        TernError::Flow {
            kind: tern_flows::ErrorKind::Callback,
            detail: format!("the app's callback threw: {}", e.reason),
        }
    }
}

/// A foreign callback as a step's computation.
struct Foreign {
    name: String,
    callback: Arc<dyn FlowCallback>,
}

impl tern_flows::Compute for Foreign {
    fn compute(&self, inputs: &tern_flows::Inputs) -> tern_flows::Result<tern::Outputs> {
        let failed = |detail: String| tern_flows::Error::Callback {
            step: self.name.clone(),
            reason: detail,
            panicked: false,
        };
        let inputs = inputs
            .iter()
            .map(|(n, t)| TensorData::from_tern(n, t))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| failed(e.to_string()))?;
        let outputs = self
            .callback
            .compute(inputs)
            .map_err(|e| failed(e.to_string()))?;
        let outputs = to_tern(&outputs).map_err(|e| failed(e.to_string()))?;
        Ok(tern::Outputs::from_pairs(outputs))
    }
}

#[uniffi::remote(Enum)]
pub enum Source {
    Model,
    Cache,
    LastGood,
    Rule,
    Default,
}

#[uniffi::remote(Enum)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// Why a step did not answer itself.
#[derive(Debug, Clone, uniffi::Enum)]
pub enum StepFailure {
    /// It failed (a callback's exception or panic included).
    Error {
        /// The flow error's kind (`Model` for the session's own failure).
        kind: tern_flows::ErrorKind,
        /// The session's error kind, for `Model`.
        model_kind: Option<tern::ErrorKind>,
        /// Description.
        message: String,
    },
    /// It did not answer within its budget or the flow's deadline.
    Timeout {
        /// How long the caller waited, in milliseconds.
        budget_ms: f64,
    },
    /// Its circuit breaker is open.
    BreakerOpen,
    /// Too many of its timed-out runs are still running.
    Busy,
}

impl From<&tern_flows::Failure> for StepFailure {
    fn from(f: &tern_flows::Failure) -> Self {
        match f {
            tern_flows::Failure::Error {
                kind,
                model_kind,
                message,
            } => StepFailure::Error {
                kind: *kind,
                model_kind: *model_kind,
                message: message.clone(),
            },
            tern_flows::Failure::Timeout { budget } => StepFailure::Timeout {
                budget_ms: budget.as_secs_f64() * 1e3,
            },
            tern_flows::Failure::BreakerOpen => StepFailure::BreakerOpen,
            tern_flows::Failure::Busy => StepFailure::Busy,
        }
    }
}

/// A step whose answer is in a flow's result, and who answered for it.
#[derive(Debug, Clone, uniffi::Record)]
pub struct StepAnswer {
    /// The step.
    pub step: String,
    /// The model, the cache, or a fallback.
    pub source: Source,
}

/// A fan-out step that did not contribute.
#[derive(Debug, Clone, uniffi::Record)]
pub struct MissingStep {
    /// The step.
    pub step: String,
    /// Why.
    pub failure: StepFailure,
}

/// A flow's answer.
#[derive(Debug, Clone, uniffi::Record)]
pub struct FlowResult {
    /// The outputs.
    pub outputs: Vec<TensorData>,
    /// The steps the outputs come from, with who answered for each.
    pub answered: Vec<StepAnswer>,
    /// A fan-out's steps that did not contribute (the result is partial when any did not).
    pub missing: Vec<MissingStep>,
    /// A cascade's answering stage.
    pub stage: Option<u32>,
    /// A cascade's confidence per stage that ran and has an exit.
    pub confidences: Vec<f32>,
    /// Why the answer did not come from where it should have.
    pub failure: Option<StepFailure>,
    /// How long the request took, in milliseconds.
    pub elapsed_ms: f64,
}

#[uniffi::remote(Record)]
pub struct StepStats {
    ok: u64,
    cache_hits: u64,
    fallbacks: u64,
    errors: u64,
    timeouts: u64,
    refused: u64,
    busy: u64,
}

#[uniffi::remote(Record)]
pub struct CacheStats {
    hits: u64,
    misses: u64,
    entries: u64,
    bytes: u64,
}

/// The flows of a flow file (cascades, fan-outs and pipelines of models and app callbacks,
/// with budgets, caches, breakers and fallbacks; docs/FLOWS.md), checked as a whole when
/// loaded. Share it across threads.
#[derive(uniffi::Object)]
pub struct TernFlows {
    inner: Arc<tern_flows::Flows>,
}

fn build_options(
    base_dir: &Path,
    config: &SessionConfig,
    callbacks: HashMap<String, Arc<dyn FlowCallback>>,
) -> tern_flows::BuildOptions {
    let mut options = tern_flows::BuildOptions::default()
        .base_dir(base_dir)
        .session(config.options());
    for (name, callback) in callbacks {
        let compute = Arc::new(Foreign {
            name: name.clone(),
            callback,
        });
        options = options.callback(name, compute);
    }
    options
}

#[uniffi::export]
impl TernFlows {
    /// Loads the flow file at `path` (TOML, or JSON for `.json`); models' paths are
    /// relative to it; `callbacks` serve its callback steps and rules by name.
    #[uniffi::constructor]
    pub fn load(
        path: String,
        config: SessionConfig,
        callbacks: HashMap<String, Arc<dyn FlowCallback>>,
    ) -> Result<Arc<Self>> {
        let flows = tern_flows::FlowFile::load(
            Path::new(&path),
            build_options(Path::new("."), &config, callbacks),
        )?;
        Ok(Arc::new(TernFlows {
            inner: Arc::new(flows),
        }))
    }

    /// Builds flows from TOML text, with models' paths relative to `base_dir`.
    #[uniffi::constructor]
    pub fn from_toml(
        toml: String,
        base_dir: String,
        config: SessionConfig,
        callbacks: HashMap<String, Arc<dyn FlowCallback>>,
    ) -> Result<Arc<Self>> {
        let flows = tern_flows::FlowFile::from_toml(&toml)?.build(build_options(
            Path::new(&base_dir),
            &config,
            callbacks,
        ))?;
        Ok(Arc::new(TernFlows {
            inner: Arc::new(flows),
        }))
    }

    /// The flows' names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.inner.names()
    }

    /// Runs flow `flow` once; blocks (use `run_async` off the UI thread).
    pub fn run(&self, flow: String, inputs: Vec<TensorData>) -> Result<FlowResult> {
        run_flow(&self.inner, &flow, &inputs)
    }

    /// Like `run`, waiting on a tern thread: a `suspend fun` in Kotlin, `async` in Swift.
    pub async fn run_async(&self, flow: String, inputs: Vec<TensorData>) -> Result<FlowResult> {
        let flows = self.inner.clone();
        on_worker(move || run_flow(&flows, &flow, &inputs)).await
    }

    /// Every step's counters, by name.
    pub fn step_stats(&self) -> HashMap<String, StepStats> {
        self.inner.step_stats().into_iter().collect()
    }

    /// Every step's breaker state, by name (`Closed` for a step without one).
    pub fn breaker_states(&self) -> HashMap<String, BreakerState> {
        self.inner.breaker_states().into_iter().collect()
    }

    /// Every cache's hits, misses and size, by name.
    pub fn cache_stats(&self) -> HashMap<String, CacheStats> {
        self.inner.cache_stats().into_iter().collect()
    }
}

fn run_flow(flows: &tern_flows::Flows, flow: &str, inputs: &[TensorData]) -> Result<FlowResult> {
    let a = flows.run(flow, &to_tern(inputs)?)?;
    Ok(FlowResult {
        outputs: from_tern(&a.outputs)?,
        answered: a
            .answered
            .iter()
            .map(|(step, source)| StepAnswer {
                step: step.clone(),
                source: *source,
            })
            .collect(),
        missing: a
            .missing
            .iter()
            .map(|m| MissingStep {
                step: m.step.clone(),
                failure: (&m.failure).into(),
            })
            .collect(),
        stage: a.stage.map(|s| s as u32),
        confidences: a.confidences,
        failure: a.failure.as_ref().map(StepFailure::from),
        elapsed_ms: a.elapsed.as_secs_f64() * 1e3,
    })
}
