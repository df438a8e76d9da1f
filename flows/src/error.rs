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

    /// A step did not answer within its budget or the flow's deadline (and no fallback
    /// answered).
    #[error("step {step:?} did not answer within {budget:?}")]
    Timeout {
        /// The step.
        step: String,
        /// How long the caller waited.
        budget: std::time::Duration,
    },

    /// A step's circuit breaker is open (and no fallback answered).
    #[error("step {step:?} is not tried: its circuit breaker is open")]
    BreakerOpen {
        /// The step.
        step: String,
    },

    /// Too many of a step's timed-out runs are still running in the background (and no
    /// fallback answered): the device is saturated, back off.
    #[error("step {step:?} is busy: {abandoned} timed-out runs are still running")]
    Busy {
        /// The step.
        step: String,
        /// How many abandoned runs are out.
        abandoned: usize,
    },

    /// An app callback (a step, a rule, a confidence or merge function) failed or panicked.
    #[error("callback in {step:?}: {reason}")]
    Callback {
        /// The step (or flow part) whose callback failed.
        step: String,
        /// The callback's message, or its panic's.
        reason: String,
        /// Whether it panicked (rather than returned an error).
        panicked: bool,
    },

    /// Fewer of a fan-out's steps answered by the deadline than it needs.
    #[error("fan-out {flow:?}: {answered} of the {required} answers needed arrived; missing: {}", missing.join(", "))]
    TooFewAnswers {
        /// The fan-out.
        flow: String,
        /// How many answered.
        answered: usize,
        /// How many it needs.
        required: usize,
        /// The missing steps, each with why (`name (timeout)`).
        missing: Vec<String>,
    },

    /// A flow cannot be built as described: a cycle, an unknown step or session, a step
    /// whose outputs do not fit the next one's inputs, an output a confidence or merge
    /// reads that no step produces.
    #[error("flow {flow:?}: {reason}")]
    BadFlow {
        /// The flow (or the file it was described in).
        flow: String,
        /// What is wrong.
        reason: String,
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
    /// [`Error::Timeout`].
    Timeout,
    /// [`Error::BreakerOpen`].
    BreakerOpen,
    /// [`Error::Busy`].
    Busy,
    /// [`Error::Callback`].
    Callback,
    /// [`Error::BadFlow`].
    BadFlow,
    /// [`Error::TooFewAnswers`].
    TooFewAnswers,
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
            ErrorKind::Timeout => "timeout",
            ErrorKind::BreakerOpen => "breaker_open",
            ErrorKind::Busy => "busy",
            ErrorKind::Callback => "callback",
            ErrorKind::BadFlow => "bad_flow",
            ErrorKind::TooFewAnswers => "too_few_answers",
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
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::BreakerOpen { .. } => ErrorKind::BreakerOpen,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::Callback { .. } => ErrorKind::Callback,
            Error::BadFlow { .. } => ErrorKind::BadFlow,
            Error::TooFewAnswers { .. } => ErrorKind::TooFewAnswers,
        }
    }

    /// The kind recorded in a telemetry span's `error` outcome: tern's own kind for a
    /// session's error, else the nearest one (a callback's failure is `inference`, a
    /// panic `panic`, busy or an open breaker `resource_limit`, a bad configuration
    /// `invalid_option`, a queue's file `io`).
    pub fn telemetry_kind(&self) -> tern::ErrorKind {
        use tern::ErrorKind as K;
        match self {
            Error::Model(e) => e.error_kind(),
            Error::Callback { panicked: true, .. } => K::Panic,
            Error::Callback { .. } | Error::Timeout { .. } | Error::TooFewAnswers { .. } => {
                K::Inference
            }
            Error::BreakerOpen { .. }
            | Error::Busy { .. }
            | Error::Overloaded { .. }
            | Error::QueueFull { .. }
            | Error::QueueInUse { .. }
            | Error::Closed => K::ResourceLimit,
            Error::Io { .. } => K::Io,
            Error::NotBatchable { .. }
            | Error::BadState { .. }
            | Error::BadChunk { .. }
            | Error::InvalidOption { .. }
            | Error::BadFlow { .. } => K::InvalidOption,
        }
    }

    /// A [`Error::BadFlow`] found while running a flow, named after the flow.
    pub(crate) fn in_flow(self, flow: &str) -> Error {
        match self {
            Error::BadFlow { reason, .. } => Error::BadFlow {
                flow: flow.to_string(),
                reason,
            },
            e => e,
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
