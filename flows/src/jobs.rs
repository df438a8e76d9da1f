//! Background jobs: inference accepted now, run later, surviving process death.
//!
//! A [`JobQueue`] is a directory. Each job is one file, and its life is a chain of atomic
//! renames between sub-directories, so a kill or a power cut at any point leaves every
//! accepted job findable:
//!
//! ```text
//! submit ──▶ pending/R-T-S-ID.job ──claim──▶ running/R-T-S-ID.job ──▶ done/ID.result
//!                 ▲                                  │ (a retryable error)
//!                 └────── attempts + 1, later ◀──────┘
//! ```
//!
//! `R` is the priority's rank, `T` the time before which the job may not run (its retry
//! backoff), `S` a sequence number: the file names sort in the order jobs run. A result is
//! written to a temporary file, synced and renamed into `done/` before its running file is
//! removed. On [`JobQueue::open`], a running file with a result is a finished job whose
//! last step was cut (its running file goes, it does not run again); one without is a job
//! the process died in, put back in `pending/` with one more attempt — or failed as
//! [`JobError::Crashed`] once it has used them all, so a job that kills the process cannot
//! do it forever. Accepted jobs are therefore run at least once and completed exactly once;
//! a job submitted again with the same idempotency key is the same job.
//!
//! The platform owns scheduling (Glean's rule): the app calls [`JobQueue::run_pending`]
//! with a time budget when the OS lets it run (Android's WorkManager, iOS's
//! BGTaskScheduler, a charging/idle/unmetered signal); the queue runs the jobs that are
//! due, by priority, until the budget is spent. Results stay in `done/` until
//! [`JobQueue::take_result`] collects them. Every file is framed with a CRC-32; a damaged
//! one is moved to `corrupt/` and its job, when its id can be read, fails as
//! [`JobError::Corrupt`].

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tern::sync::{lock, read, write};
use tern::{DType, Outputs, Session, Tensor};

use crate::error::{Error, Result};

/// How a [`JobQueue`] bounds and retries its jobs. Build from [`JobOptions::default`]
/// (1024 jobs, 3 attempts, 30 s first backoff, 256 MiB per job).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JobOptions {
    /// At most this many jobs pending, running or with an uncollected result; beyond,
    /// [`JobQueue::submit`] fails with [`Error::QueueFull`].
    pub capacity: usize,
    /// Runs a job may take (failed by a retryable error or by the process dying) before it
    /// fails for good.
    pub max_attempts: u32,
    /// The wait before the second attempt; doubled for each further one.
    pub backoff: Duration,
    /// The largest job file (inputs and header) accepted.
    pub max_job_bytes: u64,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            capacity: 1024,
            max_attempts: 3,
            backoff: Duration::from_secs(30),
            max_job_bytes: 256 << 20,
        }
    }
}

impl JobOptions {
    /// Sets [`JobOptions::capacity`].
    pub fn capacity(mut self, jobs: usize) -> Self {
        self.capacity = jobs;
        self
    }

    /// Sets [`JobOptions::max_attempts`].
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets [`JobOptions::backoff`].
    pub fn backoff(mut self, wait: Duration) -> Self {
        self.backoff = wait;
        self
    }

    /// Sets [`JobOptions::max_job_bytes`].
    pub fn max_job_bytes(mut self, bytes: u64) -> Self {
        self.max_job_bytes = bytes;
        self
    }
}

/// Which jobs run first when several are due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Before every other.
    High,
    /// The default.
    #[default]
    Normal,
    /// After every other.
    Low,
}

impl std::str::FromStr for Priority {
    type Err = Error;

    /// `high`, `normal` or `low`, any case.
    fn from_str(s: &str) -> Result<Priority> {
        match s.to_ascii_lowercase().as_str() {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            _ => Err(Error::InvalidOption {
                reason: format!("unknown priority {s:?} (high, normal, low)"),
            }),
        }
    }
}

impl Priority {
    fn rank(self) -> u8 {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }
}

/// Why a job failed for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobError {
    /// The session refused or failed the run (tern's own kind; retryable kinds only after
    /// every attempt).
    Model(tern::ErrorKind),
    /// No session is registered under the job's model name (e.g. the model was deleted).
    UnknownModel,
    /// The process died during each of the job's attempts.
    Crashed,
    /// The job's file was damaged (moved to `corrupt/`).
    Corrupt,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Waiting to run (`attempts` already used).
    Pending {
        /// Attempts used so far.
        attempts: u32,
    },
    /// Being run now (or the process died running it: it is pending again on next open).
    Running,
    /// Finished, successfully or not: collect it with [`JobQueue::take_result`].
    Finished,
    /// No such job (never submitted, or its result was collected).
    Unknown,
}

/// A finished job's result.
#[derive(Debug, Clone)]
pub enum JobOutcome {
    /// The run's outputs.
    Done(Outputs),
    /// Why it failed, and the error's text.
    Failed {
        /// The kind of failure.
        error: JobError,
        /// The error's description.
        message: String,
    },
}

/// What one [`JobQueue::run_pending`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunReport {
    /// Jobs that ran to a result.
    pub succeeded: u32,
    /// Jobs that failed for good.
    pub failed: u32,
    /// Jobs that failed with a retryable error and wait for a later attempt.
    pub retried: u32,
    /// Jobs still pending when the call returned (due or not).
    pub pending: u32,
    /// Whether the budget ran out with jobs still due.
    pub out_of_time: bool,
}

/// What [`JobQueue::open`] repaired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovery {
    /// Jobs the process died running, put back in `pending/`.
    pub requeued: u32,
    /// Jobs the process died running on their last attempt, failed as crashed.
    pub crashed: u32,
    /// Finished jobs whose running file was left behind (removed, not run again).
    pub finished: u32,
    /// Damaged files moved to `corrupt/`.
    pub quarantined: u32,
}

/// A persistent queue of inference jobs in a directory (see the module docs). `Send +
/// Sync`; one process at a time holds a directory (a second [`JobQueue::open`] fails with
/// [`Error::QueueInUse`]).
#[derive(Debug)]
pub struct JobQueue {
    dir: PathBuf,
    options: JobOptions,
    sessions: RwLock<HashMap<String, Arc<Session>>>,
    /// Serialises this process's changes to the directory.
    changes: Mutex<()>,
    /// Keeps file names unique and ordered within one nanosecond tick.
    seq: AtomicU64,
    recovery: Recovery,
    /// Held for the queue's life: the directory's lock.
    _lock: File,
}

/// A job file's header (JSON), followed by its tensors' bytes.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    id: String,
    model: String,
    priority: Priority,
    attempts: u32,
    /// `Some` in a failed job's result.
    error: Option<JobError>,
    message: Option<String>,
    tensors: Vec<TensorHeader>,
}

#[derive(Debug, Serialize, Deserialize)]
struct TensorHeader {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
}

const MAGIC: &[u8; 4] = b"TRNJ";
const SUBDIRS: [&str; 5] = ["pending", "running", "done", "corrupt", "tmp"];

/// `MAGIC | header length u32 | CRC-32 of the rest u32 | header JSON | tensor bytes`.
fn encode(header: &Header, tensors: &[&Tensor]) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(header).map_err(|e| Error::InvalidOption {
        reason: format!("cannot encode the job: {e}"),
    })?;
    let mut body = json.clone();
    for t in tensors {
        body.extend_from_slice(t.as_bytes()?);
    }
    let mut out = Vec::with_capacity(12 + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The header and named tensors of a job or result file; a description of the damage
/// otherwise.
fn decode(bytes: &[u8]) -> std::result::Result<(Header, Vec<(String, Tensor)>), String> {
    if bytes.len() < 12 || &bytes[..4] != MAGIC {
        return Err("not a job file".into());
    }
    let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    let crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let body = &bytes[12..];
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    if len > body.len() {
        return Err("header past the end".into());
    }
    let header: Header =
        serde_json::from_slice(&body[..len]).map_err(|e| format!("bad header: {e}"))?;
    let mut at = len;
    let mut tensors = Vec::with_capacity(header.tensors.len());
    for t in &header.tensors {
        let size = t.dtype.size_of().ok_or("a string tensor")?;
        let n = t
            .shape
            .iter()
            .try_fold(size, |a, &d| a.checked_mul(d))
            .filter(|n| at + n <= body.len())
            .ok_or("tensor past the end")?;
        let tensor =
            Tensor::from_bytes(t.dtype, &t.shape, &body[at..at + n]).map_err(|e| e.to_string())?;
        tensors.push((t.name.clone(), tensor));
        at += n;
    }
    if at != body.len() {
        return Err("trailing bytes".into());
    }
    Ok((header, tensors))
}

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A file name's parts: `R-T-S-ID.job`.
struct Name {
    not_before_ms: u64,
    id: String,
}

fn parse_name(name: &str) -> Option<Name> {
    let stem = name.strip_suffix(".job")?;
    let mut parts = stem.splitn(4, '-');
    let (_rank, t, _seq, id) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    Some(Name {
        not_before_ms: t.parse().ok()?,
        id: id.to_string(),
    })
}

/// Whether `id` can name a job: 1–64 of `[A-Za-z0-9_.]` (it becomes part of file names).
fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        && !id.starts_with('.')
}

impl JobQueue {
    /// Opens (creating it if needed) the queue in `dir`, takes its lock, and repairs what a
    /// previous process left half done ([`JobQueue::recovery`] says what).
    pub fn open(dir: impl AsRef<Path>, options: JobOptions) -> Result<JobQueue> {
        let dir = dir.as_ref().to_path_buf();
        if options.capacity == 0 || options.max_attempts == 0 {
            return Err(Error::InvalidOption {
                reason: "capacity and max_attempts must be at least 1".into(),
            });
        }
        for sub in SUBDIRS {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(|e| io(&path, e))?;
        }
        let lock_path = dir.join("lock");
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(&lock_path, e))?;
        lock_file
            .try_lock()
            .map_err(|_| Error::QueueInUse { path: dir.clone() })?;
        let mut queue = JobQueue {
            dir,
            options,
            sessions: RwLock::new(HashMap::new()),
            changes: Mutex::new(()),
            seq: AtomicU64::new(0),
            recovery: Recovery::default(),
            _lock: lock_file,
        };
        queue.recovery = queue.recover()?;
        Ok(queue)
    }

    /// What opening the queue repaired.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    /// Serves jobs naming `model` with `session` (replacing any session it had).
    pub fn register(&self, model: &str, session: Arc<Session>) {
        write(&self.sessions).insert(model.to_string(), session);
    }

    /// Stops serving `model`: its jobs then fail as [`JobError::UnknownModel`].
    pub fn unregister(&self, model: &str) {
        write(&self.sessions).remove(model);
    }

    /// Accepts a job: run `model` on `inputs` later. With an idempotency `key` (1–64 of
    /// `[A-Za-z0-9_.]`), the key is the job's id and submitting it again while the job is
    /// queued or its result uncollected returns the same id without a second job. The job
    /// is on disk (synced) when this returns.
    pub fn submit(
        &self,
        model: &str,
        inputs: Vec<(String, Tensor)>,
        priority: Priority,
        key: Option<&str>,
    ) -> Result<String> {
        let _guard = lock(&self.changes);
        let id = match key {
            Some(key) if !valid_id(key) => {
                return Err(Error::InvalidOption {
                    reason: format!("job key {key:?}: 1-64 of A-Z a-z 0-9 _ . please"),
                })
            }
            Some(key) => {
                if self.status_locked(key)? != JobStatus::Unknown {
                    return Ok(key.to_string());
                }
                key.to_string()
            }
            None => format!("j{:x}", self.next_seq()),
        };
        let held = ["pending", "running", "done"]
            .iter()
            .map(|s| self.list(s).map(|l| l.len()))
            .sum::<Result<usize>>()?;
        if held >= self.options.capacity {
            return Err(Error::QueueFull {
                capacity: self.options.capacity,
            });
        }
        let header = Header {
            id: id.clone(),
            model: model.to_string(),
            priority,
            attempts: 0,
            error: None,
            message: None,
            tensors: inputs
                .iter()
                .map(|(n, t)| TensorHeader {
                    name: n.clone(),
                    dtype: t.dtype(),
                    shape: t.shape().to_vec(),
                })
                .collect(),
        };
        let bytes = encode(&header, &inputs.iter().map(|(_, t)| t).collect::<Vec<_>>())?;
        if bytes.len() as u64 > self.options.max_job_bytes {
            return Err(Error::InvalidOption {
                reason: format!(
                    "the job takes {} bytes, more than max_job_bytes {}",
                    bytes.len(),
                    self.options.max_job_bytes
                ),
            });
        }
        let name = format!(
            "{}-{:016}-{:020}-{id}.job",
            priority.rank(),
            0,
            self.next_seq()
        );
        self.write_atomic(&self.dir.join("pending").join(name), &bytes)?;
        Ok(id)
    }

    /// Where job `id` is.
    pub fn status(&self, id: &str) -> Result<JobStatus> {
        let _guard = lock(&self.changes);
        self.status_locked(id)
    }

    fn status_locked(&self, id: &str) -> Result<JobStatus> {
        if self.dir.join("done").join(format!("{id}.result")).exists() {
            return Ok(JobStatus::Finished);
        }
        if self.find("running", id)?.is_some() {
            return Ok(JobStatus::Running);
        }
        if let Some(path) = self.find("pending", id)? {
            let attempts = self.read_job(&path).map_or(0, |(h, _)| h.attempts);
            return Ok(JobStatus::Pending { attempts });
        }
        Ok(JobStatus::Unknown)
    }

    /// Collects job `id`'s result, removing it from the queue (`None` if it has none yet).
    pub fn take_result(&self, id: &str) -> Result<Option<JobOutcome>> {
        let _guard = lock(&self.changes);
        let outcome = self.result_locked(id)?;
        if outcome.is_some() {
            remove(&self.dir.join("done").join(format!("{id}.result")))?;
        }
        Ok(outcome)
    }

    /// Job `id`'s result, left in the queue (for a caller that must deliver it somewhere
    /// before [`JobQueue::take_result`] removes it).
    pub fn peek_result(&self, id: &str) -> Result<Option<JobOutcome>> {
        let _guard = lock(&self.changes);
        self.result_locked(id)
    }

    fn result_locked(&self, id: &str) -> Result<Option<JobOutcome>> {
        if !valid_id(id) {
            return Ok(None);
        }
        let path = self.dir.join("done").join(format!("{id}.result"));
        if !path.exists() {
            return Ok(None);
        }
        Ok(Some(match self.read_job(&path) {
            Ok((header, tensors)) => match header.error {
                None => JobOutcome::Done(Outputs::from_pairs(tensors)),
                Some(error) => JobOutcome::Failed {
                    error,
                    message: header.message.unwrap_or_default(),
                },
            },
            Err(reason) => JobOutcome::Failed {
                error: JobError::Corrupt,
                message: reason,
            },
        }))
    }

    /// The model names pending jobs ask for (so an app or the CLI can register their
    /// sessions before [`JobQueue::run_pending`]).
    pub fn pending_models(&self) -> Result<Vec<String>> {
        let _guard = lock(&self.changes);
        let mut models: Vec<String> = self
            .list("pending")?
            .iter()
            .filter_map(|p| self.read_job(p).ok().map(|(h, _)| h.model))
            .collect();
        models.sort();
        models.dedup();
        Ok(models)
    }

    /// Runs due jobs, highest priority and oldest first, until none is due or `budget` is
    /// spent (a job that has started finishes, so the call can overrun by one run).
    pub fn run_pending(&self, budget: Duration) -> Result<RunReport> {
        let start = Instant::now();
        let mut report = RunReport::default();
        while let Some(claimed) = self.claim_next()? {
            self.run_claimed(&claimed, &mut report)?;
            if start.elapsed() >= budget {
                report.out_of_time = self.claim_ready()?;
                break;
            }
        }
        report.pending = self.list("pending")?.len() as u32;
        Ok(report)
    }

    /// A number that grows with time and with each call (file names sort in submission
    /// order, and generated ids are unique across restarts).
    fn next_seq(&self) -> u64 {
        let ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        // Nanoseconds, with the low bits replaced by the sequence: unique per process even
        // when the clock does not move between calls.
        (ns & !0xfff) | (seq & 0xfff)
    }

    /// Whether a pending job is due now.
    fn claim_ready(&self) -> Result<bool> {
        let _guard = lock(&self.changes);
        let now = now_ms();
        Ok(self.list("pending")?.iter().any(|p| {
            file_name(p)
                .and_then(parse_name)
                .is_some_and(|n| n.not_before_ms <= now)
        }))
    }

    /// Moves the next due job to `running/`; its path there.
    fn claim_next(&self) -> Result<Option<PathBuf>> {
        let _guard = lock(&self.changes);
        let now = now_ms();
        for path in self.list("pending")? {
            let Some(name) = file_name(&path) else {
                continue;
            };
            match parse_name(name) {
                Some(n) if n.not_before_ms > now => continue,
                Some(_) => {
                    let to = self.dir.join("running").join(name);
                    fs::rename(&path, &to).map_err(|e| io(&path, e))?;
                    sync_dir(&self.dir.join("running"))?;
                    return Ok(Some(to));
                }
                None => self.quarantine(&path, None)?,
            }
        }
        Ok(None)
    }

    /// Runs one claimed job and files its result, a retry, or a failure.
    fn run_claimed(&self, path: &Path, report: &mut RunReport) -> Result<()> {
        let (header, inputs) = match self.read_job(path) {
            Ok(job) => job,
            Err(reason) => {
                let _guard = lock(&self.changes);
                let id = file_name(path).and_then(parse_name).map(|n| n.id);
                self.quarantine(path, id.map(|id| (id, reason)))?;
                report.failed += 1;
                return Ok(());
            }
        };
        let session = read(&self.sessions).get(&header.model).cloned();
        let result = match session {
            None => Err((
                JobError::UnknownModel,
                format!("no session is registered for model {:?}", header.model),
            )),
            Some(session) => session
                .run(inputs.iter().cloned())
                .map_err(|e| (JobError::Model(e.error_kind()), e.to_string())),
        };
        let _guard = lock(&self.changes);
        match result {
            Ok(outputs) => {
                let finished = Header {
                    error: None,
                    message: None,
                    tensors: outputs
                        .iter()
                        .map(|(n, t)| TensorHeader {
                            name: n.to_string(),
                            dtype: t.dtype(),
                            shape: t.shape().to_vec(),
                        })
                        .collect(),
                    ..header
                };
                let tensors: Vec<&Tensor> = outputs.iter().map(|(_, t)| t).collect();
                match encode(&finished, &tensors) {
                    Ok(bytes) => {
                        self.finish(path, &finished.id, &bytes)?;
                        report.succeeded += 1;
                    }
                    Err(e) => {
                        let kind = JobError::Model(tern::ErrorKind::Tensor);
                        self.fail(path, &finished, kind, e.to_string())?;
                        report.failed += 1;
                    }
                }
            }
            Err((JobError::Model(kind), _))
                if retryable(kind) && header.attempts + 1 < self.options.max_attempts =>
            {
                self.retry(path, header, &inputs)?;
                report.retried += 1;
            }
            Err((error, message)) => {
                self.fail(path, &header, error, message)?;
                report.failed += 1;
            }
        }
        Ok(())
    }

    /// Files `bytes` as job `id`'s result, then drops its running file.
    fn finish(&self, running: &Path, id: &str, bytes: &[u8]) -> Result<()> {
        self.write_atomic(&self.dir.join("done").join(format!("{id}.result")), bytes)?;
        remove(running)
    }

    /// Files a failure result for the job at `running`.
    fn fail(
        &self,
        running: &Path,
        header: &Header,
        error: JobError,
        message: String,
    ) -> Result<()> {
        let failed = Header {
            id: header.id.clone(),
            model: header.model.clone(),
            priority: header.priority,
            attempts: header.attempts + 1,
            error: Some(error),
            message: Some(message),
            tensors: Vec::new(),
        };
        let bytes = encode(&failed, &[])?;
        self.finish(running, &header.id, &bytes)
    }

    /// Puts the job back in `pending/` with one more attempt used, due after its backoff.
    fn retry(&self, running: &Path, mut header: Header, inputs: &[(String, Tensor)]) -> Result<()> {
        header.attempts += 1;
        let wait = self
            .options
            .backoff
            .saturating_mul(1u32 << (header.attempts - 1).min(16));
        let not_before = now_ms().saturating_add(wait.as_millis() as u64);
        let bytes = encode(&header, &inputs.iter().map(|(_, t)| t).collect::<Vec<_>>())?;
        let name = format!(
            "{}-{not_before:016}-{:020}-{}.job",
            header.priority.rank(),
            self.next_seq(),
            header.id
        );
        self.write_atomic(&self.dir.join("pending").join(name), &bytes)?;
        remove(running)
    }

    /// Repairs what a killed process left: see the module docs.
    fn recover(&self) -> Result<Recovery> {
        let mut recovery = Recovery::default();
        for stale in self.list("tmp")? {
            remove(&stale)?;
        }
        for path in self.list("running")? {
            let Some(name) = file_name(&path).and_then(parse_name) else {
                self.quarantine(&path, None)?;
                recovery.quarantined += 1;
                continue;
            };
            if self
                .dir
                .join("done")
                .join(format!("{}.result", name.id))
                .exists()
            {
                remove(&path)?;
                recovery.finished += 1;
                continue;
            }
            match self.read_job(&path) {
                Err(reason) => {
                    self.quarantine(&path, Some((name.id, reason)))?;
                    recovery.quarantined += 1;
                }
                Ok((header, _)) if header.attempts + 1 >= self.options.max_attempts => {
                    let message = format!(
                        "the process died during each of the job's {} attempt(s)",
                        header.attempts + 1
                    );
                    self.fail(&path, &header, JobError::Crashed, message)?;
                    recovery.crashed += 1;
                }
                Ok((header, inputs)) => {
                    let mut header = header;
                    header.attempts += 1;
                    let bytes =
                        encode(&header, &inputs.iter().map(|(_, t)| t).collect::<Vec<_>>())?;
                    let name = file_name(&path).unwrap_or_default().to_string();
                    self.write_atomic(&self.dir.join("pending").join(name), &bytes)?;
                    remove(&path)?;
                    recovery.requeued += 1;
                }
            }
        }
        Ok(recovery)
    }

    /// Moves a damaged file to `corrupt/`; with its job's id, files a `Corrupt` failure.
    fn quarantine(&self, path: &Path, job: Option<(String, String)>) -> Result<()> {
        let to = self
            .dir
            .join("corrupt")
            .join(file_name(path).unwrap_or("unnamed"));
        fs::rename(path, &to).map_err(|e| io(path, e))?;
        if let Some((id, reason)) = job.filter(|(id, _)| valid_id(id)) {
            let failed = Header {
                id: id.clone(),
                model: String::new(),
                priority: Priority::Normal,
                attempts: 0,
                error: Some(JobError::Corrupt),
                message: Some(format!("the job's file was damaged: {reason}")),
                tensors: Vec::new(),
            };
            let bytes = encode(&failed, &[])?;
            self.write_atomic(&self.dir.join("done").join(format!("{id}.result")), &bytes)?;
        }
        Ok(())
    }

    /// Reads and checks a job or result file (results, which hold outputs, may be up to
    /// 4 GiB).
    fn read_job(
        &self,
        path: &Path,
    ) -> std::result::Result<(Header, Vec<(String, Tensor)>), String> {
        let bytes = tern::fs::read_regular(path, self.options.max_job_bytes.max(1 << 32))
            .map_err(|e| e.to_string())?;
        decode(&bytes)
    }

    /// The files in a sub-directory, sorted by name (run order for `pending/`).
    fn list(&self, sub: &str) -> Result<Vec<PathBuf>> {
        let dir = self.dir.join(sub);
        let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(|e| io(&dir, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .collect();
        paths.sort();
        Ok(paths)
    }

    /// The file of job `id` in a sub-directory.
    fn find(&self, sub: &str, id: &str) -> Result<Option<PathBuf>> {
        let suffix = format!("-{id}.job");
        Ok(self
            .list(sub)?
            .into_iter()
            .find(|p| file_name(p).is_some_and(|n| n.ends_with(&suffix))))
    }

    /// Writes `bytes` to `path` atomically and durably: a synced temporary file renamed
    /// into place, then the directory synced.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = self.dir.join("tmp").join(file_name(path).unwrap_or("job"));
        let mut file = File::create(&tmp).map_err(|e| io(&tmp, e))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| {
                let _ = fs::remove_file(&tmp);
                io(&tmp, e)
            })?;
        fs::rename(&tmp, path).map_err(|e| io(path, e))?;
        sync_dir(path.parent().unwrap_or(&self.dir))
    }
}

/// Retryable failures: the run itself failed, not the job's inputs.
fn retryable(kind: tern::ErrorKind) -> bool {
    use tern::ErrorKind as K;
    matches!(
        kind,
        K::Inference | K::Panic | K::Io | K::BackendUnavailable
    )
}

fn file_name(path: &Path) -> Option<&str> {
    path.file_name().and_then(|n| n.to_str())
}

fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path, e)),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
