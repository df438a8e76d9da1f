//! Whether a plan's runs use the session's thread pool, decided by measuring them.
//!
//! tract splits a matmul across threads only above its own size thresholds, but every split
//! hands work to the pool and waits for it. On a network of many small convolutions
//! (PP-OCR's classifier and detector, 2 threads on 2 cores) those hand-offs cost more than
//! they save: the same plan runs 1.5× slower than on the calling thread alone, while a
//! matmul-heavy transformer runs 1.2–1.5× faster with the pool. Which one a model is shows
//! only when it runs, so with [`ThreadPolicy::Measure`] each plan times its first runs
//! both ways and keeps the faster.

use std::sync::Mutex;
use std::time::Duration;

use crate::session::ThreadPolicy;

/// How a run uses the threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Everything on the calling thread.
    Alone,
    /// tract's kernels may hand work to the session's pool.
    Pool,
}

/// Untimed pool runs first: the workers' first runs pay for their scratch space and
/// first-touch allocations (ppocr_rec, 2 threads on this 2-core VM: 12–14 ms for the
/// first three runs, 7.5–8 ms after).
const WARMUP: usize = 4;

/// Timed runs per mode before deciding (the decision lands on run `WARMUP + 2 × TRIALS`).
const TRIALS: usize = 4;

/// The pool is kept only when its fastest run beats the fastest alone by this factor: a
/// pool that does not clearly help costs threads and energy.
const POOL_MARGIN: f64 = 0.95;

/// One plan's choice between [`Mode::Alone`] and [`Mode::Pool`].
#[derive(Debug)]
pub(crate) struct Threading {
    state: Mutex<State>,
}

#[derive(Debug)]
enum State {
    Decided(Mode),
    Measuring {
        started: usize,
        alone: Vec<Duration>,
        pool: Vec<Duration>,
    },
}

impl Threading {
    /// The choice for a plan of a session with a thread pool (`has_pool`) under `policy`.
    pub(crate) fn new(has_pool: bool, policy: ThreadPolicy) -> Self {
        let state = match (has_pool, policy) {
            (false, _) => State::Decided(Mode::Alone),
            (true, ThreadPolicy::Always) => State::Decided(Mode::Pool),
            (true, ThreadPolicy::Measure) => State::Measuring {
                started: 0,
                alone: Vec::with_capacity(TRIALS),
                pool: Vec::with_capacity(TRIALS),
            },
        };
        Threading {
            state: Mutex::new(state),
        }
    }

    /// The mode for the next run, and whether its time is to be [`Self::record`]ed.
    pub(crate) fn next(&self) -> (Mode, bool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *state {
            State::Decided(mode) => (*mode, false),
            State::Measuring { started, .. } => {
                *started += 1;
                match *started {
                    n if n <= WARMUP => (Mode::Pool, false),
                    // Pool runs back to back, then alone: a pool run right after a run
                    // alone can find its workers asleep.
                    n if n <= WARMUP + TRIALS => (Mode::Pool, true),
                    _ => (Mode::Alone, true),
                }
            }
        }
    }

    /// Records how long a timed run in `mode` took, deciding once both modes have
    /// [`TRIALS`] runs.
    pub(crate) fn record(&self, mode: Mode, took: Duration) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let State::Measuring { alone, pool, .. } = &mut *state else {
            return;
        };
        match mode {
            Mode::Alone => alone.push(took),
            Mode::Pool => pool.push(took),
        }
        if alone.len() >= TRIALS && pool.len() >= TRIALS {
            // The fastest run of each: interference from elsewhere only ever adds time.
            let best = |runs: &[Duration]| runs.iter().min().copied().unwrap_or_default();
            let chosen = if best(pool).as_secs_f64() < best(alone).as_secs_f64() * POOL_MARGIN {
                Mode::Pool
            } else {
                Mode::Alone
            };
            tracing::debug!(
                ?chosen,
                alone_ms = best(alone).as_secs_f64() * 1e3,
                pool_ms = best(pool).as_secs_f64() * 1e3,
                "tract plan threading measured"
            );
            *state = State::Decided(chosen);
        }
    }

    /// The mode decided, if measuring is over.
    #[cfg(test)]
    fn decided(&self) -> Option<Mode> {
        match &*self.state.lock().unwrap() {
            State::Decided(mode) => Some(*mode),
            State::Measuring { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the measuring protocol with runs taking `alone_ms` or `pool_ms`.
    fn measure(alone_ms: u64, pool_ms: u64) -> Threading {
        let t = Threading::new(true, ThreadPolicy::Measure);
        let mut modes = Vec::new();
        while t.decided().is_none() {
            let (mode, timed) = t.next();
            modes.push(mode);
            if timed {
                let ms = if mode == Mode::Alone {
                    alone_ms
                } else {
                    pool_ms
                };
                t.record(mode, Duration::from_millis(ms));
            }
            assert!(
                modes.len() <= WARMUP + 2 * TRIALS,
                "never decided: {modes:?}"
            );
        }
        assert_eq!(modes.len(), WARMUP + 2 * TRIALS);
        assert_eq!(
            modes.iter().filter(|m| **m == Mode::Alone).count(),
            TRIALS,
            "{modes:?}"
        );
        t
    }

    #[test]
    fn the_faster_mode_wins_and_the_pool_must_win_clearly() {
        assert_eq!(measure(30, 46).decided(), Some(Mode::Alone));
        assert_eq!(measure(102, 82).decided(), Some(Mode::Pool));
        // 3 % faster is within the margin: not worth the pool.
        assert_eq!(measure(100, 97).decided(), Some(Mode::Alone));
        // Decided means decided: later runs are neither timed nor switched.
        let t = measure(102, 82);
        assert_eq!(t.next(), (Mode::Pool, false));
        t.record(Mode::Alone, Duration::from_millis(1));
        assert_eq!(t.decided(), Some(Mode::Pool));
    }

    #[test]
    fn one_thread_or_always_skips_measuring() {
        let t = Threading::new(false, ThreadPolicy::Measure);
        assert_eq!(t.next(), (Mode::Alone, false));
        let t = Threading::new(true, ThreadPolicy::Always);
        assert_eq!(t.next(), (Mode::Pool, false));
    }
}
