//! Whether a plan's runs use the session's thread pool, decided by measuring them.
//!
//! tract splits a matmul across threads only above its own size thresholds, but every split
//! hands work to the pool and waits for it. On a network of many small convolutions
//! (PP-OCR's classifier and detector, 2 threads on 2 cores) those hand-offs cost more than
//! they save: the same plan runs 1.5× slower than on the calling thread alone, while a
//! matmul-heavy transformer runs 1.2–1.5× faster with the pool. Which one a model is shows
//! only when it runs, so with [`ThreadPolicy::Measure`] each plan races its first runs
//! with the pool (the challenger) against runs alone (the incumbent).

use crate::backend::race::{Arm, Race, RaceRules};
use crate::options::ThreadPolicy;

/// The pool's race: 4 untimed pool runs first (the workers' first runs pay for their
/// scratch space and first-touch allocations; ppocr_rec, 2 threads on this 2-core VM:
/// 12–14 ms for the first three runs, 7.5–8 ms after), 4 timed runs each way, and the
/// pool kept only when its fastest run beats the fastest alone by 5 %.
const RULES: RaceRules = RaceRules {
    warmup: 4,
    trials: 4,
    margin: 0.95,
};

/// The arm that runs with the pool.
pub(crate) const POOL: Arm = Arm::Challenger;

/// The threading choice for a plan of a session with a thread pool (`has_pool`) under
/// `policy`.
pub(crate) fn threading(has_pool: bool, policy: ThreadPolicy) -> Race {
    match (has_pool, policy) {
        (false, _) => Race::settled(Arm::Incumbent),
        (true, ThreadPolicy::Always) => Race::settled(POOL),
        (true, ThreadPolicy::Measure) => Race::new(RULES),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_or_always_skips_measuring() {
        assert_eq!(
            threading(false, ThreadPolicy::Measure).next(),
            (Arm::Incumbent, false)
        );
        assert_eq!(threading(true, ThreadPolicy::Always).next(), (POOL, false));
        assert_eq!(threading(true, ThreadPolicy::Measure).next(), (POOL, false));
    }
}
