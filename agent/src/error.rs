//! The agent's errors, and the HTTP answer each one is: a status and a JSON body
//! `{"error": MESSAGE, "kind": KIND}` (the Open Inference Protocol's error document, with
//! a stable machine-readable kind beside the message).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tern::ErrorKind;

use crate::config::ConfigError;
use crate::protocol::{EncodeError, ProtocolError};

/// Seconds a client told to come back (`Retry-After`) waits.
pub const RETRY_AFTER_SECONDS: u32 = 1;

/// Everything the agent can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// No model of that name is served.
    #[error("no model '{0}'")]
    ModelNotFound(String),
    /// The model is served, but not in that version.
    #[error("model '{name}' is served in version {served}, not {asked}")]
    VersionNotFound {
        /// The model.
        name: String,
        /// The version asked for.
        asked: String,
        /// The version served.
        served: String,
    },
    /// The request is malformed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The outputs could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The model refused the inputs or failed to run.
    #[error(transparent)]
    Inference(#[from] tern::Error),
    /// Every run slot and queue place is taken: come back later (503, `Retry-After`).
    #[error("the agent is at capacity; retry after {RETRY_AFTER_SECONDS} s")]
    Overloaded,
    /// The client did not send the whole body in time (408).
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    /// The body is larger than the configured limit (413).
    #[error("the request body is over the size limit")]
    BodyTooLarge,
    /// Serving the request panicked (a bug in the agent): 500, the agent keeps running.
    #[error("internal error while serving the request")]
    Panic,
    /// The agent is shutting down.
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// The configuration cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A flow failed, or the flow file cannot be built.
    #[error(transparent)]
    Flow(tern_flows::Error),
    /// The model store or its updater cannot be opened.
    #[error("model store: {0}")]
    Update(tern_bundle::Error),
    /// The telemetry buffer cannot be opened.
    #[error("telemetry: {0}")]
    Telemetry(tern::Error),
    /// Listening or the runtime failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

impl AgentError {
    /// A stable machine-readable name for the error, e.g. `"shape_mismatch"`.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentError::ModelNotFound(_) => "model_not_found",
            AgentError::VersionNotFound { .. } => "version_not_found",
            AgentError::Protocol(_) => "bad_request",
            AgentError::Encode(_) => "encode",
            AgentError::Inference(e) => e.kind(),
            AgentError::Flow(tern_flows::Error::Model(e)) => e.kind(),
            AgentError::Flow(e) => e.kind().as_str(),
            AgentError::Overloaded => "overloaded",
            AgentError::BodyTimeout => "body_timeout",
            AgentError::Panic => "panic",
            AgentError::BodyTooLarge => "body_too_large",
            AgentError::ShuttingDown => "shutting_down",
            AgentError::Config(_) => "config",
            AgentError::Telemetry(_) => "telemetry",
            AgentError::Update(_) => "model_store",
            AgentError::Io { .. } => "io",
        }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        use tern_flows::ErrorKind as F;
        match self {
            AgentError::Flow(tern_flows::Error::Model(e)) => model_status(e),
            AgentError::Flow(e) => match e.kind() {
                F::Overloaded | F::QueueFull | F::Busy | F::BreakerOpen | F::Closed => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                F::Timeout | F::TooFewAnswers => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            AgentError::ModelNotFound(_) | AgentError::VersionNotFound { .. } => {
                StatusCode::NOT_FOUND
            }
            AgentError::Protocol(_) | AgentError::Encode(EncodeError::Protocol(_)) => {
                StatusCode::BAD_REQUEST
            }
            AgentError::Inference(e) => model_status(e),
            AgentError::Overloaded | AgentError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            AgentError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AgentError::Encode(_)
            | AgentError::Config(_)
            | AgentError::Telemetry(_)
            | AgentError::Update(_)
            | AgentError::Io { .. }
            | AgentError::Panic => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The status of a model's own refusal or failure.
fn model_status(e: &tern::Error) -> StatusCode {
    match e.error_kind() {
        ErrorKind::UnknownInput
        | ErrorKind::MissingInput
        | ErrorKind::DuplicateInput
        | ErrorKind::DtypeMismatch
        | ErrorKind::ShapeMismatch
        | ErrorKind::ShapeConflict
        | ErrorKind::InvalidValue
        | ErrorKind::Nan
        | ErrorKind::Tensor => StatusCode::BAD_REQUEST,
        ErrorKind::ResourceLimit => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<tern_flows::Error> for AgentError {
    fn from(e: tern_flows::Error) -> Self {
        match e {
            tern_flows::Error::Model(e) => AgentError::Inference(e),
            e => AgentError::Flow(e),
        }
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::json!({ "error": self.to_string(), "kind": self.kind() });
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}
