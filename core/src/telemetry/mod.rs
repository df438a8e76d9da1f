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

pub mod drift;
pub mod otlp;
pub mod record;
pub mod sketch;
pub(crate) mod store;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use drift::{embed_baseline, Baseline, TensorBaseline};
pub use otlp::{Payload, UploadBatch};
pub use record::{
    AttrValue, DriftCounts, EventRecord, HealthRecord, Outcome, Record, SpanRecord, TensorStats,
};

use crate::error::Error;
use crate::error::Result;
use crate::sync::lock;
use store::Store;

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

/// Counters describing the buffer now.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TelemetryStats {
    /// Bytes on disk.
    pub bytes_on_disk: u64,
    /// Sealed segments waiting for upload.
    pub pending_batches: u64,
    /// Records dropped since open, all reasons.
    pub dropped: u64,
    /// Consecutive failed upload attempts.
    pub upload_failures: u32,
    /// Damaged bytes skipped when the buffer was opened.
    pub recovered_skipped_bytes: u64,
}

enum Msg {
    Record(Record),
    Flush(SyncSender<std::io::Result<()>>),
    Roll(SyncSender<std::io::Result<()>>),
}

#[derive(Default)]
struct UploadSchedule {
    uploader: Option<Arc<dyn Uploader>>,
    network: bool,
    failures: u32,
    next_attempt: Option<Instant>,
    shutdown: bool,
}

struct Inner {
    tx: SyncSender<Msg>,
    config: TelemetryConfig,
    store: Arc<Mutex<Store>>,
    queue_dropped: AtomicU64,
    dropped_total: Arc<AtomicU64>,
    recovered_skipped: u64,
    sample_counter: AtomicU64,
    uploading: Mutex<()>,
    schedule: Arc<(Mutex<UploadSchedule>, Condvar)>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    closed: AtomicBool,
}

/// A handle on the buffer. Cheap to clone; all clones share one buffer.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("stats", &self.stats())
            .finish()
    }
}

fn io_err(dir: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: dir.to_path_buf(),
        source,
    }
}

impl Telemetry {
    /// Opens (or creates) the buffer in `dir`, recovering what a previous process left.
    pub fn open(dir: impl AsRef<Path>, config: TelemetryConfig) -> Result<Telemetry> {
        let dir = dir.as_ref();
        let (store, skipped) = Store::open(dir).map_err(|e| io_err(dir, e))?;
        let store = Arc::new(Mutex::new(store));
        let (tx, rx) = mpsc::sync_channel(config.queue_capacity.max(1));
        let dropped_total = Arc::new(AtomicU64::new(0));
        let schedule = Arc::new((Mutex::new(UploadSchedule::default()), Condvar::new()));
        let inner = Arc::new(Inner {
            tx,
            config: config.clone(),
            store: store.clone(),
            queue_dropped: AtomicU64::new(0),
            dropped_total: dropped_total.clone(),
            recovered_skipped: skipped,
            sample_counter: AtomicU64::new(0),
            uploading: Mutex::new(()),
            schedule,
            threads: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        });
        let writer = Writer {
            rx,
            store,
            config,
            pending_dropped: BTreeMap::new(),
            dropped_total,
        };
        let handle = std::thread::Builder::new()
            .name("tern-telemetry-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| io_err(dir, e))?;
        lock(&inner.threads).push(handle);
        let telemetry = Telemetry { inner };
        let weak = Arc::downgrade(&telemetry.inner);
        let handle = std::thread::Builder::new()
            .name("tern-telemetry-upload".into())
            .spawn(move || upload_loop(weak))
            .map_err(|e| io_err(dir, e))?;
        lock(&telemetry.inner.threads).push(handle);
        Ok(telemetry)
    }

    /// The configuration in force.
    pub fn config(&self) -> &TelemetryConfig {
        &self.inner.config
    }

    /// Queues a record. Never blocks: when the queue is full the record is counted as
    /// dropped (`queue_full`) instead.
    pub fn record(&self, record: Record) {
        match self.inner.tx.try_send(Msg::Record(record)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.inner.queue_dropped.fetch_add(1, Ordering::Relaxed);
                self.inner.dropped_total.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Report queue losses once room frees up. `swap` hands each lost record to exactly
        // one reporter; if the notice cannot be queued either, the count goes back.
        if self.inner.queue_dropped.load(Ordering::Relaxed) > 0 {
            self.note_queue_losses(|m| self.inner.tx.try_send(m).is_ok());
        }
    }

    /// Sends a `queue_full` notice for the losses not noted yet; if `send` fails, the count
    /// goes back for the next attempt.
    fn note_queue_losses(&self, send: impl FnOnce(Msg) -> bool) {
        let lost = self.inner.queue_dropped.swap(0, Ordering::AcqRel);
        if lost > 0 && !send(Msg::Record(dropped_record(lost, "queue_full"))) {
            self.inner.queue_dropped.fetch_add(lost, Ordering::AcqRel);
        }
    }

    /// Adds `n` to the app counter `name` (uploaded as an OTLP sum).
    pub fn counter(&self, name: &str, n: u64, attributes: &[(&str, AttrValue)]) {
        self.record(Record::Event(event(name, Some(n), attributes)));
    }

    /// Records the app event `name` (uploaded as an OTLP log record).
    pub fn event(&self, name: &str, attributes: &[(&str, AttrValue)]) {
        self.record(Record::Event(event(name, None, attributes)));
    }

    /// Writes out and fsyncs every record queued before this call. After `Ok`, they survive
    /// an app kill or power loss.
    pub fn flush(&self) -> Result<()> {
        self.request(Msg::Flush)
    }

    fn request(&self, make: fn(SyncSender<std::io::Result<()>>) -> Msg) -> Result<()> {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        let unavailable = |reason: &str| Error::Io {
            path: "telemetry".into(),
            source: std::io::Error::other(reason.to_string()),
        };
        // Queue losses not noted yet go in first (a blocking send, like the request itself),
        // so after a flush every loss is on disk too, not only those a later record noted.
        self.note_queue_losses(|m| self.inner.tx.send(m).is_ok());
        // A blocking send: flush waits for room in the queue, like the records before it.
        self.inner
            .tx
            .send(make(ack_tx))
            .map_err(|_| unavailable("telemetry writer stopped"))?;
        match ack_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Io {
                path: "telemetry".into(),
                source: e,
            }),
            Err(_) => Err(unavailable("telemetry writer did not answer")),
        }
    }

    /// Counters describing the buffer now.
    pub fn stats(&self) -> TelemetryStats {
        let store = lock(&self.inner.store);
        let schedule = lock(&self.inner.schedule.0);
        TelemetryStats {
            bytes_on_disk: store.total_bytes(),
            pending_batches: store.sealed.len() as u64 + u64::from(store.active_bytes > 0),
            dropped: self.inner.dropped_total.load(Ordering::Relaxed),
            upload_failures: schedule.failures,
            recovered_skipped_bytes: self.inner.recovered_skipped,
        }
    }

    /// Every record currently stored (sealed and active), oldest first; for inspection and
    /// tests. Flushes first.
    pub fn stored_records(&self) -> Result<Vec<Record>> {
        self.request(Msg::Roll)?;
        let store = lock(&self.inner.store);
        let mut all = Vec::new();
        for seg in &store.sealed {
            all.extend(store.read(seg.id).map_err(|e| io_err(&seg.path, e))?);
        }
        Ok(all)
    }

    /// Uploads pending batches now, oldest first, through `uploader`, until all are sent or
    /// one fails with [`UploadResult::Retry`]. Batches are deleted only once accepted.
    pub fn upload_pending(&self, uploader: &dyn Uploader) -> Result<UploadReport> {
        let Ok(_guard) = self.inner.uploading.try_lock() else {
            return Ok(UploadReport {
                retry_later: true,
                ..Default::default()
            });
        };
        self.request(Msg::Roll)?;
        let mut report = UploadReport::default();
        let ids: Vec<u64> = lock(&self.inner.store)
            .sealed
            .iter()
            .map(|s| s.id)
            .collect();
        for (done, id) in ids.iter().enumerate() {
            let records = match lock(&self.inner.store).read(*id) {
                Ok(r) => r,
                Err(_) => continue, // evicted meanwhile
            };
            let batch = otlp::build(*id, &records, &self.inner.config);
            // The store lock is not held while the app's uploader runs.
            match uploader.upload(&batch) {
                UploadResult::Accepted => {
                    lock(&self.inner.store).remove(*id).ok();
                    report.batches_accepted += 1;
                    report.records_accepted += records.len() as u64;
                }
                UploadResult::Rejected(_) => {
                    lock(&self.inner.store).remove(*id).ok();
                    report.batches_rejected += 1;
                    self.inner
                        .dropped_total
                        .fetch_add(records.len() as u64, Ordering::Relaxed);
                    self.record(dropped_record(records.len() as u64, "rejected_by_uploader"));
                }
                UploadResult::Retry(_) => {
                    report.retry_later = true;
                    report.batches_pending = (ids.len() - done) as u64;
                    break;
                }
            }
        }
        Ok(report)
    }

    /// Sets the uploader the background thread uses when the network is available.
    pub fn set_uploader(&self, uploader: Arc<dyn Uploader>) {
        let (m, cv) = &*self.inner.schedule;
        lock(m).uploader = Some(uploader);
        cv.notify_all();
    }

    /// Tells the buffer whether the network is there; when it is, pending batches are
    /// uploaded in the background (rate limited, with exponential backoff on failure).
    pub fn set_network_available(&self, available: bool) {
        let (m, cv) = &*self.inner.schedule;
        let mut s = lock(m);
        s.network = available;
        if available {
            s.next_attempt = s.next_attempt.filter(|_| s.failures > 0);
        }
        cv.notify_all();
    }

    /// Whether a health sample is due for this run (every `1 / health_sample_rate` runs).
    pub(crate) fn sample_health(&self) -> bool {
        let rate = self.inner.config.health_sample_rate;
        if rate <= 0.0 {
            return false;
        }
        let every = (1.0 / rate.min(1.0)).round().max(1.0) as u64;
        self.inner
            .sample_counter
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(every)
    }

    /// Flushes and stops the background threads. Later records are counted as dropped.
    pub fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let flushed = self.flush();
        let (m, cv) = &*self.inner.schedule;
        lock(m).shutdown = true;
        cv.notify_all();
        flushed
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let (m, cv) = &*self.schedule;
        lock(m).shutdown = true;
        cv.notify_all();
    }
}

fn event(name: &str, increment: Option<u64>, attributes: &[(&str, AttrValue)]) -> EventRecord {
    EventRecord {
        at_ns: record::now_ns(),
        name: name.to_string(),
        increment,
        attributes: attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    }
}

fn dropped_record(count: u64, reason: &str) -> Record {
    Record::Dropped {
        at_ns: record::now_ns(),
        count,
        reason: reason.to_string(),
    }
}

/// The writer thread: drains the queue into the active segment, syncs, rolls, evicts.
struct Writer {
    rx: Receiver<Msg>,
    store: Arc<Mutex<Store>>,
    config: TelemetryConfig,
    /// Losses not yet written as `Dropped` records, by reason.
    pending_dropped: BTreeMap<&'static str, u64>,
    dropped_total: Arc<AtomicU64>,
}

impl Writer {
    fn run(mut self) {
        let mut last_sync = Instant::now();
        let mut unsynced = false;
        loop {
            let first = match self.rx.recv_timeout(self.config.sync_interval) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut frames = Vec::new();
            let mut count = 0u64;
            let mut acks: Vec<(bool, SyncSender<std::io::Result<()>>)> = Vec::new();
            let mut next = first;
            while let Some(msg) = next {
                match msg {
                    Msg::Record(r) => {
                        frames.extend(store::encode(&r));
                        count += 1;
                    }
                    Msg::Flush(ack) => acks.push((false, ack)),
                    Msg::Roll(ack) => acks.push((true, ack)),
                }
                if !acks.is_empty() || frames.len() as u64 >= self.config.segment_bytes {
                    break;
                }
                next = self.rx.try_recv().ok();
            }
            let records = count;
            let drained = std::mem::take(&mut self.pending_dropped);
            for (reason, n) in &drained {
                frames.extend(store::encode(&dropped_record(*n, reason)));
                count += 1;
            }
            let store_handle = self.store.clone();
            let mut store = lock(&store_handle);
            let mut result = Ok(());
            if count > 0 {
                match store.append(&frames, count) {
                    Ok(()) => unsynced = true,
                    Err(e) => {
                        // Keep the loss counts for the next attempt and add this batch to them.
                        for (reason, n) in drained {
                            *self.pending_dropped.entry(reason).or_default() += n;
                        }
                        self.lose(records, "io_error");
                        result = Err(e);
                    }
                }
            }
            let sync_due = last_sync.elapsed() >= self.config.sync_interval;
            if unsynced && (sync_due || !acks.is_empty()) {
                if let Err(e) = store.sync() {
                    result = result.and(Err(e));
                }
                unsynced = false;
                last_sync = Instant::now();
            }
            let roll_requested = acks.iter().any(|(roll, _)| *roll);
            if store.active_bytes >= self.config.segment_bytes || roll_requested {
                if let Err(e) = store.roll() {
                    result = result.and(Err(e));
                }
            }
            self.enforce_caps(&mut store);
            drop(store);
            for (_, ack) in acks {
                let _ = ack.send(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                });
            }
        }
        let mut store = lock(&self.store);
        let _ = store.sync();
    }

    fn lose(&mut self, n: u64, reason: &'static str) {
        if n > 0 {
            *self.pending_dropped.entry(reason).or_default() += n;
            self.dropped_total.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn enforce_caps(&mut self, store: &mut Store) {
        let oldest_allowed = record::now_ns().saturating_sub(self.config.max_age.as_nanos() as u64);
        while let Some(seg) = store.sealed.first().cloned() {
            let reason = if store.total_bytes() > self.config.max_bytes {
                "byte_cap"
            } else if seg.modified_ns < oldest_allowed {
                "age_cap"
            } else {
                break;
            };
            let lost = store.remove(seg.id).unwrap_or(0);
            self.lose(lost, reason);
        }
        if store.total_bytes() > self.config.max_bytes && store.active_bytes > 0 {
            // A single oversized active segment: seal it so the next pass can evict it.
            let _ = store.roll();
        }
    }
}

fn upload_loop(weak: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let schedule = inner.schedule.clone();
        let (m, cv) = &*schedule;
        let s = lock(m);
        if s.shutdown {
            return;
        }
        let due = s.next_attempt.is_none_or(|t| Instant::now() >= t);
        let ready = match (&s.uploader, s.network, due) {
            (Some(u), true, true) => Some(u.clone()),
            _ => None,
        };
        let Some(uploader) = ready else {
            let wait = s
                .next_attempt
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(inner.config.min_upload_interval)
                .max(Duration::from_millis(10));
            // Do not keep the buffer alive while sleeping.
            drop(inner);
            let _ = cv.wait_timeout(s, wait);
            continue;
        };
        drop(s);
        let config = inner.config.clone();
        let telemetry = Telemetry { inner };
        let retry = telemetry
            .upload_pending(uploader.as_ref())
            .map_or(true, |r| r.retry_later);
        drop(telemetry);
        let mut s = lock(m);
        if retry {
            s.failures = s.failures.saturating_add(1);
            let exp = config
                .backoff_base
                .saturating_mul(1u32 << s.failures.min(20).saturating_sub(1));
            let delay = exp.min(config.backoff_max);
            // Up to 25% jitter so a fleet does not retry in lockstep.
            let jitter = delay.mul_f64(f64::from((record::now_ns() % 1000) as u32) / 4000.0);
            s.next_attempt = Some(Instant::now() + delay + jitter);
        } else {
            s.failures = 0;
            s.next_attempt = Some(Instant::now() + config.min_upload_interval);
        }
    }
}

/// The process-wide buffer sessions use by default.
static GLOBAL: RwLock<Option<Telemetry>> = RwLock::new(None);

/// Opens the buffer in `dir` and makes it the process-wide default: every session created
/// afterwards records into it (unless its options say otherwise). Call once at app start.
pub fn init(dir: impl AsRef<Path>, config: TelemetryConfig) -> Result<Telemetry> {
    let t = Telemetry::open(dir, config)?;
    *GLOBAL
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(t.clone());
    Ok(t)
}

/// The process-wide buffer, if [`init`] was called.
pub fn global() -> Option<Telemetry> {
    GLOBAL
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// Stops using a process-wide buffer (sessions created afterwards record nothing).
pub fn clear_global() {
    *GLOBAL
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
}
