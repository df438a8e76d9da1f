//! The one error type of the `tern` crate.
//!
//! Every fallible public function returns [`Result<T>`]. Each variant is a
//! distinct failure an app can act on; [`Error::kind`] gives a stable, machine-readable
//! name for it (used by telemetry, the CLI's `--json` output and the FFI layer).

use std::path::PathBuf;

pub use crate::kinds::NanPolicy;
use crate::kinds::{Backend, Resource, TensorRole};
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
        backend: Backend,
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

    /// Each input fits the model's declared shapes, but together they break a relation an
    /// operator needs (the inner dimensions of a matrix product): caught before any kernel
    /// runs.
    #[error("inputs disagree at node {node:?}: {reason}")]
    ShapeConflict {
        /// The node whose operator needs the relation.
        node: String,
        /// Which dimensions disagree, and their sizes.
        reason: String,
    },

    /// A value given to an operator is outside what it accepts: an index past the end of
    /// the axis it indexes, an integer division by zero. Caught before the operator runs.
    #[error("invalid value at node {node:?}: {reason}")]
    InvalidValue {
        /// The node that was given the value.
        node: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A tensor contains NaN and the session's [`NanPolicy`](NanPolicy) rejects it.
    #[error("{which} {name:?} contains {count} NaN value(s) (NaN policy: {policy:?})")]
    NanValues {
        /// Whether it is an input or an output.
        which: TensorRole,
        /// The tensor's name.
        name: String,
        /// How many elements are NaN.
        count: usize,
        /// The policy that rejected it.
        policy: NanPolicy,
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
        backend: Backend,
        /// Why it cannot be used.
        reason: String,
    },

    /// The model, for these inputs, needs more than the session's limits allow (memory a
    /// run would hold at once, nodes in the graph): refused before the work starts.
    #[error("{resource} limit exceeded: needs {needed}, the limit is {limit}; {context}")]
    ResourceLimit {
        /// Which limit.
        resource: Resource,
        /// How much the model needs (at least).
        needed: u64,
        /// The limit in force.
        limit: u64,
        /// Where the need comes from (e.g. the node computing the largest value).
        context: String,
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
        backend: Backend,
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

/// What kind of failure an [`Error`] is: one value per variant, for code that branches on
/// it (telemetry outcomes, the CLI's `--json`, the FFI's typed exceptions). Serialized as
/// its [`ErrorKind::as_str`] name.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// [`Error::Io`].
    Io,
    /// [`Error::InvalidModel`].
    InvalidModel,
    /// [`Error::UnsupportedOp`].
    UnsupportedOp,
    /// [`Error::Compile`].
    Compile,
    /// [`Error::UnknownInput`].
    UnknownInput,
    /// [`Error::MissingInput`].
    MissingInput,
    /// [`Error::DuplicateInput`].
    DuplicateInput,
    /// [`Error::DTypeMismatch`].
    DtypeMismatch,
    /// [`Error::ShapeMismatch`].
    ShapeMismatch,
    /// [`Error::ShapeConflict`].
    ShapeConflict,
    /// [`Error::InvalidValue`].
    InvalidValue,
    /// [`Error::NanValues`].
    Nan,
    /// [`Error::Tensor`].
    Tensor,
    /// [`Error::BackendUnavailable`].
    BackendUnavailable,
    /// [`Error::ResourceLimit`].
    ResourceLimit,
    /// [`Error::InvalidOption`].
    InvalidOption,
    /// [`Error::Inference`].
    Inference,
    /// [`Error::Panic`].
    Panic,
}

impl ErrorKind {
    /// The stable machine-readable name, e.g. `"shape_mismatch"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::InvalidModel => "invalid_model",
            ErrorKind::UnsupportedOp => "unsupported_op",
            ErrorKind::Compile => "compile",
            ErrorKind::UnknownInput => "unknown_input",
            ErrorKind::MissingInput => "missing_input",
            ErrorKind::DuplicateInput => "duplicate_input",
            ErrorKind::DtypeMismatch => "dtype_mismatch",
            ErrorKind::ShapeMismatch => "shape_mismatch",
            ErrorKind::ShapeConflict => "shape_conflict",
            ErrorKind::InvalidValue => "invalid_value",
            ErrorKind::Nan => "nan",
            ErrorKind::Tensor => "tensor",
            ErrorKind::BackendUnavailable => "backend_unavailable",
            ErrorKind::ResourceLimit => "resource_limit",
            ErrorKind::InvalidOption => "invalid_option",
            ErrorKind::Inference => "inference",
            ErrorKind::Panic => "panic",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Error {
    /// What kind of failure this is.
    pub fn error_kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::InvalidModel { .. } => ErrorKind::InvalidModel,
            Error::UnsupportedOp { .. } => ErrorKind::UnsupportedOp,
            Error::Compile { .. } => ErrorKind::Compile,
            Error::UnknownInput { .. } => ErrorKind::UnknownInput,
            Error::MissingInput { .. } => ErrorKind::MissingInput,
            Error::DuplicateInput { .. } => ErrorKind::DuplicateInput,
            Error::DTypeMismatch { .. } => ErrorKind::DtypeMismatch,
            Error::ShapeMismatch { .. } => ErrorKind::ShapeMismatch,
            Error::ShapeConflict { .. } => ErrorKind::ShapeConflict,
            Error::InvalidValue { .. } => ErrorKind::InvalidValue,
            Error::NanValues { .. } => ErrorKind::Nan,
            Error::Tensor { .. } => ErrorKind::Tensor,
            Error::BackendUnavailable { .. } => ErrorKind::BackendUnavailable,
            Error::ResourceLimit { .. } => ErrorKind::ResourceLimit,
            Error::InvalidOption { .. } => ErrorKind::InvalidOption,
            Error::Inference { .. } => ErrorKind::Inference,
            Error::Panic { .. } => ErrorKind::Panic,
        }
    }

    /// A stable machine-readable name for the variant, e.g. `"shape_mismatch"`
    /// ([`Error::error_kind`] as a string).
    pub fn kind(&self) -> &'static str {
        self.error_kind().as_str()
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

thread_local! {
    /// How many [`catch_panic`] scopes are open on this thread.
    static CATCHING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Installs, once per process, a panic hook that stays quiet for panics [`catch_panic`]
/// turns into [`Error::Panic`] (the error carries the message; printing it to the app's
/// stderr with a backtrace note would be noise) and hands every other panic to the hook
/// that was there before. `TERN_BACKTRACE=1` prints caught panics too, with the previous
/// hook (and `RUST_BACKTRACE` for a backtrace).
fn quiet_caught_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        let verbose = std::env::var_os("TERN_BACKTRACE").is_some_and(|v| v != "0");
        std::panic::set_hook(Box::new(move |info| {
            if verbose || CATCHING.with(|c| c.get()) == 0 {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic into [`Error::Panic`] so that it never reaches the caller.
pub(crate) fn catch_panic<T>(context: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    quiet_caught_panics();
    CATCHING.with(|c| c.set(c.get() + 1));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get().saturating_sub(1)));
    match caught {
        Ok(r) => r,
        Err(payload) => Err(Error::Panic {
            context,
            message: panic_message(&*payload),
        }),
    }
}

/// A caught panic's message (its `&str` or `String` payload), for code that catches the
/// panics of callbacks it runs.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_string())
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
