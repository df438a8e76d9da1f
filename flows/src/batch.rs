//! Micro-batching: concurrent callers' requests coalesced into one run.
//!
//! A [`Batcher`] owns [`BatchOptions::workers`] worker threads (one by default) and a
//! bounded queue. [`Batcher::run`] (from any
//! number of threads) queues the request and blocks until its outputs come back. The worker
//! takes the oldest request and collects more until [`BatchOptions::max_batch`] rows, until
//! [`BatchOptions::max_wait`] after that oldest request arrived, or — when
//! [`BatchOptions::eager`], the default — as soon as every request submitted so far is in
//! the batch (in-process callers are known: there is nobody else to wait for, so a lone
//! caller is not delayed at all). It then stacks the requests along the model's batch axis,
//! runs the session once and splits the outputs back by rows. A caller never waits more
//! than `max_wait` for companions, and requests queued while a batch runs go in the next
//! one without waiting. With several workers, one collects the next batch while others
//! run theirs (on a device with cores to spare and one-thread sessions, batches run side
//! by side).
//!
//! Requests whose other dimensions differ (two image sizes in one window) run as separate
//! batches; a batched run that fails, or whose outputs do not have the batch axis, is
//! re-run request by request so that each caller gets its own result or error — exactly
//! what [`Session::run`] would have given it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern::{DType, Dim, Outputs, Session, Tensor};

use crate::error::{Error, Result};
use crate::rows::{concat_rows, split_rows};

/// How a [`Batcher`] coalesces requests. `#[non_exhaustive]`: build from
/// [`BatchOptions::default`] (8 rows, 2 ms, 256 queued requests).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BatchOptions {
    /// At most this many rows (batch entries, summed over the requests) per run.
    pub max_batch: usize,
    /// At most this long from a request's arrival until the batch it is in starts.
    pub max_wait: Duration,
    /// At most this many requests waiting; beyond, [`Batcher::run`] fails with
    /// [`Error::Overloaded`] instead of queueing without bound.
    pub queue_capacity: usize,
    /// Run as soon as every request submitted so far is in the batch (`true`, the default),
    /// or hold the window open for requests not yet submitted (`false`: for producers that
    /// submit independently of each other's answers, when a fuller batch is worth up to
    /// `max_wait` of every caller's latency).
    pub eager: bool,
    /// Worker threads, each running one batch at a time (default 1).
    pub workers: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_batch: 8,
            max_wait: Duration::from_millis(2),
            queue_capacity: 256,
            eager: true,
            workers: 1,
        }
    }
}

impl BatchOptions {
    /// Sets [`BatchOptions::max_batch`].
    pub fn max_batch(mut self, rows: usize) -> Self {
        self.max_batch = rows;
        self
    }

    /// Sets [`BatchOptions::max_wait`].
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// Sets [`BatchOptions::eager`].
    pub fn eager(mut self, eager: bool) -> Self {
        self.eager = eager;
        self
    }

    /// Sets [`BatchOptions::workers`].
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Sets [`BatchOptions::queue_capacity`].
    pub fn queue_capacity(mut self, requests: usize) -> Self {
        self.queue_capacity = requests;
        self
    }
}

/// What a [`Batcher`] has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchStats {
    /// Requests answered.
    pub requests: u64,
    /// Runs of the session (batched or not).
    pub runs: u64,
    /// Runs that carried more than one request.
    pub batched_runs: u64,
    /// Requests that had to be re-run alone after their batch failed or could not be split.
    pub rerun_alone: u64,
}

#[derive(Default)]
struct Counters {
    /// Requests submitted and not yet taken into a batch by a worker.
    queued: AtomicUsize,
    requests: AtomicU64,
    runs: AtomicU64,
    batched_runs: AtomicU64,
    rerun_alone: AtomicU64,
}

/// One caller's request, inputs in the model's order.
struct Request {
    inputs: Vec<Tensor>,
    rows: usize,
    arrived: Instant,
    reply: SyncSender<Result<Outputs>>,
}

impl Request {
    /// Requests with equal keys can be stacked: each input's dtype and non-batch dims.
    fn key(&self) -> Vec<(DType, &[usize])> {
        self.inputs
            .iter()
            .map(|t| (t.dtype(), &t.shape()[1..]))
            .collect()
    }
}

/// Coalesces concurrent requests to one session into batched runs (see the module docs).
/// `Send + Sync`: share it and call [`Batcher::run`] from many threads. Dropping it finishes
/// the queued requests, then stops the worker.
pub struct Batcher {
    queue: Option<SyncSender<Request>>,
    workers: Vec<JoinHandle<()>>,
    session: Arc<Session>,
    input_names: Vec<String>,
    options: BatchOptions,
    counters: Arc<Counters>,
}

impl Batcher {
    /// Starts the worker for `session`, whose inputs must all have a batch axis: a first
    /// dimension that is the same free symbol in every input (and whose declared outputs,
    /// where their shapes are known, do not fix theirs).
    pub fn new(session: Arc<Session>, options: BatchOptions) -> Result<Batcher> {
        if options.max_batch == 0 || options.queue_capacity == 0 || options.workers == 0 {
            return Err(Error::InvalidOption {
                reason: format!(
                    "max_batch {}, queue_capacity {} and workers {} must be at least 1",
                    options.max_batch, options.queue_capacity, options.workers
                ),
            });
        }
        check_batch_axis(&session)?;
        let input_names: Vec<String> = session.input_names().map(str::to_string).collect();
        let (tx, rx) = mpsc::sync_channel(options.queue_capacity);
        let counters = Arc::new(Counters::default());
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::with_capacity(options.workers);
        for i in 0..options.workers {
            let worker = Worker {
                session: session.clone(),
                input_names: input_names.clone(),
                options: options.clone(),
                counters: counters.clone(),
            };
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("tern-batch-{i}-{}", session.model_name()))
                .spawn(move || worker.serve(&rx));
            match spawned {
                Ok(handle) => workers.push(handle),
                // Dropping the sender stops the workers already started.
                Err(e) => {
                    drop(tx);
                    for w in workers {
                        let _ = w.join();
                    }
                    return Err(Error::InvalidOption {
                        reason: format!("cannot start a batching thread: {e}"),
                    });
                }
            }
        }
        Ok(Batcher {
            queue: Some(tx),
            workers,
            session,
            input_names,
            options,
            counters,
        })
    }

    /// Runs `inputs` (one tensor per model input, each with the same number of rows along
    /// the batch axis) in the next batch, blocking until its outputs are back.
    ///
    /// Inputs the session would refuse (an unknown or missing name, a string tensor, rows
    /// that disagree between inputs) and requests of more than `max_batch` rows run
    /// unbatched on the calling thread, so the caller gets the session's own answer.
    pub fn run<I, S>(&self, inputs: I) -> Result<Outputs>
    where
        I: IntoIterator<Item = (S, Tensor)>,
        S: AsRef<str>,
    {
        let named: Vec<(String, Tensor)> = inputs
            .into_iter()
            .map(|(n, t)| (n.as_ref().to_string(), t))
            .collect();
        let Some(ordered) = self.batchable(&named) else {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            self.counters.runs.fetch_add(1, Ordering::Relaxed);
            return Ok(self.session.run(named)?);
        };
        let queue = self.queue.as_ref().ok_or(Error::Closed)?;
        let (reply, answer) = mpsc::sync_channel(1);
        let request = Request {
            rows: ordered[0].shape()[0],
            inputs: ordered,
            arrived: Instant::now(),
            reply,
        };
        self.counters.queued.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = queue.try_send(request) {
            self.counters.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(match e {
                TrySendError::Full(_) => Error::Overloaded {
                    capacity: self.options.queue_capacity,
                },
                TrySendError::Disconnected(_) => Error::Closed,
            });
        }
        answer.recv().map_err(|_| Error::Closed)?
    }

    /// `named` in model order, if it can go in a batch.
    fn batchable(&self, named: &[(String, Tensor)]) -> Option<Vec<Tensor>> {
        if named.len() != self.input_names.len() {
            return None;
        }
        let ordered: Vec<Tensor> = self
            .input_names
            .iter()
            .map(|want| {
                let mut found = named.iter().filter(|(n, _)| n == want);
                match (found.next(), found.next()) {
                    (Some((_, t)), None) => Some(t.clone()),
                    _ => None,
                }
            })
            .collect::<Option<_>>()?;
        let rows = *ordered[0].shape().first()?;
        let stackable = ordered
            .iter()
            .all(|t| t.shape().first() == Some(&rows) && t.dtype().size_of().is_some());
        (stackable && rows > 0 && rows <= self.options.max_batch).then_some(ordered)
    }

    /// What the batcher has done so far.
    pub fn stats(&self) -> BatchStats {
        let c = &self.counters;
        BatchStats {
            requests: c.requests.load(Ordering::Relaxed),
            runs: c.runs.load(Ordering::Relaxed),
            batched_runs: c.batched_runs.load(Ordering::Relaxed),
            rerun_alone: c.rerun_alone.load(Ordering::Relaxed),
        }
    }

    /// The options in force.
    pub fn options(&self) -> &BatchOptions {
        &self.options
    }

    /// The session the batches run on.
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        // Closing the queue lets the workers finish what is queued, then return.
        self.queue.take();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("model", &self.session.model_name())
            .field("options", &self.options)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Refuses a session whose inputs do not share a free first dimension, or whose declared
/// outputs fix theirs.
fn check_batch_axis(session: &Session) -> Result<()> {
    let mut symbol: Option<(String, String)> = None;
    for input in session.inputs() {
        let refuse = |reason: String| Error::NotBatchable {
            input: input.name.clone(),
            reason,
        };
        let Some(shape) = &input.shape else {
            return Err(refuse("its shape is not declared".into()));
        };
        match shape.first() {
            None => return Err(refuse("it is a scalar".into())),
            Some(Dim::Fixed(n)) => {
                return Err(refuse(format!(
                    "its first dimension is fixed at {n} ({})",
                    input.shape_string()
                )))
            }
            Some(Dim::Symbolic(s)) => match &symbol {
                Some((first, other)) if first != s => {
                    return Err(refuse(format!(
                        "its first dimension {s} is not {first}, the first dimension of {other:?}"
                    )))
                }
                Some(_) => {}
                None => symbol = Some((s.clone(), input.name.clone())),
            },
        }
        if input.dtype.is_some_and(|d| d.size_of().is_none()) {
            return Err(refuse(format!(
                "{} tensors cannot be stacked",
                DType::String
            )));
        }
    }
    for output in session.outputs() {
        if let Some(Dim::Fixed(n)) = output.shape.as_ref().and_then(|s| s.first()) {
            return Err(Error::NotBatchable {
                input: output.name.clone(),
                reason: format!(
                    "output {:?} has a fixed first dimension {n} ({})",
                    output.name,
                    output.shape_string()
                ),
            });
        }
    }
    Ok(())
}

/// The worker thread's half.
struct Worker {
    session: Arc<Session>,
    input_names: Vec<String>,
    options: BatchOptions,
    counters: Arc<Counters>,
}

impl Worker {
    fn serve(self, queue: &Mutex<Receiver<Request>>) {
        let mut held: Option<Request> = None;
        loop {
            // One worker collects a batch at a time; the others run theirs meanwhile.
            let batch = {
                let queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
                match self.collect(&queue, &mut held) {
                    Some(batch) => batch,
                    None => return,
                }
            };
            self.run_batch(batch);
        }
    }

    /// Takes a request (the one held over from the last batch first) and collects its
    /// companions; `None` once the queue is closed and empty.
    fn collect(
        &self,
        queue: &Receiver<Request>,
        held: &mut Option<Request>,
    ) -> Option<Vec<Request>> {
        let take = |r: Request| {
            self.counters.queued.fetch_sub(1, Ordering::SeqCst);
            r
        };
        let first = match held.take() {
            Some(r) => r,
            None => take(queue.recv().ok()?),
        };
        let deadline = first.arrived + self.options.max_wait;
        let mut rows = first.rows;
        let mut batch = vec![first];
        while rows < self.options.max_batch {
            if self.options.eager && self.counters.queued.load(Ordering::SeqCst) == 0 {
                break;
            }
            let next = match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => match queue.recv_timeout(left) {
                    Ok(r) => take(r),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                },
                // Past the deadline: take only what is already queued.
                _ => match queue.try_recv() {
                    Ok(r) => take(r),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                },
            };
            if rows + next.rows > self.options.max_batch {
                *held = Some(next);
                break;
            }
            rows += next.rows;
            batch.push(next);
        }
        Some(batch)
    }

    /// Runs `batch` as one run per group of stackable requests.
    fn run_batch(&self, mut batch: Vec<Request>) {
        while !batch.is_empty() {
            let key: Vec<(DType, Vec<usize>)> = batch[0]
                .key()
                .into_iter()
                .map(|(d, s)| (d, s.to_vec()))
                .collect();
            let (group, rest): (Vec<Request>, Vec<Request>) = batch.into_iter().partition(|r| {
                r.key()
                    .iter()
                    .zip(&key)
                    .all(|((d, s), (kd, ks))| d == kd && *s == ks.as_slice())
            });
            self.run_group(group);
            batch = rest;
        }
    }

    /// One run for `group`, split back; each request alone when that fails.
    fn run_group(&self, group: Vec<Request>) {
        self.counters
            .requests
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        if group.len() == 1 {
            for r in group {
                let result = self.run_alone(&r);
                self.answer(r, result);
            }
            return;
        }
        self.counters.runs.fetch_add(1, Ordering::Relaxed);
        self.counters.batched_runs.fetch_add(1, Ordering::Relaxed);
        match self.run_stacked(&group) {
            Some(split) => {
                for (r, outputs) in group.into_iter().zip(split) {
                    self.answer(r, Ok(outputs));
                }
            }
            None => {
                self.counters
                    .rerun_alone
                    .fetch_add(group.len() as u64, Ordering::Relaxed);
                for r in group {
                    let result = self.run_alone(&r);
                    self.answer(r, result);
                }
            }
        }
    }

    /// Sends `r` its result (a caller that gave up is not an error).
    fn answer(&self, r: Request, result: Result<Outputs>) {
        let _ = r.reply.send(result);
    }

    fn run_alone(&self, r: &Request) -> Result<Outputs> {
        self.counters.runs.fetch_add(1, Ordering::Relaxed);
        let named = self
            .input_names
            .iter()
            .cloned()
            .zip(r.inputs.iter().cloned());
        Ok(self.session.run(named)?)
    }

    /// The group's outputs, one [`Outputs`] per request, if the stacked run succeeded and
    /// every output has the batch axis.
    fn run_stacked(&self, group: &[Request]) -> Option<Vec<Outputs>> {
        let stacked = (0..self.input_names.len())
            .map(|i| concat_rows(&group.iter().map(|r| &r.inputs[i]).collect::<Vec<_>>()))
            .collect::<tern::Result<Vec<_>>>()
            .ok()?;
        let outputs = self
            .session
            .run(self.input_names.iter().cloned().zip(stacked))
            .ok()?;
        let rows: Vec<usize> = group.iter().map(|r| r.rows).collect();
        let total: usize = rows.iter().sum();
        let mut per_request: Vec<Vec<(String, Tensor)>> = vec![Vec::new(); group.len()];
        for (name, tensor) in outputs.iter() {
            if tensor.shape().first() != Some(&total) {
                return None;
            }
            for (slot, piece) in per_request.iter_mut().zip(split_rows(tensor, &rows).ok()?) {
                slot.push((name.to_string(), piece));
            }
        }
        Some(per_request.into_iter().map(Outputs::from_pairs).collect())
    }
}
