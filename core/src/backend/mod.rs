//! The backend seam: where a model graph becomes something that runs on a device.
//!
//! [`Backend`] is what an app asks for. Internally each backend implements [`Executor`],
//! which runs positional, already-validated inputs; everything device-specific lives in
//! the backend's own module ([`tract`] for the CPU), and [`crate::session`] stays
//! device-agnostic.

#[cfg(feature = "gpu")]
pub(crate) mod burn;
pub(crate) mod frontend;
pub(crate) mod optim;
pub(crate) mod plan_cache;
pub(crate) mod race;
pub(crate) mod tract;

#[cfg(feature = "gpu")]
pub use self::burn::{gpu_adapter, supported_onnx_ops as gpu_supported_ops};

use crate::error::Result;
use crate::model::Model;
pub use crate::options::Backend;
use crate::options::SessionOptions;
use crate::tensor::{DType, Tensor};

/// Runs a prepared model on one device.
pub(crate) trait Executor: Send + Sync {
    /// Runs with inputs in model input order (already validated); returns outputs in model
    /// output order, and whether a fallback backend produced them.
    fn run(&self, inputs: Vec<Tensor>) -> Result<Ran>;

    /// What the executor has planned so far.
    fn plans(&self) -> PlanReport;

    /// Runs once with every node timed, on the plan a [`Executor::run`] of these inputs
    /// would use; nodes in the order they ran.
    fn profile(&self, inputs: Vec<Tensor>) -> Result<Vec<NodeTime>> {
        let _ = inputs;
        Err(crate::Error::InvalidOption {
            reason: "per-node profiles come from the CPU backend only".into(),
        })
    }
}

/// One node of a profiled run ([`Session::profile`](crate::Session::profile)).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct NodeTime {
    /// The node's name in the plan (tern's own ops carry the ONNX node's name and a
    /// suffix).
    pub node: String,
    /// The op that ran, as the backend names it (e.g. `TernConvQ8`, `Conv`, `Add`).
    pub op: String,
    /// How long the node ran.
    pub time: std::time::Duration,
}

/// Which plans serve runs whose input shapes are not all fixed (see
/// [`ShapePolicy`](crate::ShapePolicy)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Specialisation {
    /// Every input shape is fixed or pinned: one plan for all runs.
    Fixed,
    /// No run yet: the first one builds a concrete plan and starts measuring.
    Undecided,
    /// The symbolic plan and the first shape's concrete plan are being timed.
    Measuring,
    /// Concrete plans are faster: shapes get one once they recur enough to repay it.
    Concrete,
    /// The symbolic plan serves every run.
    Symbolic,
    /// Every shape gets a concrete plan (the symbolic plan cannot be built, failed a run,
    /// or the policy says so).
    PerShape,
    /// The model plans only with some inputs' values known (a `Reshape`'s shape, `Reduce`
    /// axes, quantization scales: [`ModelInfo::value_inputs`](crate::ModelInfo::value_inputs)):
    /// those values are folded in as constants, a plan per input shapes and values.
    PerValue,
}

/// What a session's backend has planned so far.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct PlanReport {
    /// How plans are chosen now.
    pub specialisation: Specialisation,
    /// Whether one plan for the declared (symbolic or fixed) shapes exists.
    pub shared_plan: bool,
    /// The input shapes that have a plan of their own, least recently used first.
    pub concrete: Vec<Vec<Vec<usize>>>,
    /// tern's own kernels in the most recently built plan: (rewrite, layers it took over
    /// from the backend's generic code), e.g. `("depthwise-q8", 11)`; `("qdq-fusion", n)`
    /// first when the plan runs the model's QDQ convolutions fused to integer ones.
    pub tern_kernels: Vec<(String, usize)>,
}

/// What an [`Executor`] run produced.
pub(crate) struct Ran {
    pub outputs: Vec<Tensor>,
    /// The preferred backend failed (now or in an earlier run) and another one ran.
    pub fallback: bool,
}

/// A backend ready to run, with what it learned about the model's inputs.
pub(crate) struct Prepared {
    pub executor: Box<dyn Executor>,
    /// The backend actually used (never `Auto`).
    pub backend: Backend,
    /// Why that backend was chosen.
    pub reason: String,
    /// Element type of each input, in model input order.
    pub input_dtypes: Vec<DType>,
}

/// Picks and prepares the backend the options ask for.
pub(crate) fn prepare(model: &Model, options: &SessionOptions) -> Result<Prepared> {
    match options.backend {
        Backend::Cpu => tract::prepare(model, options, "requested".into()),
        Backend::Gpu => prepare_gpu(model, options, "requested".into(), false),
        Backend::Auto => match prepare_gpu(model, options, "auto: the GPU runs it".into(), true) {
            Ok(gpu) => Ok(with_cpu_fallback(gpu, model, options)),
            Err(e) => {
                let reason = format!("auto: GPU not used ({}: {e})", e.kind());
                tracing::info!("{reason}");
                tract::prepare(model, options, reason)
            }
        },
    }
}

#[cfg(feature = "gpu")]
fn prepare_gpu(
    model: &Model,
    options: &SessionOptions,
    reason: String,
    auto: bool,
) -> Result<Prepared> {
    burn::prepare(model, options, reason, auto)
}

#[cfg(not(feature = "gpu"))]
fn prepare_gpu(_: &Model, _: &SessionOptions, _: String, _: bool) -> Result<Prepared> {
    Err(crate::Error::BackendUnavailable {
        backend: Backend::Gpu,
        reason: "this build of tern has no GPU backend (cargo feature `gpu`)".into(),
    })
}

/// Prepares a CPU executor for the session, with the reason it stands in.
type CpuFactory = Box<dyn Fn(String) -> Result<Prepared> + Send + Sync>;

/// Wraps a GPU executor so that a failure at run time moves the session to the CPU: the
/// failing run is retried there (and reported as a fallback), later runs go straight to it.
fn with_cpu_fallback(gpu: Prepared, model: &Model, options: &SessionOptions) -> Prepared {
    let (model, options) = (model.clone(), options.clone());
    Prepared {
        executor: Box::new(Fallback {
            preferred: gpu.executor,
            cpu: Box::new(move |reason| tract::prepare(&model, &options, reason)),
            fallback: std::sync::OnceLock::new(),
        }),
        ..gpu
    }
}

/// A preferred executor with a CPU executor prepared the first time the preferred one fails.
struct Fallback {
    preferred: Box<dyn Executor>,
    cpu: CpuFactory,
    fallback: std::sync::OnceLock<Box<dyn Executor>>,
}

impl Executor for Fallback {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Ran> {
        if let Some(cpu) = self.fallback.get() {
            return cpu.run(inputs).map(|r| Ran {
                fallback: true,
                ..r
            });
        }
        let kept = inputs.clone();
        let error = match crate::error::catch_panic("inference", || self.preferred.run(inputs)) {
            Ok(ran) => return Ok(ran),
            Err(e) => e,
        };
        tracing::warn!("GPU run failed, falling back to the CPU for this session: {error}");
        let cpu = match self.fallback.get() {
            Some(cpu) => cpu,
            None => {
                let prepared = (self.cpu)(format!("fallback after a GPU failure: {error}"))?;
                self.fallback.get_or_init(|| prepared.executor)
            }
        };
        cpu.run(kept).map(|r| Ran {
            fallback: true,
            ..r
        })
    }

    fn plans(&self) -> PlanReport {
        match self.fallback.get() {
            Some(cpu) => cpu.plans(),
            None => self.preferred.plans(),
        }
    }

    fn profile(&self, inputs: Vec<Tensor>) -> Result<Vec<NodeTime>> {
        match self.fallback.get() {
            Some(cpu) => cpu.profile(inputs),
            None => self.preferred.profile(inputs),
        }
    }
}
