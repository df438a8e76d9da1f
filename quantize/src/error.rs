//! Errors of `tern-quantize`.

/// What can go wrong while transforming or evaluating a model.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    /// Reading or writing a file failed.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The input is not an ONNX model.
    #[error("invalid ONNX model: {0}")]
    InvalidModel(String),
    /// The model is already quantized: quantizing twice loses accuracy for nothing.
    #[error("the model is already quantized ({0} found)")]
    AlreadyQuantized(String),
    /// A command-line argument or option value is malformed.
    #[error("bad argument: {0}")]
    BadArgument(String),
    /// The calibration data cannot be used (none given, wrong inputs, no finite values).
    #[error("bad calibration data: {0}")]
    BadCalibration(String),
    /// Nothing in the model could be transformed.
    #[error("nothing to do: {0}")]
    NothingToDo(String),
    /// Running a model through tern for evaluation failed.
    #[error("evaluation through tern failed: {0}")]
    Tern(#[from] tern::Error),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, QuantizeError>;
