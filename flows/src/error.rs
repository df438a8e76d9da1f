//! The one error type of `tern-flows`: the session's own errors, passed through unchanged,
//! and the ways a flow's configuration or use can be wrong.

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when building or using a flow.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The session failed (loading, input validation, the run itself): tern's own error.
    #[error(transparent)]
    Model(#[from] tern::Error),

    /// The model cannot be micro-batched: an input has no batch axis (its first dimension
    /// is fixed, or it is a scalar), or the inputs' first dimensions are not one symbol.
    #[error("cannot batch input {input:?}: {reason}")]
    NotBatchable {
        /// The input that has no batch axis.
        input: String,
        /// Why.
        reason: String,
    },

    /// A stream's state is not an output → input pair the model can carry: an unknown
    /// name, different element types, a declared shape the output cannot fill, or no
    /// initial value where the input's declared shape is not fixed.
    #[error("stream state {output:?} -> {input:?}: {reason}")]
    BadState {
        /// The output named as the state's source.
        output: String,
        /// The input named as the state's destination.
        input: String,
        /// What is wrong.
        reason: String,
    },

    /// A chunk does not continue the stream: it names an input the stream carries itself,
    /// or its shape does not continue the previous chunk's context.
    #[error("chunk input {input:?}: {reason}")]
    BadChunk {
        /// The input involved.
        input: String,
        /// What is wrong.
        reason: String,
    },

    /// A flow option is out of range (e.g. a batch of 0 requests).
    #[error("invalid flow option: {reason}")]
    InvalidOption {
        /// What is wrong.
        reason: String,
    },

    /// The batcher's queue is full: the caller should back off and retry.
    #[error("the batch queue is full ({capacity} requests waiting)")]
    Overloaded {
        /// The queue's capacity.
        capacity: usize,
    },

    /// The batcher's worker has stopped (it is being dropped), so the request was not run.
    #[error("the batcher has stopped")]
    Closed,

    /// The job queue holds as many jobs as it may (pending, running, or finished and not
    /// collected): collect results or retry later.
    #[error("the job queue is full ({capacity} jobs)")]
    QueueFull {
        /// The queue's capacity.
        capacity: usize,
    },

    /// Another queue (in this process or another) holds the directory.
    #[error("the job queue in {path} is open elsewhere")]
    QueueInUse {
        /// The queue's directory.
        path: std::path::PathBuf,
    },

    /// The job queue's directory could not be read or written (a full disk, permissions).
    #[error("job queue file {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// What kind of failure an [`Error`] is, one value per variant, for code that branches on it
/// (the FFI's typed exceptions, the CLI's `--json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// [`Error::Model`] (see [`Error::model_kind`] for tern's own kind).
    Model,
    /// [`Error::NotBatchable`].
    NotBatchable,
    /// [`Error::BadState`].
    BadState,
    /// [`Error::BadChunk`].
    BadChunk,
    /// [`Error::InvalidOption`].
    InvalidOption,
    /// [`Error::Overloaded`].
    Overloaded,
    /// [`Error::Closed`].
    Closed,
    /// [`Error::QueueFull`].
    QueueFull,
    /// [`Error::QueueInUse`].
    QueueInUse,
    /// [`Error::Io`].
    Io,
}

impl ErrorKind {
    /// The stable machine-readable name, e.g. `"not_batchable"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Model => "model",
            ErrorKind::NotBatchable => "not_batchable",
            ErrorKind::BadState => "bad_state",
            ErrorKind::BadChunk => "bad_chunk",
            ErrorKind::InvalidOption => "invalid_option",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Closed => "closed",
            ErrorKind::QueueFull => "queue_full",
            ErrorKind::QueueInUse => "queue_in_use",
            ErrorKind::Io => "io",
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
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Model(_) => ErrorKind::Model,
            Error::NotBatchable { .. } => ErrorKind::NotBatchable,
            Error::BadState { .. } => ErrorKind::BadState,
            Error::BadChunk { .. } => ErrorKind::BadChunk,
            Error::InvalidOption { .. } => ErrorKind::InvalidOption,
            Error::Overloaded { .. } => ErrorKind::Overloaded,
            Error::Closed => ErrorKind::Closed,
            Error::QueueFull { .. } => ErrorKind::QueueFull,
            Error::QueueInUse { .. } => ErrorKind::QueueInUse,
            Error::Io { .. } => ErrorKind::Io,
        }
    }

    /// tern's own kind when the session failed ([`Error::Model`]).
    pub fn model_kind(&self) -> Option<tern::ErrorKind> {
        match self {
            Error::Model(e) => Some(e.error_kind()),
            _ => None,
        }
    }
}
