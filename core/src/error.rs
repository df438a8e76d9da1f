//! The one error type of the `tern` crate.
//!
//! Every fallible public function returns [`Result<T>`]. Each variant is a
//! distinct failure an app can act on; [`Error::kind`] gives a stable, machine-readable
//! name for it (used by telemetry, the CLI's `--json` output and the FFI layer).

use std::path::PathBuf;

use crate::tensor::DType;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The bytes are not a valid ONNX model (corrupt, truncated, or not ONNX at all).
    #[error("invalid ONNX model: {reason}")]
    InvalidModel {
        /// What is wrong with it.
        reason: String,
    },

    /// The model uses an operator that no backend of this build implements.
    #[error("unsupported operator {op_type} (domain {domain:?}) in node {node:?}")]
    UnsupportedOp {
        /// The ONNX op type, e.g. `"Loop"`.
        op_type: String,
        /// The ONNX domain (`""` for the default `ai.onnx` domain).
        domain: String,
        /// The name of the first node that uses it.
        node: String,
    },

    /// The model is valid ONNX, but the backend could not type-check or optimise it.
    #[error("cannot prepare model for {backend}: {reason}")]
    Compile {
        /// Backend that failed.
        backend: &'static str,
        /// The backend's explanation (full cause chain).
        reason: String,
    },

    /// An input was given that the model does not have.
    #[error("the model has no input named {name:?} (inputs: {expected:?})")]
    UnknownInput {
        /// The name given.
        name: String,
        /// The model's input names.
        expected: Vec<String>,
    },

    /// A model input was not given.
    #[error("missing input {name:?}")]
    MissingInput {
        /// The input that was not given.
        name: String,
    },

    /// The same input was given twice.
    #[error("input {name:?} was given more than once")]
    DuplicateInput {
        /// The repeated name.
        name: String,
    },

    /// An input tensor has the wrong element type.
    #[error("input {name:?} must be {expected}, got {actual}")]
    DTypeMismatch {
        /// The input's name.
        name: String,
        /// The type the model declares.
        expected: DType,
        /// The type that was given.
        actual: DType,
    },

    /// An input tensor has the wrong shape.
    #[error("input {name:?} must have shape {expected}, got {actual:?}")]
    ShapeMismatch {
        /// The input's name.
        name: String,
        /// The declared shape, symbolic dimensions by name (e.g. `[batch, 3, 224, 224]`).
        expected: String,
        /// The shape that was given.
        actual: Vec<usize>,
    },

    /// A tensor contains NaN and the session's [`NanPolicy`](crate::options::NanPolicy) rejects it.
    #[error("{which} {name:?} contains {count} NaN value(s) (NaN policy: {policy:?})")]
    NanValues {
        /// `"input"` or `"output"`.
        which: &'static str,
        /// The tensor's name.
        name: String,
        /// How many elements are NaN.
        count: usize,
        /// The policy that rejected it.
        policy: crate::options::NanPolicy,
    },

    /// A tensor could not be built or read as asked (data length vs shape, wrong element type).
    #[error("tensor error: {reason}")]
    Tensor {
        /// What is wrong.
        reason: String,
    },

    /// The requested backend is not available in this build or on this device.
    #[error("backend {backend} unavailable: {reason}")]
    BackendUnavailable {
        /// The backend asked for.
        backend: &'static str,
        /// Why it cannot be used.
        reason: String,
    },

    /// A session option is invalid (e.g. a pinned shape for an input that does not exist).
    #[error("invalid option: {reason}")]
    InvalidOption {
        /// What is wrong.
        reason: String,
    },

    /// The backend failed while running the model.
    #[error("inference failed on {backend}: {reason}")]
    Inference {
        /// Backend that failed.
        backend: &'static str,
        /// The backend's explanation (full cause chain).
        reason: String,
    },

    /// A bug: the backend panicked. The panic was caught so it cannot reach the app.
    #[error("internal error (caught panic) in {context}: {message}")]
    Panic {
        /// Where the panic was caught.
        context: &'static str,
        /// The panic payload, if it was a string.
        message: String,
    },
}

impl Error {
    /// A stable machine-readable name for the variant, e.g. `"shape_mismatch"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::InvalidModel { .. } => "invalid_model",
            Error::UnsupportedOp { .. } => "unsupported_op",
            Error::Compile { .. } => "compile",
            Error::UnknownInput { .. } => "unknown_input",
            Error::MissingInput { .. } => "missing_input",
            Error::DuplicateInput { .. } => "duplicate_input",
            Error::DTypeMismatch { .. } => "dtype_mismatch",
            Error::ShapeMismatch { .. } => "shape_mismatch",
            Error::NanValues { .. } => "nan",
            Error::Tensor { .. } => "tensor",
            Error::BackendUnavailable { .. } => "backend_unavailable",
            Error::InvalidOption { .. } => "invalid_option",
            Error::Inference { .. } => "inference",
            Error::Panic { .. } => "panic",
        }
    }

    pub(crate) fn tensor(reason: impl Into<String>) -> Self {
        Error::Tensor {
            reason: reason.into(),
        }
    }
}

/// Formats an error and its whole cause chain on one line (tract errors are `anyhow` chains).
pub(crate) fn chain(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

/// Runs `f`, turning a panic into [`Error::Panic`] so that it never reaches the caller.
pub(crate) fn catch_panic<T>(context: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_string());
            Err(Error::Panic { context, message })
        }
    }
}

/// Parses an option's value, case-insensitively, as one of `choices` (each a value and the
/// names it goes by, the first shown in the error), or says which names `what` accepts.
pub(crate) fn parse_choice<T: Copy>(
    value: &str,
    what: &str,
    choices: &[(T, &[&str])],
) -> Result<T> {
    let lower = value.to_ascii_lowercase();
    choices
        .iter()
        .find(|(_, names)| names.contains(&lower.as_str()))
        .map(|(choice, _)| *choice)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(_, names)| names[0]).collect();
            Error::InvalidOption {
                reason: format!("unknown {what} {lower:?} ({})", names.join(", ")),
            }
        })
}
