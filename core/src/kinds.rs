//! The small closed sets every layer names: which device ([`Backend`]), what to do with NaN
//! ([`NanPolicy`]), which side of the model a tensor is on ([`TensorRole`]), which limit a
//! model ran into ([`Resource`]).
//!
//! A leaf: it imports nothing from the crate, so errors, options, telemetry records and the
//! skins can all carry these values instead of strings. Each serializes as its lowercase
//! name, the same text its `Display` writes.

use std::fmt;

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

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to do with NaN values (infinities are always allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NanPolicy {
    /// Let NaN through, in and out, as onnxruntime does.
    Allow,
    /// Reject inputs containing NaN with [`Error::NanValues`](crate::Error::NanValues); let
    /// outputs through.
    RejectInputs,
    /// Reject NaN in inputs and in outputs (the default: a NaN score is never silently used).
    #[default]
    Reject,
}

/// Whether a tensor is one of the model's inputs or one of its outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorRole {
    /// A model input.
    Input,
    /// A model output.
    Output,
}

impl TensorRole {
    /// Lowercase name: `input`, `output`.
    pub fn name(self) -> &'static str {
        match self {
            TensorRole::Input => "input",
            TensorRole::Output => "output",
        }
    }
}

impl fmt::Display for TensorRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A resource a session's limits bound ([`LimitOptions`](crate::options::LimitOptions)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// Bytes of values a run holds at once.
    MemoryBytes,
    /// Nodes plus node inputs in a model's graph.
    GraphSize,
}

impl Resource {
    /// Snake-case name: `memory_bytes`, `graph_size`.
    pub fn name(self) -> &'static str {
        match self {
            Resource::MemoryBytes => "memory_bytes",
            Resource::GraphSize => "graph_size",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
