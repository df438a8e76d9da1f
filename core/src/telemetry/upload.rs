//! Upload: the app's [`Uploader`], one pass over the stored batches ([`pass`]) and the
//! schedule the background thread follows ([`UploadSchedule`]: network state, rate limit,
//! exponential backoff with jitter). The handle ([`super::Telemetry`]) drives both.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::otlp::{self, UploadBatch};
use super::record;
use super::store::Store;
use super::TelemetryConfig;
use crate::sync::lock;

/// What an [`Uploader`] did with a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadResult {
    /// The collector accepted it: the batch is deleted.
    Accepted,
    /// Try again later (network down, server 5xx, timeout): the batch is kept.
    Retry(String),
    /// The collector will never take it (4xx): the batch is deleted and counted as dropped.
    Rejected(String),
}

/// The app's way to send batches (HTTP to an OTLP collector, a platform job scheduler…).
/// Called from a tern background thread, or from [`Telemetry::upload_pending`].
pub trait Uploader: Send + Sync {
    /// Sends one batch; see [`UploadResult`].
    fn upload(&self, batch: &UploadBatch) -> UploadResult;
}

/// What one upload pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct UploadReport {
    /// Batches accepted and deleted.
    pub batches_accepted: u64,
    /// Records in those batches.
    pub records_accepted: u64,
    /// Batches rejected, deleted and counted as dropped.
    pub batches_rejected: u64,
    /// Whether the pass stopped on a retryable failure.
    pub retry_later: bool,
    /// Batches still waiting.
    pub batches_pending: u64,
}

/// When the background thread may upload next, and with what.
#[derive(Default)]
pub(super) struct UploadSchedule {
    /// The app's uploader, once set.
    pub(super) uploader: Option<Arc<dyn Uploader>>,
    network: bool,
    /// Consecutive failed passes.
    pub(super) failures: u32,
    next_attempt: Option<Instant>,
    /// Set when the buffer closes: the thread ends.
    pub(super) shutdown: bool,
}

impl UploadSchedule {
    /// The uploader to run now: one is set, the network is there and no backoff or rate
    /// limit holds it back.
    pub(super) fn due(&self) -> Option<Arc<dyn Uploader>> {
        let due = self.next_attempt.is_none_or(|t| Instant::now() >= t);
        self.uploader.clone().filter(|_| self.network && due)
    }

    /// How long to sleep when nothing is due (woken early when the app changes something).
    pub(super) fn wait(&self, config: &TelemetryConfig) -> Duration {
        self.next_attempt
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(config.min_upload_interval)
            .max(Duration::from_millis(10))
    }

    /// The network came or went; when it comes, a pending rate limit is lifted (not a
    /// backoff after failures).
    pub(super) fn set_network(&mut self, available: bool) {
        self.network = available;
        if available {
            self.next_attempt = self.next_attempt.filter(|_| self.failures > 0);
        }
    }

    /// Schedules the next pass after one that `retry`s (exponential backoff, up to 25 %
    /// jitter so a fleet does not retry in lockstep) or succeeded (the rate limit).
    pub(super) fn attempted(&mut self, retry: bool, config: &TelemetryConfig) {
        if retry {
            self.failures = self.failures.saturating_add(1);
            let exp = config
                .backoff_base
                .saturating_mul(1u32 << self.failures.min(20).saturating_sub(1));
            let delay = exp.min(config.backoff_max);
            let jitter = delay.mul_f64(f64::from((record::now_ns() % 1000) as u32) / 4000.0);
            self.next_attempt = Some(Instant::now() + delay + jitter);
        } else {
            self.failures = 0;
            self.next_attempt = Some(Instant::now() + config.min_upload_interval);
        }
    }
}

/// Uploads the sealed batches of `store`, oldest first, through `uploader`, until all are
/// sent or one is to be retried. A batch is deleted only once accepted or rejected;
/// `rejected(records)` is called for each rejected one. The store lock is not held while
/// the app's uploader runs.
pub(super) fn pass(
    store: &Mutex<Store>,
    config: &TelemetryConfig,
    uploader: &dyn Uploader,
    mut rejected: impl FnMut(u64),
) -> UploadReport {
    let mut report = UploadReport::default();
    let ids: Vec<u64> = lock(store).sealed.iter().map(|s| s.id).collect();
    for (done, id) in ids.iter().enumerate() {
        let records = match lock(store).read(*id) {
            Ok(r) => r,
            Err(_) => continue, // evicted meanwhile
        };
        let batch = otlp::build(*id, &records, config);
        match uploader.upload(&batch) {
            UploadResult::Accepted => {
                lock(store).remove(*id).ok();
                report.batches_accepted += 1;
                report.records_accepted += records.len() as u64;
            }
            UploadResult::Rejected(_) => {
                lock(store).remove(*id).ok();
                report.batches_rejected += 1;
                rejected(records.len() as u64);
            }
            UploadResult::Retry(_) => {
                report.retry_later = true;
                report.batches_pending = (ids.len() - done) as u64;
                break;
            }
        }
    }
    report
}
