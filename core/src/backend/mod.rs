//! The backend seam: where a model graph becomes something that runs on a device.
//!
//! [`Backend`] is what an app asks for. Internally each backend implements [`Executor`],
//! which runs positional, already-validated inputs; everything device-specific lives in
//! the backend's own module ([`tract`] for the CPU), and [`crate::session`] stays
//! device-agnostic.

pub(crate) mod tract;

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
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Backend::Cpu),
            "gpu" => Ok(Backend::Gpu),
            "auto" => Ok(Backend::Auto),
            other => Err(crate::Error::InvalidOption {
                reason: format!("unknown backend {other:?} (cpu, gpu, auto)"),
            }),
        }
    }
}

/// Runs a prepared model on one device.
pub(crate) trait Executor: Send + Sync {
    /// Runs with inputs in model input order (already validated); returns outputs in model
    /// output order.
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>>;
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
        Backend::Gpu => Err(crate::Error::BackendUnavailable {
            backend: "gpu",
            reason: "this build of tern has no GPU backend (cargo feature `gpu`)".into(),
        }),
        Backend::Auto => tract::prepare(
            model,
            options,
            "auto: this build has no GPU backend (cargo feature `gpu`)".into(),
        ),
    }
}
