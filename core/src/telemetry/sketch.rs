//! A mergeable latency sketch: OpenTelemetry's base-2 exponential histogram at a fixed
//! scale. Bucket `i` holds values in `(2^(i/2^s), 2^((i+1)/2^s)]`; at scale 4 every
//! quantile it answers is within 2.2% of the true value, whatever the distribution, and
//! two sketches merge by adding buckets, on the device or in an OTel collector.

use std::collections::BTreeMap;

/// The scale used by tern (relative error `2^(2^-4) - 1` ≈ 4.4% bucket width, ≤ 2.2% error).
pub const SCALE: i32 = 4;

/// Exponential histogram of positive values (milliseconds for latencies).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExpHistogram {
    /// Bucket index → count.
    pub buckets: BTreeMap<i32, u64>,
    /// Values equal to zero.
    pub zero_count: u64,
    /// Number of values.
    pub count: u64,
    /// Sum of values.
    pub sum: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl ExpHistogram {
    /// An empty sketch.
    pub fn new() -> Self {
        Self {
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            ..Default::default()
        }
    }

    fn index(v: f64) -> i32 {
        // ceil(log2(v) * 2^s) - 1, per the OTel spec's mapping.
        ((v.log2() * f64::from(1 << SCALE)).ceil() as i32) - 1
    }

    fn lower_bound(index: i32) -> f64 {
        2f64.powf(f64::from(index) / f64::from(1 << SCALE))
    }

    /// Adds a value (negative and NaN values are ignored).
    pub fn record(&mut self, v: f64) {
        if v.is_nan() || v < 0.0 || !v.is_finite() {
            return;
        }
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        if v == 0.0 {
            self.zero_count += 1;
        } else {
            *self.buckets.entry(Self::index(v)).or_default() += 1;
        }
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &ExpHistogram) {
        for (i, c) in &other.buckets {
            *self.buckets.entry(*i).or_default() += c;
        }
        self.zero_count += other.zero_count;
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// The `q`-quantile (0..=1), within the sketch's relative error; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * (self.count - 1) as f64).round() as u64;
        if rank < self.zero_count {
            return Some(0.0);
        }
        let mut seen = self.zero_count;
        for (i, c) in &self.buckets {
            seen += c;
            if seen > rank {
                // Geometric middle of the bucket, clamped to what was seen.
                let mid = (Self::lower_bound(*i) * Self::lower_bound(i + 1)).sqrt();
                return Some(mid.clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    /// `(offset, counts)` of the positive buckets as OTLP wants them: contiguous from the
    /// lowest index.
    pub fn dense_buckets(&self) -> (i32, Vec<u64>) {
        let (Some(lo), Some(hi)) = (self.buckets.keys().next(), self.buckets.keys().next_back())
        else {
            return (0, Vec::new());
        };
        let counts = (*lo..=*hi)
            .map(|i| self.buckets.get(&i).copied().unwrap_or(0))
            .collect();
        (*lo, counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_relative_error() {
        let mut h = ExpHistogram::new();
        let values: Vec<f64> = (1..=10_000).map(|i| f64::from(i) * 0.01).collect();
        for v in &values {
            h.record(*v);
        }
        for q in [0.5, 0.95, 0.99] {
            let exact = values[((values.len() - 1) as f64 * q).round() as usize];
            let got = h.quantile(q).unwrap();
            assert!(
                (got - exact).abs() / exact < 0.025,
                "q{q}: {got} vs {exact}"
            );
        }
        assert_eq!(h.count, 10_000);
    }

    #[test]
    fn merging_equals_recording_everything() {
        let (mut a, mut b, mut all) = (
            ExpHistogram::new(),
            ExpHistogram::new(),
            ExpHistogram::new(),
        );
        for i in 0..1000 {
            let v = f64::from(i % 97) * 0.37;
            if i % 3 == 0 {
                a.record(v)
            } else {
                b.record(v)
            }
            all.record(v);
        }
        a.merge(&b);
        assert_eq!(a.buckets, all.buckets);
        assert_eq!((a.count, a.zero_count), (all.count, all.zero_count));
        assert_eq!(a.quantile(0.9), all.quantile(0.9));
    }

    #[test]
    fn ignores_nan_and_negative() {
        let mut h = ExpHistogram::new();
        h.record(f64::NAN);
        h.record(-1.0);
        assert_eq!(h.count, 0);
        assert_eq!(h.quantile(0.5), None);
    }
}
