//! The telemetry buffer: deferred, bounded, crash-safe observability on the device.
//!
//! Sessions feed it with no app code: every [`Session::run`](crate::Session::run) records
//! a span (model, version, backend, stage durations, outcome), and a sampled fraction of runs
//! record model-health statistics (NaN counts, means, top scores: aggregates only, never raw
//! inputs). Apps add their own counters and events with [`Telemetry::counter`] and
//! [`Telemetry::event`], and their own stages with [`Session::trace`](crate::Session::trace).
//!
//! ## The promise
//!
//! - **Recording never blocks on disk**: a record goes into a bounded in-memory queue
//!   ([`TelemetryConfig::queue_capacity`]); when it is full the record is counted as dropped.
//! - **Storage**: a writer thread appends checksummed frames to segment files under the
//!   app's directory and writes them out at once; it fsyncs every
//!   [`TelemetryConfig::sync_interval`] and on [`Telemetry::flush`].
//! - **Durability**: after `flush()` returns `Ok`, every record made before the call
//!   survives an app kill and a power loss. Without `flush()`, an app kill loses at most the
//!   records still in the queue (the writer drains it continuously), and a power loss at
//!   most the last `sync_interval` of records. Recovery keeps every intact record and drops
//!   torn or corrupted frames only.
//! - **Bounds**: at most [`TelemetryConfig::max_bytes`] on disk and
//!   [`TelemetryConfig::max_age`] of history, oldest segment evicted first; memory is
//!   bounded by the queue and one segment. Every loss (queue full, caps, I/O errors,
//!   batches the uploader rejects) is counted in a `dropped` record that is itself uploaded.
//! - **Upload**: deferred and delegated. The app supplies an [`Uploader`] and says when the
//!   network is there ([`Telemetry::set_network_available`]); batches go out as OTLP JSON
//!   (traces, metrics, logs), oldest first, and a batch is deleted only once the uploader
//!   confirms it. Failures back off exponentially; uploads are rate limited.
//!
//! ## Layout, one concern a module
//!
//! [`record`] (what is stored) → [`handle`](Telemetry) (the non-blocking front the app and
//! sessions hold) → `writer` (the thread that owns the disk side: `store`'s checksummed
//! segments, caps, loss notices) and `upload` (batches as [`otlp`] requests, the schedule);
//! `global` is the process-wide default, `health` the sampled tensor statistics sessions
//! record, [`drift`] the PSI computed at upload against the model's
//! [`Baseline`](crate::baseline::Baseline). Telemetry never edits or parses models.

pub mod drift;
mod global;
mod handle;
pub(crate) mod health;
pub mod otlp;
pub mod record;
pub mod sketch;
pub(crate) mod store;
mod upload;
mod writer;

use std::collections::BTreeMap;
use std::time::Duration;

pub use global::{clear_global, global, init};
pub use handle::{Telemetry, TelemetryStats};
pub use otlp::{Payload, Signal, UploadBatch};
pub use record::{
    AttrValue, DriftCounts, DropReason, EventRecord, HealthRecord, Outcome, Record, SpanRecord,
    TensorStats,
};
pub use upload::{UploadReport, UploadResult, Uploader};

/// Limits and schedules of the buffer.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Most bytes kept on disk (default 8 MiB).
    pub max_bytes: u64,
    /// Oldest record kept (default 7 days).
    pub max_age: Duration,
    /// Segment size: also the largest upload batch (default 256 KiB).
    pub segment_bytes: u64,
    /// Records held in memory before recording starts dropping (default 4096).
    pub queue_capacity: usize,
    /// How often written records are fsynced (default 1 s).
    pub sync_interval: Duration,
    /// Fraction of runs that record model-health statistics (default 0.01; 0 disables).
    pub health_sample_rate: f64,
    /// Least time between two upload attempts (the rate limit; default 10 s).
    pub min_upload_interval: Duration,
    /// First retry delay after a failed upload (default 5 s), doubling per failure...
    pub backoff_base: Duration,
    /// ...up to this (default 1 h).
    pub backoff_max: Duration,
    /// `service.name` of the OTLP resource (default `tern`).
    pub service_name: String,
    /// Extra OTLP resource attributes (app version, device class…). Never put user data here.
    pub resource: BTreeMap<String, String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            max_bytes: 8 << 20,
            max_age: Duration::from_secs(7 * 24 * 3600),
            segment_bytes: 256 << 10,
            queue_capacity: 4096,
            sync_interval: Duration::from_secs(1),
            health_sample_rate: 0.01,
            min_upload_interval: Duration::from_secs(10),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(3600),
            service_name: "tern".into(),
            resource: BTreeMap::new(),
        }
    }
}
