//! Sessions: a model prepared for one backend, run from any number of threads.
//!
//! [`Session::run`] validates named inputs against the model (names, element types,
//! shapes with symbolic dimensions bound consistently, the NaN policy) before the backend
//! sees them, so a bad input is a typed [`Error`] and never a crash deep in a kernel.

use std::collections::HashMap;
use std::ops::Index;
use std::sync::Arc;

use std::time::Instant;

use crate::backend::{self, Executor};
use crate::baseline::Baseline;
use crate::error::{catch_panic, Error, Result};
use crate::kinds::TensorRole;
use crate::model::{Dim, Model, TensorInfo};
pub use crate::options::{
    Backend, CpuOptions, GpuOptions, GpuPrecision, InputOptions, NanPolicy, OptLevel,
    SessionOptions, ShapePolicy, TelemetryChoice, TelemetryOptions, ThreadPolicy, MAX_THREADS,
};
use crate::telemetry::record::{now_ns, random_trace_id};
use crate::telemetry::{health, Outcome, Record, SpanRecord, Telemetry};
use crate::tensor::{DType, Tensor};

/// Checks the options against the model and resolves `threads == 0`.
fn resolve(options: &SessionOptions, model: &Model) -> Result<SessionOptions> {
    for (name, shape) in &options.inputs.pinned_shapes {
        let info = model
            .inputs()
            .iter()
            .find(|i| &i.name == name)
            .ok_or_else(|| Error::InvalidOption {
                reason: format!("pinned shape for unknown input {name:?}"),
            })?;
        if !info.accepts(shape) {
            return Err(Error::InvalidOption {
                reason: format!(
                    "pinned shape {shape:?} does not fit input {name:?} {}",
                    info.shape_string()
                ),
            });
        }
    }
    let size = model.info().node_count + model.info().node_inputs;
    if size > options.limits.graph_size {
        return Err(Error::ResourceLimit {
            resource: crate::kinds::Resource::GraphSize,
            needed: size as u64,
            limit: options.limits.graph_size as u64,
            context: format!(
                "{} nodes with {} inputs",
                model.info().node_count,
                model.info().node_inputs
            ),
        });
    }
    if let Some((node, bytes)) = model.largest_folded() {
        let limit = options.limits.memory_limit();
        if bytes > limit {
            return Err(Error::ResourceLimit {
                resource: crate::kinds::Resource::MemoryBytes,
                needed: bytes,
                limit,
                context: format!("node {node:?} computes a value this large from constants"),
            });
        }
    }
    if options.cpu.threads > MAX_THREADS {
        return Err(Error::InvalidOption {
            reason: format!("{} threads: at most {MAX_THREADS}", options.cpu.threads),
        });
    }
    let mut resolved = options.clone();
    if resolved.cpu.threads == 0 {
        resolved.cpu.threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    }
    Ok(resolved)
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
    outputs: Vec<TensorInfo>,
    backend: Backend,
    backend_reason: String,
    options: SessionOptions,
    model_name: String,
    model_version: String,
    model_sha256: String,
    telemetry: Option<Telemetry>,
    baseline: Option<Arc<Baseline>>,
}

impl Session {
    /// Prepares `model` for the backend the options ask for.
    pub fn new(model: &Model, options: SessionOptions) -> Result<Session> {
        catch_panic("session creation", || {
            let options = resolve(&options, model)?;
            let prepared = backend::prepare(model, &options)?;
            let inputs = model
                .inputs()
                .iter()
                .zip(&prepared.input_dtypes)
                .map(|(info, dtype)| InputSpec {
                    name: info.name.clone(),
                    dtype: *dtype,
                    shape: backend::frontend::planned_shape(&options, info),
                })
                .collect();
            Ok(Session {
                executor: prepared.executor,
                inputs,
                output_names: model.outputs().iter().map(|o| o.name.clone()).collect(),
                outputs: model.outputs().to_vec(),
                backend: prepared.backend,
                backend_reason: prepared.reason,
                telemetry: match &options.telemetry.buffer {
                    TelemetryChoice::Global => crate::telemetry::global(),
                    TelemetryChoice::To(t) => Some(t.clone()),
                    TelemetryChoice::Off => None,
                },
                baseline: match &options.telemetry.baseline {
                    Some(b) => Some(Arc::new(b.clone())),
                    None => model.baseline().map(|b| Arc::new(b.clone())),
                },
                model_name: options
                    .telemetry
                    .identity
                    .as_ref()
                    .map_or_else(|| model.name().to_string(), |(n, _)| n.clone()),
                model_version: options
                    .telemetry
                    .identity
                    .as_ref()
                    .map_or_else(|| model.info().version.clone(), |(_, v)| v.clone()),
                options,
                model_sha256: model.info().sha256.clone(),
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

    /// Runs once with every node of the plan timed, for finding where a model's time
    /// goes: the inputs are checked as [`Session::run`] checks them and run on the plan it
    /// would use, on the calling thread, outside telemetry. Nodes come in the order they
    /// ran. The CPU backend profiles; others answer [`Error::InvalidOption`].
    pub fn profile<I, S>(&self, inputs: I) -> Result<Vec<crate::backend::NodeTime>>
    where
        I: IntoIterator<Item = (S, Tensor)>,
        S: AsRef<str>,
    {
        let ordered = self.order_inputs(inputs)?;
        catch_panic("inference", || self.executor.profile(ordered))
    }

    /// Validates, runs and checks; also says whether a fallback backend produced the outputs.
    fn run_untraced<I, S>(&self, inputs: I) -> Result<(Outputs, bool)>
    where
        I: IntoIterator<Item = (S, Tensor)>,
        S: AsRef<str>,
    {
        let ordered = self.order_inputs(inputs)?;
        for (spec, tensor) in self.inputs.iter().zip(&ordered) {
            if self.options.inputs.nan_policy != NanPolicy::Allow {
                check_nan(
                    TensorRole::Input,
                    &spec.name,
                    tensor,
                    self.options.inputs.nan_policy,
                )?;
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
            let inputs = self.inputs.iter().map(|s| s.name.as_str()).zip(&inputs);
            let outputs = self.output_names.iter().map(String::as_str).zip(&outputs);
            telemetry.record(Record::Health(health::sample(
                &self.model_name,
                &self.model_version,
                self.baseline.as_deref(),
                inputs
                    .map(|(n, t)| (TensorRole::Input, n, t))
                    .chain(outputs.map(|(n, t)| (TensorRole::Output, n, t))),
            )));
        }
        if self.options.inputs.nan_policy == NanPolicy::Reject {
            for (name, tensor) in self.output_names.iter().zip(&outputs) {
                check_nan(
                    TensorRole::Output,
                    name,
                    tensor,
                    self.options.inputs.nan_policy,
                )?;
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

    /// What the backend has planned so far: which input shapes have a plan of their own,
    /// and how the next new shape will be served.
    pub fn plans(&self) -> crate::backend::PlanReport {
        self.executor.plans()
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

    /// The inputs as the session checks them, in model order: the element type the backend
    /// runs and the shape a run must match (pinned, else declared).
    pub fn inputs(&self) -> Vec<TensorInfo> {
        self.inputs
            .iter()
            .map(|s| TensorInfo {
                name: s.name.clone(),
                dtype: Some(s.dtype),
                shape: s.shape.clone(),
            })
            .collect()
    }

    /// The outputs as the model declares them, in model order.
    pub fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    /// The name of the model this session runs.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// The model's version ([`crate::ModelInfo::version`], often empty).
    pub fn model_version(&self) -> &str {
        &self.model_version
    }

    /// The SHA-256 of the model's bytes ([`crate::ModelInfo::sha256`]): what a result cache
    /// keys on, so that a changed model never answers from an old entry.
    pub fn model_sha256(&self) -> &str {
        &self.model_sha256
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
                self.outcome = Outcome::Error(e.error_kind());
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
            backend: self.session.backend,
            stages: std::mem::take(&mut self.stages),
            outcome: std::mem::replace(&mut self.outcome, Outcome::Ok),
            labels: self.session.options.telemetry.span_labels.clone(),
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

fn check_nan(which: TensorRole, name: &str, tensor: &Tensor, policy: NanPolicy) -> Result<()> {
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
    /// Named tensors as outputs, in the order given (for code that assembles outputs, such
    /// as a batcher splitting one run's outputs between its callers).
    pub fn from_pairs(pairs: Vec<(String, Tensor)>) -> Outputs {
        let (names, tensors): (Vec<String>, Vec<Tensor>) = pairs.into_iter().unzip();
        Outputs {
            names: names.into(),
            tensors,
        }
    }

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
