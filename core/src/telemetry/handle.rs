//! The handle apps and sessions hold: it queues records without blocking, asks the writer
//! for flushes, and owns the two background threads ([`super::writer`], [`super::upload`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use super::record::{self, AttrValue, DropReason, EventRecord, Record};
use super::store::Store;
use super::upload::{self, UploadReport, UploadSchedule, Uploader};
use super::writer::{Msg, Writer};
use super::TelemetryConfig;
use crate::error::{Error, Result};
use crate::sync::lock;

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

pub(super) struct Inner {
    /// The buffer's directory (named in I/O errors).
    pub(super) dir: PathBuf,
    pub(super) tx: SyncSender<Msg>,
    pub(super) config: TelemetryConfig,
    pub(super) store: Arc<Mutex<Store>>,
    pub(super) queue_dropped: AtomicU64,
    pub(super) dropped_total: Arc<AtomicU64>,
    pub(super) recovered_skipped: u64,
    pub(super) sample_counter: AtomicU64,
    pub(super) uploading: Mutex<()>,
    pub(super) schedule: Arc<(Mutex<UploadSchedule>, Condvar)>,
    pub(super) threads: Mutex<Vec<JoinHandle<()>>>,
    pub(super) closed: AtomicBool,
}

/// A handle on the buffer. Cheap to clone; all clones share one buffer.
#[derive(Clone)]
pub struct Telemetry {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("stats", &self.stats())
            .finish()
    }
}

pub(super) fn io_err(dir: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: dir.to_path_buf(),
        source,
    }
}

impl Telemetry {
    /// Opens (or creates) the buffer in `dir`, recovering what a previous process left.
    pub fn open(dir: impl AsRef<Path>, config: TelemetryConfig) -> Result<Telemetry> {
        let dir = dir.as_ref();
        let (store, skipped) = Store::open(dir, config.max_bytes).map_err(|e| io_err(dir, e))?;
        let store = Arc::new(Mutex::new(store));
        let (tx, rx) = mpsc::sync_channel(config.queue_capacity.max(1));
        let dropped_total = Arc::new(AtomicU64::new(0));
        let schedule = Arc::new((Mutex::new(UploadSchedule::default()), Condvar::new()));
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
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
        if lost > 0 && !send(Msg::Record(Record::dropped(lost, DropReason::QueueFull))) {
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

    pub(super) fn request(&self, make: fn(SyncSender<std::io::Result<()>>) -> Msg) -> Result<()> {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        let unavailable = |reason: &str| Error::Io {
            path: self.inner.dir.clone(),
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
            Ok(Err(e)) => Err(io_err(&self.inner.dir, e)),
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
    /// one fails with [`UploadResult::Retry`](super::UploadResult::Retry). Batches are deleted
    /// only once accepted (or rejected, counted as dropped).
    pub fn upload_pending(&self, uploader: &dyn Uploader) -> Result<UploadReport> {
        let Ok(_guard) = self.inner.uploading.try_lock() else {
            return Ok(UploadReport {
                retry_later: true,
                ..Default::default()
            });
        };
        self.request(Msg::Roll)?;
        Ok(upload::pass(
            &self.inner.store,
            &self.inner.config,
            uploader,
            |records| {
                self.inner
                    .dropped_total
                    .fetch_add(records, Ordering::Relaxed);
                self.record(Record::dropped(records, DropReason::RejectedByUploader));
            },
        ))
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
        lock(m).set_network(available);
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

/// The background upload thread: runs a pass whenever the schedule says one is due. Holds
/// only a weak reference while it sleeps, so dropping the last handle ends it.
fn upload_loop(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let schedule = inner.schedule.clone();
        let (m, cv) = &*schedule;
        let s = lock(m);
        if s.shutdown {
            return;
        }
        let Some(uploader) = s.due() else {
            let wait = s.wait(&inner.config);
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
        lock(m).attempted(retry, &config);
    }
}
