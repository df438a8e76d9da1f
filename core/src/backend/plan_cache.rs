//! One cache of compiled plans keyed by the concrete input shapes (and, for plans with
//! input values folded in, those values), for both backends.
//!
//! A plan (tract's optimized plan, or a lowered GPU program) for one shape signature takes
//! tens to hundreds of milliseconds to build. The cache keeps the most recently used
//! [`CAPACITY`] of them and builds outside its own lock: a run whose shape is cached never
//! waits behind another shape's compilation, and concurrent first runs of one new shape
//! wait for a single compilation instead of each doing it.

use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::sync::lock;

/// How many plans a cache keeps.
pub(crate) const CAPACITY: usize = 8;

/// The concrete shape of every input of a run, in model input order.
pub(crate) type ShapeKey = Vec<Vec<usize>>;

/// The shapes of a run's inputs.
pub(crate) fn shape_key(inputs: &[crate::tensor::Tensor]) -> ShapeKey {
    inputs.iter().map(|t| t.shape().to_vec()).collect()
}

/// One entry: the plan once built. Its own lock is held while building, so only the
/// callers that need this very plan wait.
type Slot<P> = Arc<Mutex<Option<Arc<P>>>>;

/// The most recently used plans, by key — input shapes unless said otherwise — (most
/// recently used last).
pub(crate) struct PlanCache<P, K = ShapeKey> {
    slots: Mutex<Vec<(K, Slot<P>)>>,
    capacity: usize,
}

impl<P, K: PartialEq + Clone> Default for PlanCache<P, K> {
    /// An empty cache of [`CAPACITY`] plans.
    fn default() -> Self {
        PlanCache::new(CAPACITY)
    }
}

impl<P, K: PartialEq + Clone> PlanCache<P, K> {
    /// An empty cache of at most `capacity` plans.
    pub(crate) fn new(capacity: usize) -> Self {
        PlanCache {
            slots: Mutex::new(Vec::new()),
            capacity: capacity.max(1),
        }
    }

    /// The slot for `key` if there is one, made most recently used.
    fn find(slots: &mut Vec<(K, Slot<P>)>, key: &K) -> Option<Slot<P>> {
        let pos = slots.iter().position(|(k, _)| k == key)?;
        let entry = slots.remove(pos);
        let slot = entry.1.clone();
        slots.push(entry);
        Some(slot)
    }

    /// The slot for `key`, created (evicting the least recently used) if there is none.
    fn slot(&self, key: &K) -> Slot<P> {
        let mut slots = lock(&self.slots);
        if let Some(slot) = Self::find(&mut slots, key) {
            return slot;
        }
        if slots.len() >= self.capacity {
            slots.remove(0);
        }
        let slot = Slot::default();
        slots.push((key.clone(), slot.clone()));
        slot
    }

    /// The plan for `key` if one is built (never waits for one being built).
    pub(crate) fn get(&self, key: &K) -> Option<Arc<P>> {
        let slot = Self::find(&mut lock(&self.slots), key)?;
        let plan = slot.try_lock().ok()?.clone();
        plan
    }

    /// The plan for `key`, built by `build` on first use. A failed build leaves nothing
    /// behind: the next run of that shape tries again.
    pub(crate) fn get_or_build(
        &self,
        key: &K,
        build: impl FnOnce() -> Result<P>,
    ) -> Result<Arc<P>> {
        let slot = self.slot(key);
        let mut plan = lock(&slot);
        if let Some(plan) = &*plan {
            return Ok(plan.clone());
        }
        match build() {
            Ok(built) => Ok(plan.insert(Arc::new(built)).clone()),
            Err(e) => {
                drop(plan);
                lock(&self.slots).retain(|(_, s)| !Arc::ptr_eq(s, &slot));
                Err(e)
            }
        }
    }

    /// Drops every plan (runs being served keep theirs until they finish).
    pub(crate) fn clear(&self) {
        lock(&self.slots).clear();
    }

    /// The keys that have a built plan, least recently used first.
    pub(crate) fn keys(&self) -> Vec<K> {
        lock(&self.slots)
            .iter()
            .filter(|(_, slot)| slot.try_lock().is_ok_and(|p| p.is_some()))
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// How many shapes have a slot (built or being built).
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.slots).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn key(n: usize) -> ShapeKey {
        vec![vec![1, n]]
    }

    #[test]
    fn builds_once_per_shape_and_evicts_the_least_recently_used() {
        let cache = PlanCache::new(2);
        let builds = AtomicUsize::new(0);
        let build = |v: usize| {
            builds.fetch_add(1, Ordering::SeqCst);
            Ok(v)
        };
        assert_eq!(*cache.get_or_build(&key(1), || build(1)).unwrap(), 1);
        assert_eq!(*cache.get_or_build(&key(2), || build(2)).unwrap(), 2);
        assert_eq!(*cache.get_or_build(&key(1), || build(99)).unwrap(), 1);
        assert_eq!(builds.load(Ordering::SeqCst), 2);
        // 2 is now the least recently used: a third shape evicts it, not 1.
        cache.get_or_build(&key(3), || build(3)).unwrap();
        assert!(cache.get(&key(2)).is_none());
        assert_eq!(cache.get(&key(1)).as_deref(), Some(&1));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_failed_build_is_not_cached() {
        let cache: PlanCache<usize> = PlanCache::new(2);
        let err = cache.get_or_build(&key(1), || {
            Err(Error::InvalidOption {
                reason: "no".into(),
            })
        });
        assert!(err.is_err());
        assert_eq!(cache.len(), 0);
        assert_eq!(*cache.get_or_build(&key(1), || Ok(7)).unwrap(), 7);
    }

    #[test]
    fn a_cached_shape_does_not_wait_for_another_shapes_build() {
        let cache = Arc::new(PlanCache::new(4));
        cache.get_or_build(&key(1), || Ok(1)).unwrap();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let slow = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                cache
                    .get_or_build(&key(2), || {
                        started_tx.send(()).unwrap();
                        release_rx.recv().unwrap();
                        Ok(2)
                    })
                    .map(|p| *p)
            })
        };
        started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        // Shape 2 is being built (its builder is blocked): shape 1 is served meanwhile.
        assert_eq!(*cache.get_or_build(&key(1), || Ok(100)).unwrap(), 1);
        release_tx.send(()).unwrap();
        assert_eq!(slow.join().unwrap().unwrap(), 2);
    }
}
