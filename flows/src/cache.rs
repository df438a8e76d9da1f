//! A result cache: outputs keyed by a SHA-256 of the model's identity and the input bytes,
//! with a time to live and a byte budget, on [`moka`]'s concurrent cache.
//!
//! One cache can be shared by several steps and flows (an embedding model's output reused
//! by two flows that run it): entries are keyed by the model's content digest
//! ([`tern::Session::model_sha256`]), so steps over the same model share hits and a changed
//! model never answers from an old entry. The same structure, without a time to live,
//! holds each step's last good result per input for the [`crate::Fallback::LastGood`]
//! fallback.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tern::{DType, Outputs, Tensor};

use crate::error::{Error, Result};

/// A cache's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOptions {
    /// How long an entry answers after it was stored (`None`: until evicted; default 60 s).
    pub ttl: Option<Duration>,
    /// The most output bytes the cache holds; least-recently-used entries are evicted
    /// first (default 16 MiB).
    pub max_bytes: u64,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            ttl: Some(Duration::from_secs(60)),
            max_bytes: 16 << 20,
        }
    }
}

impl CacheOptions {
    /// Sets [`CacheOptions::ttl`].
    pub fn ttl(mut self, ttl: Option<Duration>) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets [`CacheOptions::max_bytes`].
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }
}

/// A cache key: SHA-256 over the model identity and the inputs (names, element types,
/// shapes, bytes), independent of the inputs' order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// The key of `inputs` to the model identified by `model` (e.g. its SHA-256).
    pub fn new(model: &str, inputs: &[(String, Tensor)]) -> Result<CacheKey> {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(model.as_bytes());
        let mut sorted: Vec<&(String, Tensor)> = inputs.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, tensor) in sorted {
            field(name.as_bytes());
            field(tensor.dtype().name().as_bytes());
            let shape: Vec<u8> = tensor
                .shape()
                .iter()
                .flat_map(|d| (*d as u64).to_le_bytes())
                .collect();
            field(&shape);
            if tensor.dtype() == DType::String {
                for s in tensor.as_slice::<String>()? {
                    field(s.as_bytes());
                }
            } else {
                field(tensor.as_bytes()?);
            }
        }
        Ok(CacheKey(h.finalize().into()))
    }
}

/// Hits, misses and size of a [`ResultCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct CacheStats {
    /// Lookups that answered.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Entries held.
    pub entries: u64,
    /// Output bytes held.
    pub bytes: u64,
}

impl CacheStats {
    /// hits / (hits + misses), 0 before any lookup.
    pub fn hit_rate(&self) -> f64 {
        match self.hits + self.misses {
            0 => 0.0,
            n => self.hits as f64 / n as f64,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
}

/// A concurrent, bounded result cache (see the module docs). Cloning shares it.
#[derive(Clone)]
pub struct ResultCache {
    inner: moka::sync::Cache<CacheKey, Outputs>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for ResultCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultCache")
            .field("stats", &self.stats())
            .finish()
    }
}

/// The bytes an entry is charged for: its tensors' data (moka weighs in `u32`).
fn weigh(_: &CacheKey, outputs: &Outputs) -> u32 {
    let bytes: usize = outputs
        .iter()
        .map(|(name, t)| {
            name.len()
                + match t.as_bytes() {
                    Ok(b) => b.len(),
                    Err(_) => t
                        .as_slice::<String>()
                        .map_or(0, |s| s.iter().map(String::len).sum()),
                }
        })
        .sum();
    u32::try_from(bytes.max(1)).unwrap_or(u32::MAX)
}

impl ResultCache {
    /// An empty cache. Fails with [`Error::InvalidOption`] for a budget of 0 bytes or a
    /// time to live of 0.
    pub fn new(options: CacheOptions) -> Result<ResultCache> {
        if options.max_bytes == 0 {
            return Err(Error::InvalidOption {
                reason: "a result cache needs a byte budget above 0".into(),
            });
        }
        if options.ttl.is_some_and(|t| t.is_zero()) {
            return Err(Error::InvalidOption {
                reason: "a result cache's time to live must be longer than 0".into(),
            });
        }
        let mut builder = moka::sync::Cache::builder()
            .max_capacity(options.max_bytes)
            .weigher(weigh);
        if let Some(ttl) = options.ttl {
            builder = builder.time_to_live(ttl);
        }
        Ok(ResultCache {
            inner: builder.build(),
            counters: Arc::default(),
        })
    }

    /// The outputs stored for `key`, counted as a hit or a miss.
    pub fn get(&self, key: &CacheKey) -> Option<Outputs> {
        let found = self.inner.get(key);
        let counter = match found {
            Some(_) => &self.counters.hits,
            None => &self.counters.misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Stores `outputs` for `key` (an entry larger than the whole budget is not kept).
    pub fn insert(&self, key: CacheKey, outputs: Outputs) {
        self.inner.insert(key, outputs);
    }

    /// Drops every entry (e.g. after the app changed something the key does not cover).
    pub fn clear(&self) {
        self.inner.invalidate_all();
    }

    /// Hits, misses and size so far.
    pub fn stats(&self) -> CacheStats {
        self.inner.run_pending_tasks();
        CacheStats {
            hits: self.counters.hits.load(Ordering::Relaxed),
            misses: self.counters.misses.load(Ordering::Relaxed),
            entries: self.inner.entry_count(),
            bytes: self.inner.weighted_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, values: &[f32]) -> (String, Tensor) {
        (
            name.to_string(),
            Tensor::from_slice(&[values.len()], values).expect("tensor"),
        )
    }

    fn outputs(n: usize) -> Outputs {
        Outputs::from_pairs(vec![(
            "y".into(),
            Tensor::from_vec(&[n], vec![1.0f32; n]).expect("tensor"),
        )])
    }

    #[test]
    fn keys_cover_model_names_shapes_and_bytes_not_order() {
        let a = [input("a", &[1.0, 2.0]), input("b", &[3.0])];
        let b = [input("b", &[3.0]), input("a", &[1.0, 2.0])];
        let key = |m, i: &[(String, Tensor)]| CacheKey::new(m, i).expect("key");
        assert_eq!(key("m", &a), key("m", &b), "input order does not matter");
        assert_ne!(
            key("m", &a),
            key("other", &a),
            "the model is part of the key"
        );
        assert_ne!(
            key("m", &a),
            key("m", &[input("a", &[1.0, 2.5]), input("b", &[3.0])])
        );
        assert_ne!(
            key("m", &a),
            key("m", &[input("c", &[1.0, 2.0]), input("b", &[3.0])])
        );
        let reshaped = (
            "a".to_string(),
            Tensor::from_slice(&[1, 2], &[1.0f32, 2.0]).expect("tensor"),
        );
        assert_ne!(key("m", &a), key("m", &[reshaped, input("b", &[3.0])]));
    }

    #[test]
    fn hits_misses_ttl_and_byte_budget() {
        let cache = ResultCache::new(
            CacheOptions::default()
                .ttl(Some(Duration::from_millis(50)))
                .max_bytes(1000),
        )
        .expect("cache");
        let k = CacheKey::new("m", &[input("x", &[1.0])]).expect("key");
        assert!(cache.get(&k).is_none());
        cache.insert(k, outputs(10));
        assert!(cache.get(&k).is_some());
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.entries), (1, 1, 1));
        assert!((s.hit_rate() - 0.5).abs() < 1e-9);
        std::thread::sleep(Duration::from_millis(80));
        assert!(cache.get(&k).is_none(), "expired after its time to live");
        // 4000 bytes of output do not fit a 1000-byte budget.
        let big = CacheKey::new("m", &[input("x", &[2.0])]).expect("key");
        cache.insert(big, outputs(1000));
        // moka applies its budget on its next maintenance, which stats() runs.
        assert!(cache.stats().bytes <= 1000);
        assert!(cache.get(&big).is_none());
    }

    #[test]
    fn zero_budget_or_ttl_is_refused() {
        assert!(matches!(
            ResultCache::new(CacheOptions::default().max_bytes(0)),
            Err(Error::InvalidOption { .. })
        ));
        assert!(matches!(
            ResultCache::new(CacheOptions::default().ttl(Some(Duration::ZERO))),
            Err(Error::InvalidOption { .. })
        ));
    }
}
