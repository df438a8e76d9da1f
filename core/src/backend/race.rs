//! Choosing between two ways to run a plan by timing both on its first runs.
//!
//! Which of two equivalent ways is faster often shows only when a model runs: whether
//! tract's kernels should hand work to a thread pool ([`tract`](super::tract)'s threads),
//! whether a plan for one concrete shape beats the symbolic plan. A [`Race`] runs the
//! *challenger* for a few untimed warm-up runs (first runs pay for scratch space and
//! first-touch allocations), then times it for [`RaceRules::trials`] runs back to back,
//! then the *incumbent* as many, and keeps the challenger only if its fastest run beats
//! the incumbent's fastest by [`RaceRules::margin`]: a change that does not clearly help
//! costs threads, memory or energy. Fastest runs are compared because interference from
//! elsewhere on a device only ever adds time.

use std::sync::Mutex;
use std::time::Duration;

use crate::sync::lock;

/// One of the two ways to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arm {
    /// The way kept unless the other is clearly faster.
    Incumbent,
    /// The way that must prove itself.
    Challenger,
}

/// How a race is run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RaceRules {
    /// Untimed challenger runs first.
    pub warmup: usize,
    /// Timed runs of each arm (the decision lands on run `warmup + 2 × trials`).
    pub trials: usize,
    /// The challenger wins when its fastest run is below this share of the incumbent's.
    pub margin: f64,
}

/// What a decided race found: the winner, and each arm's fastest run (zero when the race
/// was decided without running).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Outcome {
    /// The arm to use from now on.
    pub winner: Arm,
    /// The incumbent's fastest timed run.
    pub incumbent: Duration,
    /// The challenger's fastest timed run.
    pub challenger: Duration,
}

/// A choice between two arms, made by timing them (see the module docs).
#[derive(Debug)]
pub(crate) struct Race {
    rules: RaceRules,
    state: Mutex<State>,
}

#[derive(Debug)]
enum State {
    Decided(Outcome),
    Measuring {
        started: usize,
        incumbent: Vec<Duration>,
        challenger: Vec<Duration>,
    },
}

impl Race {
    /// A race to run under `rules`.
    pub(crate) fn new(rules: RaceRules) -> Self {
        Race {
            rules,
            state: Mutex::new(State::Measuring {
                started: 0,
                incumbent: Vec::with_capacity(rules.trials),
                challenger: Vec::with_capacity(rules.trials),
            }),
        }
    }

    /// A race already decided for `winner`, without timing anything.
    pub(crate) fn settled(winner: Arm) -> Self {
        Race {
            rules: RaceRules {
                warmup: 0,
                trials: 0,
                margin: 1.0,
            },
            state: Mutex::new(State::Decided(Outcome {
                winner,
                incumbent: Duration::ZERO,
                challenger: Duration::ZERO,
            })),
        }
    }

    /// The arm for the next run, and whether its time is to be [`Self::record`]ed.
    pub(crate) fn next(&self) -> (Arm, bool) {
        let mut state = lock(&self.state);
        match &mut *state {
            State::Decided(outcome) => (outcome.winner, false),
            State::Measuring { started, .. } => {
                *started += 1;
                match *started {
                    n if n <= self.rules.warmup => (Arm::Challenger, false),
                    // Challenger runs back to back, then the incumbent: a pool run right
                    // after a run alone can find its workers asleep.
                    n if n <= self.rules.warmup + self.rules.trials => (Arm::Challenger, true),
                    _ => (Arm::Incumbent, true),
                }
            }
        }
    }

    /// Records how long a timed run of `arm` took, deciding once both arms have their
    /// trials. Returns the outcome when this record decided the race.
    pub(crate) fn record(&self, arm: Arm, took: Duration) -> Option<Outcome> {
        let mut state = lock(&self.state);
        let State::Measuring {
            incumbent,
            challenger,
            ..
        } = &mut *state
        else {
            return None;
        };
        match arm {
            Arm::Incumbent => incumbent.push(took),
            Arm::Challenger => challenger.push(took),
        }
        if incumbent.len() < self.rules.trials || challenger.len() < self.rules.trials {
            return None;
        }
        let best = |runs: &[Duration]| runs.iter().min().copied().unwrap_or_default();
        let (incumbent, challenger) = (best(incumbent), best(challenger));
        let winner = if challenger.as_secs_f64() < incumbent.as_secs_f64() * self.rules.margin {
            Arm::Challenger
        } else {
            Arm::Incumbent
        };
        let outcome = Outcome {
            winner,
            incumbent,
            challenger,
        };
        *state = State::Decided(outcome);
        Some(outcome)
    }

    /// The outcome, once decided.
    #[cfg(test)]
    pub(crate) fn outcome(&self) -> Option<Outcome> {
        match &*lock(&self.state) {
            State::Decided(outcome) => Some(*outcome),
            State::Measuring { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: RaceRules = RaceRules {
        warmup: 4,
        trials: 4,
        margin: 0.95,
    };

    /// Runs the protocol with runs taking `incumbent_ms` or `challenger_ms`.
    fn race(incumbent_ms: u64, challenger_ms: u64) -> Race {
        let r = Race::new(RULES);
        let mut arms = Vec::new();
        while r.outcome().is_none() {
            let (arm, timed) = r.next();
            arms.push(arm);
            if timed {
                let ms = match arm {
                    Arm::Incumbent => incumbent_ms,
                    Arm::Challenger => challenger_ms,
                };
                r.record(arm, Duration::from_millis(ms));
            }
            assert!(
                arms.len() <= RULES.warmup + 2 * RULES.trials,
                "never decided: {arms:?}"
            );
        }
        assert_eq!(arms.len(), RULES.warmup + 2 * RULES.trials);
        assert_eq!(
            arms.iter().filter(|a| **a == Arm::Incumbent).count(),
            RULES.trials,
            "{arms:?}"
        );
        r
    }

    fn winner(r: &Race) -> Option<Arm> {
        r.outcome().map(|o| o.winner)
    }

    #[test]
    fn the_faster_arm_wins_and_the_challenger_must_win_clearly() {
        assert_eq!(winner(&race(30, 46)), Some(Arm::Incumbent));
        assert_eq!(winner(&race(102, 82)), Some(Arm::Challenger));
        // 3 % faster is within the margin: not worth the change.
        assert_eq!(winner(&race(100, 97)), Some(Arm::Incumbent));
        let r = race(102, 82);
        let outcome = r.outcome().unwrap();
        assert_eq!(outcome.incumbent, Duration::from_millis(102));
        assert_eq!(outcome.challenger, Duration::from_millis(82));
        // Decided means decided: later runs are neither timed nor switched.
        assert_eq!(r.next(), (Arm::Challenger, false));
        assert_eq!(r.record(Arm::Incumbent, Duration::from_millis(1)), None);
        assert_eq!(winner(&r), Some(Arm::Challenger));
    }

    #[test]
    fn the_fastest_run_of_each_arm_counts() {
        let r = Race::new(RULES);
        let mut times = [50u64, 9, 50, 50, 10, 60, 60, 60].into_iter();
        while r.outcome().is_none() {
            let (arm, timed) = r.next();
            if timed {
                r.record(arm, Duration::from_millis(times.next().unwrap()));
            }
        }
        // Challenger's best 9 ms against the incumbent's best 10 ms: a 10 % win.
        assert_eq!(winner(&r), Some(Arm::Challenger));
    }

    #[test]
    fn a_settled_race_never_measures() {
        let r = Race::settled(Arm::Incumbent);
        assert_eq!(r.next(), (Arm::Incumbent, false));
        assert_eq!(winner(&r), Some(Arm::Incumbent));
    }
}
