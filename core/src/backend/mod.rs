//! The backend seam: where a model graph becomes something that runs on a device.
//!
//! [`Backend`] is what an app asks for. Internally each backend implements [`Executor`],
//! which runs positional, already-validated inputs; everything device-specific lives in
//! the backend's own module ([`tract`] for the CPU), and [`crate::session`] stays
//! device-agnostic.

#[cfg(feature = "gpu")]
pub(crate) mod burn;
pub(crate) mod tract;

#[cfg(feature = "gpu")]
pub use self::burn::{gpu_adapter, SUPPORTED_OPS as GPU_SUPPORTED_OPS};

use crate::model::Model;
use crate::session::SessionOptions;
use crate::tensor::{DType, Tensor};
use crate::Result;

/// Which device a session runs on.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The CPU, through tract's optimized plan.
    Cpu,
    /// The device GPU, through burn on wgpu (cargo feature `gpu`).
    Gpu,
    /// The GPU when this build has it, an adapter works and the model is fully supported;
    /// the CPU otherwise. The session reports the choice and the reason.
    #[default]
    Auto,
}

impl Backend {
    /// Lowercase name: `cpu`, `gpu`, `auto`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Gpu => "gpu",
            Backend::Auto => "auto",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Backend {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Backend> {
        crate::error::parse_choice(
            s,
            "backend",
            &[
                (Backend::Cpu, &["cpu"]),
                (Backend::Gpu, &["gpu"]),
                (Backend::Auto, &["auto"]),
            ],
        )
    }
}

/// Runs a prepared model on one device.
pub(crate) trait Executor: Send + Sync {
    /// Runs with inputs in model input order (already validated); returns outputs in model
    /// output order, and whether a fallback backend produced them.
    fn run(&self, inputs: Vec<Tensor>) -> Result<Ran>;
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
        backend: "gpu",
        reason: "this build of tern has no GPU backend (cargo feature `gpu`)".into(),
    })
}

/// Wraps a GPU executor so that a failure at run time moves the session to the CPU: the
/// failing run is retried there (and reported as a fallback), later runs go straight to it.
fn with_cpu_fallback(gpu: Prepared, model: &Model, options: &SessionOptions) -> Prepared {
    Prepared {
        executor: Box::new(Fallback {
            preferred: gpu.executor,
            model: model.clone(),
            options: SessionOptions {
                backend: Backend::Cpu,
                ..options.clone()
            },
            fallback: std::sync::OnceLock::new(),
        }),
        ..gpu
    }
}

/// A preferred executor with a CPU executor prepared the first time the preferred one fails.
struct Fallback {
    preferred: Box<dyn Executor>,
    model: Model,
    options: SessionOptions,
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
                let prepared = tract::prepare(
                    &self.model,
                    &self.options,
                    format!("fallback after a GPU failure: {error}"),
                )?;
                self.fallback.get_or_init(|| prepared.executor)
            }
        };
        cpu.run(kept).map(|r| Ran {
            fallback: true,
            ..r
        })
    }
}
