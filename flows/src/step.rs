//! A step: one thing a flow runs — a session, or an app callback (pre/post-processing, a
//! rule, another runtime) — with what protects the request path around it: a latency
//! budget, a circuit breaker, a result cache, and fallbacks that answer when it fails.
//!
//! One request through [`Step::run`]:
//!
//! 1. the result cache ([`StepBuilder::cache`]) answers if it holds the inputs' key;
//! 2. an open breaker ([`StepBuilder::breaker`]) refuses the run;
//! 3. with a budget ([`StepBuilder::budget`], or the flow's deadline), the run goes to its
//!    own thread and the caller waits at most that long: a run that cannot be cancelled
//!    finishes in the background and its result is dropped, and at most
//!    [`StepBuilder::max_abandoned`] such runs may be out at once (beyond that the step
//!    answers [`Failure::Busy`] at once instead of starting another);
//! 4. on success the outputs are cached and kept as the input's last good result; on a
//!    failure (an error, a panic, the budget, the breaker, busy) the fallbacks are tried in
//!    order: [`Fallback::LastGood`], [`Fallback::Rule`], [`Fallback::Static`]. The
//!    [`Answer`] says which [`Source`] answered and why the step itself did not.
//!
//! With no fallback that answers, the step's failure is the error.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tern::telemetry::{Outcome, Record, SpanRecord};
use tern::{Backend, Outputs, Session, Telemetry, Tensor, TensorInfo};

use crate::breaker::{Admission, Breaker, BreakerOptions, BreakerState};
use crate::cache::{CacheKey, CacheOptions, ResultCache};
use crate::error::{Error, ErrorKind, Result};

/// Named input tensors, as a step receives them.
pub type Inputs = [(String, Tensor)];

/// What a step computes: a [`Session`] run, or the app's own code. Implemented for
/// sessions and for closures `Fn(&Inputs) -> Result<Outputs>`; the bindings implement it
/// for Kotlin, Swift and Python objects.
pub trait Compute: Send + Sync {
    /// Computes outputs from `inputs`. Errors and panics are the step's failure.
    fn compute(&self, inputs: &Inputs) -> Result<Outputs>;
}

impl Compute for Session {
    fn compute(&self, inputs: &Inputs) -> Result<Outputs> {
        Ok(self.run(inputs.iter().map(|(n, t)| (n.as_str(), t.clone())))?)
    }
}

impl<F> Compute for F
where
    F: Fn(&Inputs) -> Result<Outputs> + Send + Sync,
{
    fn compute(&self, inputs: &Inputs) -> Result<Outputs> {
        self(inputs)
    }
}

/// What answers when a step fails, tried in the order given to [`StepBuilder::fallback`].
#[derive(Clone)]
pub enum Fallback {
    /// The step's last good outputs for the same inputs (kept in a bounded store, see
    /// [`StepBuilder::last_good_bytes`]); passes to the next fallback when there is none.
    LastGood,
    /// An app rule computed from the inputs (its own failure passes to the next fallback).
    Rule(Arc<dyn Compute>),
    /// Fixed outputs (a static top-N, an "unknown" class).
    Static(Outputs),
}

impl std::fmt::Debug for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fallback::LastGood => f.write_str("LastGood"),
            Fallback::Rule(_) => f.write_str("Rule(..)"),
            Fallback::Static(o) => f.debug_tuple("Static").field(o).finish(),
        }
    }
}

/// Who produced an [`Answer`]'s outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The step ran (its session or callback).
    Model,
    /// The result cache.
    Cache,
    /// [`Fallback::LastGood`].
    LastGood,
    /// [`Fallback::Rule`].
    Rule,
    /// [`Fallback::Static`].
    Default,
}

impl Source {
    /// The stable name: `model`, `cache`, `last_good`, `rule`, `default`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Model => "model",
            Source::Cache => "cache",
            Source::LastGood => "last_good",
            Source::Rule => "rule",
            Source::Default => "default",
        }
    }

    /// The telemetry outcome of a request answered by this source.
    pub fn outcome(self) -> Outcome {
        match self {
            Source::Model => Outcome::Ok,
            Source::Cache => Outcome::CacheHit,
            Source::LastGood | Source::Rule | Source::Default => Outcome::Fallback,
        }
    }
}

/// Why a step did not answer itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// It failed with an error (a callback's panic included).
    Error {
        /// The error's kind.
        kind: ErrorKind,
        /// tern's own kind, for a session's error.
        model_kind: Option<tern::ErrorKind>,
        /// The error's message.
        message: String,
    },
    /// It did not answer within its budget (or the flow's deadline).
    Timeout {
        /// How long the caller waited.
        budget: Duration,
    },
    /// Its circuit breaker is open.
    BreakerOpen,
    /// Too many of its timed-out runs are still running in the background.
    Busy,
}

impl Failure {
    /// The failure an error stands for.
    pub(crate) fn of(e: &Error) -> Failure {
        match e {
            Error::Timeout { budget, .. } => Failure::Timeout { budget: *budget },
            Error::BreakerOpen { .. } => Failure::BreakerOpen,
            Error::Busy { .. } => Failure::Busy,
            e => Failure::Error {
                kind: e.kind(),
                model_kind: e.model_kind(),
                message: e.to_string(),
            },
        }
    }

    /// The stable name: `error`, `timeout`, `breaker_open`, `busy`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Failure::Error { .. } => "error",
            Failure::Timeout { .. } => "timeout",
            Failure::BreakerOpen => "breaker_open",
            Failure::Busy => "busy",
        }
    }
}

/// A step's answer to one request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The outputs.
    pub outputs: Outputs,
    /// Who produced them.
    pub source: Source,
    /// Why the step itself did not answer (`None` when [`Answer::source`] is the model or
    /// the cache).
    pub failure: Option<Failure>,
    /// How long the request took.
    pub elapsed: Duration,
}

/// Counters of one step's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct StepStats {
    /// Requests answered by the step itself.
    pub ok: u64,
    /// Requests answered by the result cache.
    pub cache_hits: u64,
    /// Requests answered by a fallback.
    pub fallbacks: u64,
    /// Requests that failed with an error (a fallback may still have answered).
    pub errors: u64,
    /// Requests that ran out of budget.
    pub timeouts: u64,
    /// Requests the open breaker refused.
    pub refused: u64,
    /// Requests refused because too many abandoned runs were still out.
    pub busy: u64,
}

/// Counts one request in `stats` (a poisoned lock still counts: the counters stay valid).
fn count(stats: &Mutex<StepStats>, field: impl FnOnce(&mut StepStats) -> &mut u64) {
    *field(&mut lock(stats)) += 1;
}

/// The declared interface of a session step, checked when steps are chained.
#[derive(Debug, Clone)]
pub(crate) struct Signature {
    pub(crate) inputs: Vec<TensorInfo>,
    pub(crate) outputs: Vec<TensorInfo>,
}

struct Inner {
    name: String,
    compute: Arc<dyn Compute>,
    identity: String,
    signature: Option<Signature>,
    backend: Backend,
    budget: Option<Duration>,
    breaker: Option<Breaker>,
    fallbacks: Vec<Fallback>,
    cache: Option<ResultCache>,
    last_good: Option<ResultCache>,
    runs: Arc<Mutex<OutRuns>>,
    max_abandoned: usize,
    telemetry: Option<Telemetry>,
    counters: Mutex<StepStats>,
}

/// A step of a flow (see the module docs). Cloning shares it (its breaker, cache and
/// counters); `Send + Sync`.
#[derive(Clone)]
pub struct Step {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.inner.name)
            .field("budget", &self.inner.budget)
            .field("fallbacks", &self.inner.fallbacks)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Step`]; from [`Step::session`], [`Step::callback`] or [`Step::compute`].
pub struct StepBuilder {
    name: String,
    compute: Arc<dyn Compute>,
    identity: String,
    signature: Option<Signature>,
    backend: Backend,
    budget: Option<Duration>,
    breaker: Option<BreakerOptions>,
    fallbacks: Vec<Fallback>,
    cache: Option<ResultCache>,
    last_good_bytes: u64,
    max_abandoned: usize,
    telemetry: Option<Telemetry>,
}

impl Step {
    /// A step that runs `session`. Its cache entries are keyed by the model's content
    /// digest; its requests go to the session's telemetry buffer.
    pub fn session(name: impl Into<String>, session: Arc<Session>) -> StepBuilder {
        let identity = format!("model:{}", session.model_sha256());
        let signature = Some(Signature {
            inputs: session.inputs(),
            outputs: session.outputs().to_vec(),
        });
        let backend = session.backend();
        let telemetry = session.telemetry_buffer().cloned();
        let mut b = StepBuilder::new(name.into(), session, identity);
        b.signature = signature;
        b.backend = backend;
        b.telemetry = telemetry;
        b
    }

    /// A step that runs the app's closure (pre/post-processing, a rule).
    pub fn callback<F>(name: impl Into<String>, f: F) -> StepBuilder
    where
        F: Fn(&Inputs) -> Result<Outputs> + Send + Sync + 'static,
    {
        Step::compute(name, Arc::new(f))
    }

    /// A step that runs any [`Compute`] (the bindings' foreign callbacks).
    pub fn compute(name: impl Into<String>, compute: Arc<dyn Compute>) -> StepBuilder {
        let name = name.into();
        let identity = format!("callback:{name}");
        StepBuilder::new(name, compute, identity)
    }

    /// The step's name (its stage name in telemetry).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The breaker's state (`Closed` for a step without one).
    pub fn breaker_state(&self) -> BreakerState {
        self.inner
            .breaker
            .as_ref()
            .map_or(BreakerState::Closed, Breaker::state)
    }

    /// Counters of the step's requests so far.
    pub fn stats(&self) -> StepStats {
        *lock(&self.inner.counters)
    }

    /// Timed-out runs still running in the background now.
    pub fn abandoned_runs(&self) -> usize {
        lock(&self.inner.runs).abandoned(Instant::now())
    }

    pub(crate) fn signature(&self) -> Option<&Signature> {
        self.inner.signature.as_ref()
    }

    pub(crate) fn telemetry(&self) -> Option<&Telemetry> {
        self.inner.telemetry.as_ref()
    }

    /// Runs one request (see the module docs), recorded in telemetry as a span with this
    /// step as its one stage.
    pub fn run(&self, inputs: &Inputs) -> Result<Answer> {
        let mut span = self.span();
        let result = self.run_until(inputs, None);
        if let Some(span) = span.as_mut() {
            span.stages.push(stage(self.name(), &result));
            span.outcome = outcome(&result);
        }
        self.record(span);
        result
    }

    pub(crate) fn span(&self) -> Option<SpanRecord> {
        self.inner
            .telemetry
            .as_ref()
            .map(|_| SpanRecord::starting_now(&self.inner.name, "", self.inner.backend))
    }

    pub(crate) fn record(&self, span: Option<SpanRecord>) {
        if let (Some(t), Some(span)) = (&self.inner.telemetry, span) {
            t.record(Record::Span(span));
        }
    }

    /// Runs one request that must answer by `deadline` (if any) as well as within the
    /// step's own budget; not recorded in telemetry (the flow records its span).
    pub fn run_until(&self, inputs: &Inputs, deadline: Option<Instant>) -> Result<Answer> {
        let start = Instant::now();
        let s = &self.inner;
        let key = match (&s.cache, &s.last_good) {
            (None, None) => None,
            _ => CacheKey::new(&s.identity, inputs).ok(),
        };
        if let (Some(cache), Some(key)) = (&s.cache, &key) {
            if let Some(outputs) = cache.get(key) {
                count(&s.counters, |c| &mut c.cache_hits);
                return Ok(Answer {
                    outputs,
                    source: Source::Cache,
                    failure: None,
                    elapsed: start.elapsed(),
                });
            }
        }
        let result = self.attempt(inputs, deadline, start);
        match result {
            Ok(outputs) => {
                count(&s.counters, |c| &mut c.ok);
                if let Some(key) = key {
                    for store in [&s.cache, &s.last_good].into_iter().flatten() {
                        store.insert(key, outputs.clone());
                    }
                }
                Ok(Answer {
                    outputs,
                    source: Source::Model,
                    failure: None,
                    elapsed: start.elapsed(),
                })
            }
            Err(error) => {
                let failure = Failure::of(&error);
                count(&s.counters, |c| match failure {
                    Failure::Error { .. } => &mut c.errors,
                    Failure::Timeout { .. } => &mut c.timeouts,
                    Failure::BreakerOpen => &mut c.refused,
                    Failure::Busy => &mut c.busy,
                });
                match self.fall_back(inputs, key.as_ref()) {
                    Some((outputs, source)) => {
                        count(&s.counters, |c| &mut c.fallbacks);
                        Ok(Answer {
                            outputs,
                            source,
                            failure: Some(failure),
                            elapsed: start.elapsed(),
                        })
                    }
                    None => Err(error),
                }
            }
        }
    }

    /// The breaker, the budget and the run itself.
    fn attempt(
        &self,
        inputs: &Inputs,
        deadline: Option<Instant>,
        start: Instant,
    ) -> Result<Outputs> {
        let s = &self.inner;
        let admission = match &s.breaker {
            Some(b) => b.admit(),
            None => Admission::Run,
        };
        if admission == Admission::Refused {
            return Err(Error::BreakerOpen {
                step: s.name.clone(),
            });
        }
        let budget = match (s.budget, deadline) {
            (b, None) => b,
            (b, Some(d)) => {
                let left = d.saturating_duration_since(start);
                Some(b.map_or(left, |b| b.min(left)))
            }
        };
        let result = match budget {
            None => guarded(&s.name, &*s.compute, inputs),
            Some(budget) => self.run_timed(inputs, budget),
        };
        if let Some(breaker) = &s.breaker {
            // Busy is about this process's backlog, not the step's health.
            if !matches!(result, Err(Error::Busy { .. })) {
                if let Some(state) = breaker.record(admission, result.is_ok()) {
                    if let Some(t) = &s.telemetry {
                        t.event(
                            "tern.flow.breaker",
                            &[
                                ("step", s.name.as_str().into()),
                                ("state", state.as_str().into()),
                            ],
                        );
                    }
                }
            }
        }
        result
    }

    /// Runs on its own thread and waits at most `budget`.
    fn run_timed(&self, inputs: &Inputs, budget: Duration) -> Result<Outputs> {
        let s = &self.inner;
        let timeout = || Error::Timeout {
            step: s.name.clone(),
            budget,
        };
        if budget.is_zero() {
            return Err(timeout());
        }
        // A run counts as abandoned once its caller's budget has passed and until it
        // finishes: decided by the clock, not by when the caller's thread notices, so
        // back-to-back requests see every earlier run that outlived its budget.
        let until = Instant::now() + budget;
        let id = {
            let mut runs = lock(&s.runs);
            if runs.abandoned(Instant::now()) >= s.max_abandoned {
                return Err(Error::Busy {
                    step: s.name.clone(),
                    abandoned: s.max_abandoned,
                });
            }
            runs.start(until)
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let worker = {
            let runs = s.runs.clone();
            let compute = s.compute.clone();
            let name = s.name.clone();
            let inputs = inputs.to_vec();
            move || {
                let result = guarded(&name, &*compute, &inputs);
                lock(&runs).finish(id);
                let _ = tx.send(result);
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name(format!("tern-step-{}", s.name))
            .spawn(worker)
        {
            lock(&s.runs).finish(id);
            return Err(Error::Callback {
                step: s.name.clone(),
                reason: format!("could not start a thread for the run: {e}"),
                panicked: false,
            });
        }
        match rx.recv_timeout(budget) {
            Ok(result) => result,
            // It may have finished just as the budget ran out: take the result then.
            Err(_) => rx.try_recv().unwrap_or_else(|_| Err(timeout())),
        }
    }

    fn fall_back(&self, inputs: &Inputs, key: Option<&CacheKey>) -> Option<(Outputs, Source)> {
        let s = &self.inner;
        s.fallbacks.iter().find_map(|f| match f {
            Fallback::LastGood => {
                let store = s.last_good.as_ref()?;
                store.get(key?).map(|o| (o, Source::LastGood))
            }
            Fallback::Rule(rule) => guarded(&s.name, &**rule, inputs)
                .ok()
                .map(|o| (o, Source::Rule)),
            Fallback::Static(outputs) => Some((outputs.clone(), Source::Default)),
        })
    }
}

/// A step's runs on their own threads: an id and the instant its caller stops waiting.
#[derive(Debug, Default)]
struct OutRuns {
    next: u64,
    out: Vec<(u64, Instant)>,
}

impl OutRuns {
    /// Registers a run whose caller waits until `until`; its id.
    fn start(&mut self, until: Instant) -> u64 {
        self.next += 1;
        self.out.push((self.next, until));
        self.next
    }

    fn finish(&mut self, id: u64) {
        self.out.retain(|(i, _)| *i != id);
    }

    /// Runs still going whose caller stopped waiting by `now`.
    fn abandoned(&self, now: Instant) -> usize {
        self.out.iter().filter(|(_, until)| *until <= now).count()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `compute`, a panic becoming [`Error::Callback`].
fn guarded(step: &str, compute: &dyn Compute, inputs: &Inputs) -> Result<Outputs> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| compute.compute(inputs))) {
        Ok(r) => r,
        Err(payload) => Err(Error::Callback {
            step: step.to_string(),
            reason: tern::error::panic_message(&*payload),
            panicked: true,
        }),
    }
}

/// A span stage for one step's answer: `(name, duration)`.
pub(crate) fn stage(name: &str, result: &Result<Answer>) -> (String, u64) {
    let ns = match result {
        Ok(a) => a.elapsed.as_nanos() as u64,
        Err(_) => 0,
    };
    (name.to_string(), ns)
}

/// The telemetry outcome of one request's result.
pub(crate) fn outcome(result: &Result<Answer>) -> Outcome {
    match result {
        Ok(a) => a.source.outcome(),
        Err(Error::Timeout { .. }) => Outcome::Timeout,
        Err(e) => Outcome::Error(e.telemetry_kind()),
    }
}

impl StepBuilder {
    pub(crate) fn new(name: String, compute: Arc<dyn Compute>, identity: String) -> StepBuilder {
        StepBuilder {
            name,
            compute,
            identity,
            signature: None,
            backend: Backend::Cpu,
            budget: None,
            breaker: None,
            fallbacks: Vec::new(),
            cache: None,
            last_good_bytes: 4 << 20,
            max_abandoned: 2,
            telemetry: None,
        }
    }

    /// Declares the step's inputs and outputs (a nested flow's), checked when chained.
    pub(crate) fn declared(mut self, signature: Option<Signature>) -> Self {
        self.signature = signature;
        self
    }

    /// The step's latency budget: the caller never waits longer for it (default: none).
    pub fn budget(mut self, budget: Duration) -> Self {
        self.budget = Some(budget);
        self
    }

    /// A circuit breaker around the step (default: none).
    pub fn breaker(mut self, options: BreakerOptions) -> Self {
        self.breaker = Some(options);
        self
    }

    /// Adds a fallback, tried after those added before it.
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        self.fallbacks.push(fallback);
        self
    }

    /// Answers from (and fills) `cache`, which other steps may share.
    pub fn cache(mut self, cache: &ResultCache) -> Self {
        self.cache = Some(cache.clone());
        self
    }

    /// The most output bytes [`Fallback::LastGood`] keeps (default 4 MiB).
    pub fn last_good_bytes(mut self, bytes: u64) -> Self {
        self.last_good_bytes = bytes;
        self
    }

    /// How many timed-out runs may still be running in the background before the step
    /// answers [`Failure::Busy`] instead of starting another (default 2).
    pub fn max_abandoned(mut self, n: usize) -> Self {
        self.max_abandoned = n;
        self
    }

    /// Records the step's requests in `telemetry` (a session step uses its session's
    /// buffer unless told otherwise).
    pub fn telemetry(mut self, telemetry: Telemetry) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    /// The step. Fails with [`Error::InvalidOption`] for an empty name, a budget of 0,
    /// `max_abandoned` 0 with a budget, or bad breaker or last-good options.
    pub fn build(self) -> Result<Step> {
        let invalid = |reason: String| Err(Error::InvalidOption { reason });
        if self.name.is_empty() {
            return invalid("a step needs a name".into());
        }
        if self.budget.is_some_and(|b| b.is_zero()) {
            return invalid(format!(
                "step {:?}: a budget of 0 can never be met",
                self.name
            ));
        }
        if self.max_abandoned == 0 {
            return invalid(format!(
                "step {:?}: max_abandoned must be at least 1",
                self.name
            ));
        }
        let breaker = self.breaker.map(Breaker::new).transpose()?;
        let last_good = if self
            .fallbacks
            .iter()
            .any(|f| matches!(f, Fallback::LastGood))
        {
            Some(ResultCache::new(
                CacheOptions::default()
                    .ttl(None)
                    .max_bytes(self.last_good_bytes),
            )?)
        } else {
            None
        };
        Ok(Step {
            inner: Arc::new(Inner {
                name: self.name,
                compute: self.compute,
                identity: self.identity,
                signature: self.signature,
                backend: self.backend,
                budget: self.budget,
                breaker,
                fallbacks: self.fallbacks,
                cache: self.cache,
                last_good,
                runs: Arc::default(),
                max_abandoned: self.max_abandoned,
                telemetry: self.telemetry,
                counters: Mutex::default(),
            }),
        })
    }
}
