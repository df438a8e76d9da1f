//! The agent's telemetry: tern's on-device buffer (spans, errors and health samples of every
//! model the agent serves, bounded and crash-safe) opened in a directory, and uploaded in
//! the background to an OTLP/HTTP collector as JSON — rate limited, retried with backoff,
//! kept on disk while the collector is unreachable.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tern::telemetry::{Telemetry, TelemetryConfig, UploadBatch, UploadResult, Uploader};

use crate::error::AgentError;

/// Where telemetry goes.
#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    /// The buffer's directory.
    pub dir: PathBuf,
    /// The collector's base URL (`http://host:4318`); the signal's path is appended.
    pub otlp_url: Option<String>,
    /// Least time between two uploads.
    pub upload_interval: Duration,
    /// Most bytes the buffer keeps on disk (oldest dropped, and counted, beyond).
    pub max_bytes: u64,
}

/// Sends each batch's OTLP/JSON requests to a collector over HTTP(S).
pub struct OtlpHttp {
    base: String,
    client: ureq::Agent,
}

impl OtlpHttp {
    /// An uploader to the collector at `base` (e.g. `http://127.0.0.1:4318`).
    pub fn new(base: &str) -> OtlpHttp {
        OtlpHttp {
            base: base.trim_end_matches('/').to_string(),
            client: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .build()
                .new_agent(),
        }
    }
}

impl Uploader for OtlpHttp {
    fn upload(&self, batch: &UploadBatch) -> UploadResult {
        for payload in &batch.payloads {
            let url = format!("{}{}", self.base, payload.signal.path());
            let sent = self
                .client
                .post(&url)
                .header("content-type", "application/json")
                .send(payload.json.as_bytes());
            match sent {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    let status = r.status();
                    let why = format!("{url}: HTTP {status}");
                    // Retry what may pass later; a collector refusing the payload itself
                    // never will.
                    return if status.is_server_error() || matches!(status.as_u16(), 408 | 429) {
                        UploadResult::Retry(why)
                    } else {
                        UploadResult::Rejected(why)
                    };
                }
                Err(e) => return UploadResult::Retry(format!("{url}: {e}")),
            }
        }
        UploadResult::Accepted
    }
}

/// Opens the process-wide buffer every session records into (before any model is loaded)
/// and, with a collector, starts its background uploads.
pub fn start(settings: &TelemetrySettings) -> Result<Telemetry, AgentError> {
    let config = TelemetryConfig {
        max_bytes: settings.max_bytes,
        min_upload_interval: settings.upload_interval,
        service_name: "tern-agent".into(),
        ..TelemetryConfig::default()
    };
    let telemetry = tern::telemetry::init(&settings.dir, config).map_err(AgentError::Telemetry)?;
    if let Some(url) = &settings.otlp_url {
        telemetry.set_uploader(Arc::new(OtlpHttp::new(url)));
        telemetry.set_network_available(true);
    }
    Ok(telemetry)
}
