//! A circuit breaker: after `failures` failures (errors or timeouts) within `window`, a step
//! stops being tried for `cooldown`; then one probe request is let through (half-open),
//! and its success closes the breaker, its failure opens it again.
//!
//! The breaker only decides; the [`crate::Step`] that owns it runs the model, answers from
//! its fallback while the breaker is open, and reports state changes to telemetry.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// When a breaker opens and how long it stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerOptions {
    /// Failures within [`BreakerOptions::window`] that open the breaker (default 5).
    pub failures: u32,
    /// The sliding window failures are counted in (default 30 s).
    pub window: Duration,
    /// How long an open breaker refuses before it lets one probe through (default 10 s).
    pub cooldown: Duration,
}

impl Default for BreakerOptions {
    fn default() -> Self {
        BreakerOptions {
            failures: 5,
            window: Duration::from_secs(30),
            cooldown: Duration::from_secs(10),
        }
    }
}

impl BreakerOptions {
    /// Sets [`BreakerOptions::failures`].
    pub fn failures(mut self, n: u32) -> Self {
        self.failures = n;
        self
    }

    /// Sets [`BreakerOptions::window`].
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Sets [`BreakerOptions::cooldown`].
    pub fn cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.failures == 0 {
            return Err(Error::InvalidOption {
                reason: "a breaker must allow at least 1 failure before it opens".into(),
            });
        }
        if self.window.is_zero() {
            return Err(Error::InvalidOption {
                reason: "a breaker's failure window must be longer than 0".into(),
            });
        }
        Ok(())
    }
}

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Requests run.
    Closed,
    /// Requests are refused (answered by the fallback) until the cooldown ends.
    Open,
    /// The cooldown ended: one probe runs; other requests are refused until it is back.
    HalfOpen,
}

impl BreakerState {
    /// The stable name: `closed`, `open`, `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// What [`Breaker::admit`] decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Run it (closed).
    Run,
    /// Run it as the half-open probe: its outcome decides the state.
    Probe,
    /// Do not run it.
    Refused,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    /// Failure times within the window (closed state only).
    failures: VecDeque<Instant>,
    /// When the breaker last opened.
    opened_at: Option<Instant>,
    /// Whether the half-open probe is out.
    probing: bool,
}

/// A circuit breaker (see the module docs). Thread-safe; one per step.
#[derive(Debug)]
pub struct Breaker {
    options: BreakerOptions,
    inner: Mutex<Inner>,
}

impl Breaker {
    /// A closed breaker. Fails with [`Error::InvalidOption`] for 0 failures or an empty window.
    pub fn new(options: BreakerOptions) -> Result<Breaker> {
        options.check()?;
        Ok(Breaker {
            options,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: VecDeque::new(),
                opened_at: None,
                probing: false,
            }),
        })
    }

    /// The current state (an open breaker whose cooldown has ended reads as half-open).
    pub fn state(&self) -> BreakerState {
        let inner = tern::sync::lock(&self.inner);
        match inner.state {
            BreakerState::Open if self.cooled(&inner, Instant::now()) => BreakerState::HalfOpen,
            state => state,
        }
    }

    fn cooled(&self, inner: &Inner, now: Instant) -> bool {
        inner
            .opened_at
            .is_some_and(|t| now.duration_since(t) >= self.options.cooldown)
    }

    /// Decides whether a request may run now; the caller reports its outcome with
    /// [`Breaker::record`] (with the same admission).
    pub(crate) fn admit(&self) -> Admission {
        let mut inner = tern::sync::lock(&self.inner);
        match inner.state {
            BreakerState::Closed => Admission::Run,
            BreakerState::Open if self.cooled(&inner, Instant::now()) => {
                inner.state = BreakerState::HalfOpen;
                inner.probing = true;
                Admission::Probe
            }
            BreakerState::Open => Admission::Refused,
            BreakerState::HalfOpen if !inner.probing => {
                inner.probing = true;
                Admission::Probe
            }
            BreakerState::HalfOpen => Admission::Refused,
        }
    }

    /// Records the outcome of an admitted request; returns the new state when it changed.
    pub(crate) fn record(&self, admission: Admission, ok: bool) -> Option<BreakerState> {
        let now = Instant::now();
        let mut inner = tern::sync::lock(&self.inner);
        let before = inner.state;
        match admission {
            Admission::Refused => return None,
            Admission::Probe => {
                inner.probing = false;
                if ok {
                    inner.state = BreakerState::Closed;
                    inner.failures.clear();
                    inner.opened_at = None;
                } else {
                    inner.state = BreakerState::Open;
                    inner.opened_at = Some(now);
                }
            }
            // A request admitted while closed that ends after the breaker opened (a slow
            // run) does not reopen or close it: only the probe decides then.
            Admission::Run if inner.state != BreakerState::Closed => return None,
            Admission::Run => {
                if ok {
                    return None;
                }
                inner.failures.push_back(now);
                while inner
                    .failures
                    .front()
                    .is_some_and(|&t| now.duration_since(t) > self.options.window)
                {
                    inner.failures.pop_front();
                }
                if inner.failures.len() >= self.options.failures as usize {
                    inner.state = BreakerState::Open;
                    inner.opened_at = Some(now);
                    inner.failures.clear();
                }
            }
        }
        (inner.state != before).then_some(inner.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(failures: u32, cooldown_ms: u64) -> Breaker {
        Breaker::new(
            BreakerOptions::default()
                .failures(failures)
                .cooldown(Duration::from_millis(cooldown_ms)),
        )
        .expect("valid options")
    }

    #[test]
    fn opens_after_k_failures_and_refuses() {
        let b = breaker(3, 60_000);
        for _ in 0..2 {
            assert_eq!(b.admit(), Admission::Run);
            assert_eq!(b.record(Admission::Run, false), None);
        }
        assert_eq!(
            b.record(Admission::Run, true),
            None,
            "a success does not reset"
        );
        assert_eq!(b.admit(), Admission::Run);
        assert_eq!(b.record(Admission::Run, false), Some(BreakerState::Open));
        assert_eq!(b.admit(), Admission::Refused);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn failures_outside_the_window_do_not_count() {
        let b = Breaker::new(
            BreakerOptions::default()
                .failures(2)
                .window(Duration::from_millis(20)),
        )
        .expect("valid options");
        b.record(Admission::Run, false);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.record(Admission::Run, false), None);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn half_open_lets_one_probe_through_and_its_outcome_decides() {
        let b = breaker(1, 20);
        b.record(Admission::Run, false);
        assert_eq!(b.admit(), Admission::Refused);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.admit(), Admission::Probe);
        assert_eq!(b.admit(), Admission::Refused, "only one probe at a time");
        // A slow request admitted earlier does not decide anything.
        assert_eq!(b.record(Admission::Run, true), None);
        assert_eq!(b.record(Admission::Probe, false), Some(BreakerState::Open));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.admit(), Admission::Probe);
        assert_eq!(b.record(Admission::Probe, true), Some(BreakerState::Closed));
        assert_eq!(b.admit(), Admission::Run);
    }

    #[test]
    fn zero_failures_or_window_is_refused() {
        assert!(matches!(
            Breaker::new(BreakerOptions::default().failures(0)),
            Err(Error::InvalidOption { .. })
        ));
        assert!(matches!(
            Breaker::new(BreakerOptions::default().window(Duration::ZERO)),
            Err(Error::InvalidOption { .. })
        ));
    }
}
