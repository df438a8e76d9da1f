//! Sessions: a model prepared for one backend, run from any number of threads.
//!
//! [`Session::run`] validates named inputs against the model (names, element types,
//! shapes with symbolic dimensions bound consistently, the NaN policy) before the backend
//! sees them, so a bad input is a typed [`Error`] and never a crash deep in a kernel.

use std::collections::{BTreeMap, HashMap};
use std::ops::Index;
use std::sync::Arc;

use std::time::Instant;

use crate::backend::{self, Backend, Executor};
use crate::error::{catch_panic, parse_choice, Error};
use crate::model::{Dim, Model};
use crate::telemetry::record::{now_ns, random_trace_id};
use crate::telemetry::{
    Baseline, DriftCounts, HealthRecord, Outcome, Record, SpanRecord, Telemetry, TensorStats,
};
use crate::tensor::{DType, Tensor};
use crate::Result;

/// How much graph optimisation to do when the session is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptLevel {
    /// Simplify the graph only (faster to build, slower to run; useful for debugging).
    Declutter,
    /// Full optimisation to the backend's kernels (the default).
    #[default]
    Full,
}

/// What to do with NaN values (infinities are always allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NanPolicy {
    /// Let NaN through, in and out, as onnxruntime does.
    Allow,
    /// Reject inputs containing NaN with [`Error::NanValues`]; let outputs through.
    RejectInputs,
    /// Reject NaN in inputs and in outputs (the default: a NaN score is never silently used).
    #[default]
    Reject,
}

/// The float precision the GPU backend computes in. The CPU backend always computes a
/// model in its own types (f16 models in f32 on CPUs without f16 arithmetic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuPrecision {
    /// f16 on a hardware adapter with shader-f16 (half the memory traffic, about 3 decimal
    /// digits), f32 elsewhere (the default).
    #[default]
    Auto,
    /// Always f32: outputs match the CPU backend to rounding.
    F32,
    /// f16 storage and arithmetic, with reductions, softmax, `exp` and `pow` kept in f32.
    /// An adapter without shader-f16 makes the GPU backend unavailable.
    F16,
}

impl std::str::FromStr for GpuPrecision {
    type Err = Error;
    fn from_str(s: &str) -> Result<GpuPrecision> {
        parse_choice(
            s,
            "GPU precision",
            &[
                (GpuPrecision::Auto, &["auto"]),
                (GpuPrecision::F32, &["f32", "fp32"]),
                (GpuPrecision::F16, &["f16", "fp16"]),
            ],
        )
    }
}

/// The most threads a session may ask for: more is a typo, not a machine (creating them
/// would take minutes and gigabytes before the first run).
pub const MAX_THREADS: usize = 256;

/// How to build a [`Session`].
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// The device to run on.
    pub backend: Backend,
    /// Threads for the CPU backend's kernels (1 = run on the calling thread, 0 = one per
    /// core, at most [`MAX_THREADS`]): the most a run may use; see [`ThreadPolicy`].
    pub threads: usize,
    /// Whether the CPU backend checks that its threads pay off.
    pub thread_policy: ThreadPolicy,
    /// Graph optimisation level.
    pub optimization: OptLevel,
    /// NaN handling.
    pub nan_policy: NanPolicy,
    /// Input shapes pinned to fixed sizes, by input name. Pinning symbolic dimensions lets
    /// the backend specialise its kernels; runs must then use exactly these shapes.
    pub input_shapes: BTreeMap<String, Vec<usize>>,
    /// Where runs are recorded.
    pub telemetry: TelemetryChoice,
    /// Drift baseline for health samples; `None` uses the one the model ships, if any.
    pub baseline: Option<Baseline>,
    /// Let [`Backend::Auto`] pick a software GPU adapter (e.g. Mesa's llvmpipe/lavapipe).
    /// Off by default: on the CPU, tract is faster than a software rasteriser.
    /// [`Backend::Gpu`] always accepts one.
    pub allow_software_gpu: bool,
    /// The GPU backend's float precision.
    pub gpu_precision: GpuPrecision,
}

/// How the CPU backend uses a session's threads when there are more than one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThreadPolicy {
    /// Each plan times its first runs with the thread pool and on the calling thread alone,
    /// and keeps the faster (the pool only if it is clearly faster). Handing small
    /// convolutions to other threads can cost more than it saves: PP-OCR's classifier runs
    /// 1.5× slower on 2 threads than on 1, a transformer 1.2× faster.
    #[default]
    Measure,
    /// Every run may use all the threads.
    Always,
}

impl std::str::FromStr for ThreadPolicy {
    type Err = Error;

    fn from_str(s: &str) -> Result<ThreadPolicy> {
        parse_choice(
            s,
            "thread policy",
            &[
                (ThreadPolicy::Measure, &["measure"]),
                (ThreadPolicy::Always, &["always"]),
            ],
        )
    }
}

/// Which telemetry buffer a session records into.
#[derive(Debug, Clone, Default)]
pub enum TelemetryChoice {
    /// The process-wide buffer set by [`crate::telemetry::init`], if any (the default).
    #[default]
    Global,
    /// This buffer.
    To(Telemetry),
    /// Record nothing.
    Off,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            backend: Backend::Auto,
            threads: 1,
            thread_policy: ThreadPolicy::Measure,
            optimization: OptLevel::Full,
            nan_policy: NanPolicy::default(),
            input_shapes: BTreeMap::new(),
            telemetry: TelemetryChoice::Global,
            baseline: None,
            allow_software_gpu: false,
            gpu_precision: GpuPrecision::Auto,
        }
    }
}

impl SessionOptions {
    /// The defaults: `Auto` backend, 1 thread, full optimisation, reject NaN.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the backend.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Sets the thread count (0 means all available cores).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Sets the thread policy.
    pub fn thread_policy(mut self, policy: ThreadPolicy) -> Self {
        self.thread_policy = policy;
        self
    }

    /// Sets the optimisation level.
    pub fn optimization(mut self, level: OptLevel) -> Self {
        self.optimization = level;
        self
    }

    /// Sets the NaN policy.
    pub fn nan_policy(mut self, policy: NanPolicy) -> Self {
        self.nan_policy = policy;
        self
    }

    /// Pins an input to a fixed shape.
    pub fn pin_input_shape(mut self, input: impl Into<String>, shape: &[usize]) -> Self {
        self.input_shapes.insert(input.into(), shape.to_vec());
        self
    }

    /// Records runs into this telemetry buffer instead of the global one.
    pub fn telemetry(mut self, telemetry: Telemetry) -> Self {
        self.telemetry = TelemetryChoice::To(telemetry);
        self
    }

    /// Measures drift of sampled runs against this baseline (instead of the model's own).
    pub fn baseline(mut self, baseline: Baseline) -> Self {
        self.baseline = Some(baseline);
        self
    }

    /// Lets [`Backend::Auto`] choose a software GPU adapter (for testing the GPU path on
    /// machines without one).
    pub fn allow_software_gpu(mut self, allow: bool) -> Self {
        self.allow_software_gpu = allow;
        self
    }

    /// Sets the GPU backend's float precision.
    pub fn gpu_precision(mut self, precision: GpuPrecision) -> Self {
        self.gpu_precision = precision;
        self
    }

    /// Records nothing for this session.
    pub fn without_telemetry(mut self) -> Self {
        self.telemetry = TelemetryChoice::Off;
        self
    }

    /// Checks the options against the model and resolves `threads == 0`.
    fn resolved(&self, model: &Model) -> Result<SessionOptions> {
        for (name, shape) in &self.input_shapes {
            let info = model
                .inputs()
                .iter()
                .find(|i| &i.name == name)
                .ok_or_else(|| Error::InvalidOption {
                    reason: format!("pinned shape for unknown input {name:?}"),
                })?;
            if let Some(dims) = &info.shape {
                let fits = dims.len() == shape.len()
                    && dims
                        .iter()
                        .zip(shape)
                        .all(|(d, s)| !matches!(d, Dim::Fixed(n) if n != s));
                if !fits {
                    return Err(Error::InvalidOption {
                        reason: format!(
                            "pinned shape {shape:?} does not fit input {name:?} {}",
                            info.shape_string()
                        ),
                    });
                }
            }
        }
        if self.threads > MAX_THREADS {
            return Err(Error::InvalidOption {
                reason: format!("{} threads: at most {MAX_THREADS}", self.threads),
            });
        }
        let mut resolved = self.clone();
        if resolved.threads == 0 {
            resolved.threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        }
        Ok(resolved)
    }
}

/// The declared signature of one input, as the session validates it.
#[derive(Debug, Clone)]
struct InputSpec {
    name: String,
    dtype: DType,
    shape: Option<Vec<Dim>>,
}

/// A model prepared for one backend. `Send + Sync`: share it (e.g. in an `Arc`) and call
/// [`Session::run`] from many threads at once.
pub struct Session {
    executor: Box<dyn Executor>,
    inputs: Vec<InputSpec>,
    output_names: Arc<[String]>,
    backend: Backend,
    backend_reason: String,
    options: SessionOptions,
    model_name: String,
    model_version: String,
    telemetry: Option<Telemetry>,
    baseline: Option<Arc<Baseline>>,
}

impl Session {
    /// Prepares `model` for the backend the options ask for.
    pub fn new(model: &Model, options: SessionOptions) -> Result<Session> {
        catch_panic("session creation", || {
            let options = options.resolved(model)?;
            let prepared = backend::prepare(model, &options)?;
            let inputs = model
                .inputs()
                .iter()
                .zip(&prepared.input_dtypes)
                .map(|(info, dtype)| InputSpec {
                    name: info.name.clone(),
                    dtype: *dtype,
                    shape: match options.input_shapes.get(&info.name) {
                        Some(p) => Some(p.iter().copied().map(Dim::Fixed).collect()),
                        None => info.shape.clone(),
                    },
                })
                .collect();
            Ok(Session {
                executor: prepared.executor,
                inputs,
                output_names: model.outputs().iter().map(|o| o.name.clone()).collect(),
                backend: prepared.backend,
                backend_reason: prepared.reason,
                telemetry: match &options.telemetry {
                    TelemetryChoice::Global => crate::telemetry::global(),
                    TelemetryChoice::To(t) => Some(t.clone()),
                    TelemetryChoice::Off => None,
                },
                baseline: match &options.baseline {
                    Some(b) => Some(Arc::new(b.clone())),
                    None => model.baseline().map(|b| Arc::new(b.clone())),
                },
                options,
                model_name: model.name().to_string(),
                model_version: model.info().version.clone(),
            })
        })
    }

    /// Runs the model. `inputs` are `(name, tensor)` pairs, one per model input.
    ///
    /// The run is recorded in the session's telemetry buffer as a span with one `model`
    /// stage; use [`Session::trace`] to add the app's own stages.
    pub fn run<I, S>(&self, inputs: I) -> Result<Outputs>
    where
        I: IntoIterator<Item = (S, Tensor)>,
        S: AsRef<str>,
    {
        self.trace().run(inputs)
    }

    /// Starts a traced inference: time the app's own stages with [`Trace::stage`] around
    /// [`Trace::run`]; the span is recorded when the trace is dropped.
    pub fn trace(&self) -> Trace<'_> {
        Trace {
            session: self,
            start_ns: now_ns(),
            stages: Vec::new(),
            outcome: Outcome::Ok,
        }
    }

    /// Validates, runs and checks; also says whether a fallback backend produced the outputs.
    fn run_untraced<I, S>(&self, inputs: I) -> Result<(Outputs, bool)>
    where
        I: IntoIterator<Item = (S, Tensor)>,
        S: AsRef<str>,
    {
        let ordered = self.order_inputs(inputs)?;
        for (spec, tensor) in self.inputs.iter().zip(&ordered) {
            if self.options.nan_policy != NanPolicy::Allow {
                check_nan("input", &spec.name, tensor, self.options.nan_policy)?;
            }
        }
        let sampled = self
            .telemetry
            .as_ref()
            .filter(|t| t.sample_health())
            .map(|t| (t, ordered.clone()));
        let ran = catch_panic("inference", || self.executor.run(ordered))?;
        let outputs = ran.outputs;
        if let Some((telemetry, inputs)) = sampled {
            telemetry.record(Record::Health(self.health(&inputs, &outputs)));
        }
        if self.options.nan_policy == NanPolicy::Reject {
            for (name, tensor) in self.output_names.iter().zip(&outputs) {
                check_nan("output", name, tensor, self.options.nan_policy)?;
            }
        }
        Ok((
            Outputs {
                names: self.output_names.clone(),
                tensors: outputs,
            },
            ran.fallback,
        ))
    }

    /// Aggregate statistics of a run's tensors (never the values themselves).
    fn health(&self, inputs: &[Tensor], outputs: &[Tensor]) -> HealthRecord {
        let inputs = self
            .inputs
            .iter()
            .map(|s| s.name.as_str())
            .zip(inputs)
            .map(|(n, t)| ("input", n, t));
        let outputs = self
            .output_names
            .iter()
            .map(String::as_str)
            .zip(outputs)
            .map(|(n, t)| ("output", n, t));
        let tensors = inputs
            .chain(outputs)
            .filter_map(|(io, name, t)| {
                let values = t.to_f32_vec().ok()?;
                let finite: Vec<f64> = values
                    .iter()
                    .filter(|v| v.is_finite())
                    .map(|v| f64::from(*v))
                    .collect();
                let n = finite.len().max(1) as f64;
                // With no finite value at all, the statistics are 0 (count and nan say why).
                let fold =
                    |init: f64, f: fn(f64, f64) -> f64| match finite.iter().copied().reduce(f) {
                        Some(v) => v,
                        None => init,
                    };
                let max = fold(0.0, f64::max);
                let drift = self
                    .baseline
                    .as_ref()
                    .and_then(|b| b.tensors.iter().find(|tb| tb.name == name))
                    .and_then(|tb| {
                        Some(DriftCounts {
                            counts: tb.count(t)?,
                            expected: tb.proportions.clone(),
                        })
                    });
                Some(TensorStats {
                    name: name.to_string(),
                    io: io.to_string(),
                    count: values.len() as u64,
                    nan: values.iter().filter(|v| v.is_nan()).count() as u64,
                    mean: finite.iter().sum::<f64>() / n,
                    min: fold(0.0, f64::min),
                    max,
                    top: max,
                    drift,
                })
            })
            .collect();
        HealthRecord {
            at_ns: now_ns(),
            model: self.model_name.clone(),
            version: self.model_version.clone(),
            tensors,
        }
    }

    /// Puts named inputs in model order and checks names, element types and shapes.
    fn order_inputs<I, S>(&self, inputs: I) -> Result<Vec<Tensor>>
    where
        I: IntoIterator<Item = (S, Tensor)>,
        S: AsRef<str>,
    {
        let mut slots: Vec<Option<Tensor>> = vec![None; self.inputs.len()];
        for (name, tensor) in inputs {
            let name = name.as_ref();
            let ix = self
                .inputs
                .iter()
                .position(|s| s.name == name)
                .ok_or_else(|| Error::UnknownInput {
                    name: name.to_string(),
                    expected: self.inputs.iter().map(|s| s.name.clone()).collect(),
                })?;
            if slots[ix].replace(tensor).is_some() {
                return Err(Error::DuplicateInput {
                    name: name.to_string(),
                });
            }
        }
        let mut bound: HashMap<&str, usize> = HashMap::new();
        self.inputs
            .iter()
            .zip(slots)
            .map(|(spec, slot)| {
                let tensor = slot.ok_or_else(|| Error::MissingInput {
                    name: spec.name.clone(),
                })?;
                if tensor.dtype() != spec.dtype {
                    return Err(Error::DTypeMismatch {
                        name: spec.name.clone(),
                        expected: spec.dtype,
                        actual: tensor.dtype(),
                    });
                }
                if let Some(dims) = &spec.shape {
                    check_shape(spec, dims, tensor.shape(), &mut bound)?;
                }
                Ok(tensor)
            })
            .collect()
    }

    /// The backend the session runs on (never `Auto`).
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Why that backend was chosen (e.g. why `Auto` fell back to the CPU).
    pub fn backend_reason(&self) -> &str {
        &self.backend_reason
    }

    /// The options in force (with `threads == 0` resolved).
    pub fn options(&self) -> &SessionOptions {
        &self.options
    }

    /// Input names, in model order.
    pub fn input_names(&self) -> impl Iterator<Item = &str> {
        self.inputs.iter().map(|s| s.name.as_str())
    }

    /// Output names, in model order.
    pub fn output_names(&self) -> &[String] {
        &self.output_names
    }

    /// The name of the model this session runs.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// The telemetry buffer runs are recorded in, if any.
    pub fn telemetry_buffer(&self) -> Option<&Telemetry> {
        self.telemetry.as_ref()
    }
}

/// One traced inference: the app's stages around the model run, recorded as one span (with
/// a child per stage) when dropped. From [`Session::trace`].
pub struct Trace<'s> {
    session: &'s Session,
    start_ns: u64,
    stages: Vec<(String, u64)>,
    outcome: Outcome,
}

impl Trace<'_> {
    /// Runs `f` and records its duration as the stage `name` (e.g. `preprocess`).
    pub fn stage<R>(&mut self, name: &str, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        self.stages
            .push((name.to_string(), t.elapsed().as_nanos() as u64));
        r
    }

    /// Runs the model as the `model` stage; an error sets the span's outcome.
    pub fn run<I, S>(&mut self, inputs: I) -> Result<Outputs>
    where
        I: IntoIterator<Item = (S, Tensor)>,
        S: AsRef<str>,
    {
        let t = Instant::now();
        let result = self.session.run_untraced(inputs);
        self.stages
            .push(("model".to_string(), t.elapsed().as_nanos() as u64));
        match result {
            Ok((outputs, fallback)) => {
                if fallback {
                    self.outcome = Outcome::Fallback;
                }
                Ok(outputs)
            }
            Err(e) => {
                self.outcome = Outcome::Error(e.kind().to_string());
                Err(e)
            }
        }
    }

    /// Overrides the outcome (e.g. [`Outcome::Timeout`] when the app gave up waiting).
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for Trace<'_> {
    fn drop(&mut self) {
        let Some(telemetry) = &self.session.telemetry else {
            return;
        };
        telemetry.record(Record::Span(SpanRecord {
            trace_id: random_trace_id(),
            start_ns: self.start_ns,
            model: self.session.model_name.clone(),
            version: self.session.model_version.clone(),
            backend: self.session.backend.name().to_string(),
            stages: std::mem::take(&mut self.stages),
            outcome: std::mem::replace(&mut self.outcome, Outcome::Ok),
        }));
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("model", &self.model_name)
            .field("backend", &self.backend)
            .field("options", &self.options)
            .finish()
    }
}

fn check_shape<'a>(
    spec: &'a InputSpec,
    dims: &'a [Dim],
    actual: &[usize],
    bound: &mut HashMap<&'a str, usize>,
) -> Result<()> {
    let mismatch = || Error::ShapeMismatch {
        name: spec.name.clone(),
        expected: format!(
            "[{}]",
            dims.iter()
                .map(Dim::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        actual: actual.to_vec(),
    };
    if dims.len() != actual.len() {
        return Err(mismatch());
    }
    for (dim, &size) in dims.iter().zip(actual) {
        match dim {
            Dim::Fixed(n) if *n != size => return Err(mismatch()),
            Dim::Fixed(_) => {}
            Dim::Symbolic(sym) => {
                if *bound.entry(sym.as_str()).or_insert(size) != size {
                    return Err(mismatch());
                }
            }
        }
    }
    Ok(())
}

fn check_nan(which: &'static str, name: &str, tensor: &Tensor, policy: NanPolicy) -> Result<()> {
    if !tensor.dtype().is_float() {
        return Ok(());
    }
    match tensor.count_nan() {
        0 => Ok(()),
        count => Err(Error::NanValues {
            which,
            name: name.to_string(),
            count,
            policy,
        }),
    }
}

/// The named outputs of one run, in model output order.
#[derive(Debug, Clone)]
pub struct Outputs {
    names: Arc<[String]>,
    tensors: Vec<Tensor>,
}

impl Outputs {
    /// The output called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| &self.tensors[i])
    }

    /// `(name, tensor)` pairs in model order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.names.iter().map(String::as_str).zip(&self.tensors)
    }

    /// Number of outputs.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no outputs.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The tensors in model order, without their names.
    pub fn into_tensors(self) -> Vec<Tensor> {
        self.tensors
    }
}

impl Index<usize> for Outputs {
    type Output = Tensor;
    fn index(&self, ix: usize) -> &Tensor {
        &self.tensors[ix]
    }
}

impl IntoIterator for Outputs {
    type Item = (String, Tensor);
    type IntoIter = std::vec::IntoIter<(String, Tensor)>;
    fn into_iter(self) -> Self::IntoIter {
        let pairs: Vec<_> = self.names.iter().cloned().zip(self.tensors).collect();
        pairs.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn session_is_send_and_sync() {
        assert_send_sync::<Session>();
        assert_send_sync::<crate::Model>();
        assert_send_sync::<Tensor>();
    }
}
