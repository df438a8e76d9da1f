//! Choosing activation ranges for static quantization from calibration data.
//!
//! The fp32 model runs through tern on the calibration samples with every activation to
//! quantize exposed as an extra output. What happens to the values depends on the
//! [`Calibration`] method:
//! - **MinMax** keeps the smallest and largest value seen: nothing is clipped, but one
//!   outlier stretches the step for every other value.
//! - **Percentile** and **Entropy** make a second pass that builds a 2048-bin histogram over
//!   `[-max|x|, max|x|]` per activation and clip the MinMax range with it. Percentile clips
//!   `|x|` where the given share of values lies below; Entropy (KL divergence, TensorRT's
//!   method as onnxruntime implements it) picks the window around zero whose 128-bin
//!   quantized histogram loses the least information against the original.

use std::collections::{BTreeMap, HashSet};

use prost::Message;
use tract_onnx::pb;

use crate::error::{QuantizeError, Result};
use crate::graph::{self, FLOAT};

/// Per-tensor activation ranges `(min, max)` observed on calibration data.
pub type Ranges = BTreeMap<String, (f32, f32)>;

/// Histogram bins of `|x|` for Percentile and Entropy.
const BINS: usize = 2048;

/// How activation ranges are chosen from the calibration data.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Calibration {
    /// The full range seen.
    #[default]
    MinMax,
    /// Clip `|x|` at this percentile (e.g. 99.99) of the values seen.
    Percentile(f64),
    /// Clip `|x|` where the KL divergence between the original and the quantized histogram
    /// is least.
    Entropy,
}

impl std::str::FromStr for Calibration {
    type Err = QuantizeError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            QuantizeError::BadArgument(format!(
                "calibration method {s:?}: expected minmax, entropy, or percentile[=P] with 0 < P ≤ 100"
            ))
        };
        match s.to_ascii_lowercase().as_str() {
            "minmax" => Ok(Self::MinMax),
            "entropy" | "kl" => Ok(Self::Entropy),
            "percentile" => Ok(Self::Percentile(99.99)),
            other => {
                let p: f64 = other
                    .strip_prefix("percentile=")
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(bad)?;
                if p > 0.0 && p <= 100.0 {
                    Ok(Self::Percentile(p))
                } else {
                    Err(bad())
                }
            }
        }
    }
}

/// A histogram of values over `[-limit, limit]` (an even number of bins, so bin `k` and bin
/// `bins - 1 - k` hold the same magnitudes).
#[derive(Debug, Clone)]
pub struct Histogram {
    /// Upper edge of the last bin; the first bin starts at `-limit`.
    pub limit: f32,
    /// Counts per bin.
    pub counts: Vec<u64>,
}

/// Quantized bins the entropy search compares against (onnxruntime's and TensorRT's 128).
const ENTROPY_QUANTIZED_BINS: usize = 128;

impl Histogram {
    /// An empty histogram of `bins` bins (rounded up to even) over `[-limit, limit]`.
    pub fn new(limit: f32, bins: usize) -> Self {
        Self {
            limit,
            counts: vec![0; bins.max(2).next_multiple_of(2)],
        }
    }

    /// Counts the finite values of `values`.
    pub fn add(&mut self, values: &[f32]) {
        let bins = self.counts.len();
        let scale = if self.limit > 0.0 {
            bins as f32 / (2.0 * self.limit)
        } else {
            0.0
        };
        for v in values.iter().filter(|v| v.is_finite()) {
            let bin = (((v + self.limit) * scale).max(0.0) as usize).min(bins - 1);
            self.counts[bin] += 1;
        }
    }

    fn width(&self) -> f32 {
        2.0 * self.limit / self.counts.len() as f32
    }

    /// The lower edge of bin `i`.
    fn edge(&self, i: usize) -> f32 {
        -self.limit + i as f32 * self.width()
    }

    /// The smallest magnitude (a bin edge) below which `percent` % of the `|x|` lie.
    pub fn percentile(&self, percent: f64) -> f32 {
        let half = self.counts.len() / 2;
        let total: u64 = self.counts.iter().sum();
        let wanted = (total as f64 * percent / 100.0).ceil() as u64;
        let mut seen = 0;
        for j in 0..half {
            seen += self.counts[half + j] + self.counts[half - 1 - j];
            if seen >= wanted {
                return (j + 1) as f32 * self.width();
            }
        }
        self.limit
    }

    /// The window `[lo, hi]` around zero minimising KL(P‖Q), as onnxruntime's entropy
    /// calibrator (after TensorRT) chooses it: P is the histogram inside the window with the
    /// values outside folded into its end bins, Q is the window merged into 128 bins and
    /// spread back over the non-empty bins of P; both are smoothed before comparing.
    pub fn entropy_range(&self) -> (f32, f32) {
        let bins = self.counts.len();
        let zero = bins / 2;
        let half = ENTROPY_QUANTIZED_BINS / 2;
        if zero <= half {
            return (-self.limit, self.limit);
        }
        let mut best = (f64::INFINITY, (-self.limit, self.limit));
        for i in half..=zero {
            let (start, end) = (zero - i, (zero + i + 1).min(bins));
            let sliced = &self.counts[start..end];
            let mut p: Vec<f64> = sliced.iter().map(|c| *c as f64).collect();
            let last = p.len() - 1;
            p[0] += self.counts[..start].iter().sum::<u64>() as f64;
            p[last] += self.counts[end..].iter().sum::<u64>() as f64;
            let merged = sliced.len() / ENTROPY_QUANTIZED_BINS;
            let mut q = vec![0f64; p.len()];
            for k in 0..ENTROPY_QUANTIZED_BINS {
                let (a, b) = (k * merged, (k + 1) * merged);
                let mut sum: u64 = sliced[a..b].iter().sum();
                if k == ENTROPY_QUANTIZED_BINS - 1 {
                    sum += sliced[b..].iter().sum::<u64>();
                }
                let nonzero = p[a..b].iter().filter(|v| **v != 0.0).count();
                if nonzero > 0 {
                    for (qj, pj) in q[a..b].iter_mut().zip(&p[a..b]) {
                        *qj = if *pj != 0.0 {
                            sum as f64 / nonzero as f64
                        } else {
                            0.0
                        };
                    }
                }
            }
            let kl = match (smooth(&p), smooth(&q)) {
                (Some(p), Some(q)) => kl_divergence(&p, &q),
                _ => f64::INFINITY,
            };
            if kl < best.0 {
                best = (kl, (self.edge(start), self.edge(end)));
            }
        }
        best.1
    }
}

/// Moves a little mass (1e-4 per bin) into the empty bins of a histogram, taken evenly from
/// the others, so that KL divergence stays finite (onnxruntime's `smooth_distribution`).
fn smooth(p: &[f64]) -> Option<Vec<f64>> {
    const EPS: f64 = 1e-4;
    let zeros = p.iter().filter(|v| **v == 0.0).count();
    let nonzeros = p.len() - zeros;
    if nonzeros == 0 {
        return None;
    }
    let eps1 = EPS * zeros as f64 / nonzeros as f64;
    let out: Vec<f64> = p
        .iter()
        .map(|v| if *v == 0.0 { EPS } else { v - eps1 })
        .collect();
    out.iter().all(|v| *v > 0.0).then_some(out)
}

/// KL(P‖Q) of two unnormalised histograms of positive values.
fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq) = (p.iter().sum::<f64>(), q.iter().sum::<f64>());
    if sp <= 0.0 || sq <= 0.0 {
        return f64::INFINITY;
    }
    p.iter()
        .zip(q)
        .filter(|(p, _)| **p > 0.0)
        .map(|(p, q)| {
            let (p, q) = (p / sp, (q / sq).max(1e-12));
            p * (p / q).ln()
        })
        .sum()
}

/// The fp32 model loaded in a tern session with the activations to observe exposed as extra
/// outputs: built once, run once per calibration pass.
struct Probe<'a> {
    session: tern::Session,
    activations: &'a [String],
}

impl<'a> Probe<'a> {
    fn new(model: &pb::ModelProto, activations: &'a [String]) -> Result<Self> {
        let mut probe = model.clone();
        let g = graph::graph_mut(&mut probe);
        graph::constants_to_initializers(g);
        let existing: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
        for name in activations.iter().filter(|n| !existing.contains(*n)) {
            g.output.push(pb::ValueInfoProto {
                name: name.clone(),
                r#type: Some(pb::TypeProto {
                    value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                        elem_type: FLOAT,
                        shape: None,
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let tern_model = tern::Model::from_bytes(&probe.encode_to_vec())?;
        let session = tern::Session::new(
            &tern_model,
            tern::SessionOptions::new()
                .without_telemetry()
                .nan_policy(tern::NanPolicy::Allow),
        )?;
        Ok(Self {
            session,
            activations,
        })
    }

    /// Runs every sample and hands each activation's values to `observe`.
    fn observe(
        &self,
        samples: &[Vec<(String, tern::Tensor)>],
        mut observe: impl FnMut(&str, &[f32]),
    ) -> Result<()> {
        let progress = indicatif::ProgressBar::new(samples.len() as u64);
        for sample in samples {
            let outputs = self.session.run(sample.clone())?;
            for name in self.activations {
                if let Some(t) = outputs.get(name) {
                    observe(name, &t.to_f32_vec()?);
                }
            }
            progress.inc(1);
        }
        progress.finish_and_clear();
        Ok(())
    }
}

/// Runs the fp32 model through tern on `samples` and returns the range chosen by `method`
/// for each of `activations`.
pub fn calibrate(
    model: &pb::ModelProto,
    activations: &[String],
    samples: &[Vec<(String, tern::Tensor)>],
    method: Calibration,
) -> Result<Ranges> {
    if samples.is_empty() {
        return Err(QuantizeError::BadCalibration(
            "no calibration inputs".into(),
        ));
    }
    let probe = Probe::new(model, activations)?;
    let mut ranges = Ranges::new();
    probe.observe(samples, |name, values| {
        let (lo, hi) = values
            .iter()
            .filter(|v| v.is_finite())
            .fold((f32::MAX, f32::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
        let r = ranges
            .entry(name.to_string())
            .or_insert((f32::MAX, f32::MIN));
        *r = (r.0.min(lo), r.1.max(hi));
    })?;
    if let Some(name) = activations
        .iter()
        .find(|a| ranges.get(*a).is_none_or(|(lo, hi)| lo > hi))
    {
        return Err(QuantizeError::BadCalibration(format!(
            "activation {name} had no finite value on the calibration inputs"
        )));
    }
    if method == Calibration::MinMax {
        return Ok(ranges);
    }
    let mut histograms: BTreeMap<String, Histogram> = ranges
        .iter()
        .map(|(name, (lo, hi))| (name.clone(), Histogram::new(lo.abs().max(hi.abs()), BINS)))
        .collect();
    probe.observe(samples, |name, values| {
        if let Some(h) = histograms.get_mut(name) {
            h.add(values);
        }
    })?;
    for (name, (lo, hi)) in ranges.iter_mut() {
        let Some(h) = histograms.get(name) else {
            continue;
        };
        let (clip_lo, clip_hi) = match method {
            Calibration::MinMax => continue,
            Calibration::Percentile(p) => {
                let t = h.percentile(p);
                (-t, t)
            }
            Calibration::Entropy => h.entropy_range(),
        };
        // A window that misses the values altogether leaves the MinMax range.
        let (new_lo, new_hi) = (lo.max(clip_lo), hi.min(clip_hi));
        if new_lo <= new_hi {
            (*lo, *hi) = (new_lo, new_hi);
        }
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic, roughly normal sample: sums of 12 uniform values (Irwin–Hall).
    fn normalish(n: usize) -> Vec<f32> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f32 / (1u64 << 53) as f32
        };
        (0..n)
            .map(|_| (0..12).map(|_| uniform()).sum::<f32>() - 6.0)
            .collect()
    }

    #[test]
    fn methods_parse_and_bad_ones_are_refused() {
        assert_eq!(
            "minmax".parse::<Calibration>().unwrap(),
            Calibration::MinMax
        );
        assert_eq!(
            "Entropy".parse::<Calibration>().unwrap(),
            Calibration::Entropy
        );
        assert_eq!(
            "percentile=99.9".parse::<Calibration>().unwrap(),
            Calibration::Percentile(99.9)
        );
        for bad in ["percentile=0", "percentile=101", "median", "percentile=x"] {
            assert!(bad.parse::<Calibration>().is_err(), "{bad}");
        }
    }

    #[test]
    fn percentile_cuts_off_the_outliers_only() {
        let mut values = normalish(100_000);
        values.extend([80.0, -95.0]);
        let mut h = Histogram::new(95.0, BINS);
        h.add(&values);
        let t = h.percentile(99.99);
        // |N(0,1)| has 99.99 % of its mass below ~3.9; the bin width is 190/2048 ≈ 0.09.
        assert!((3.0..4.6).contains(&t), "threshold {t}");
        assert!((h.percentile(100.0) - 95.0).abs() < 1e-3);
    }

    #[test]
    fn entropy_clips_a_long_tail_and_keeps_a_uniform_range() {
        let mut values = normalish(200_000);
        values.extend([60.0; 3]);
        let mut h = Histogram::new(60.0, BINS);
        h.add(&values);
        let (lo, hi) = h.entropy_range();
        assert!(
            lo < -2.0 && hi > 2.0 && hi < 10.0,
            "normal with outliers: [{lo}, {hi}]"
        );

        let uniform: Vec<f32> = (0..100_000).map(|i| i as f32 / 100_000.0 * 5.0).collect();
        let mut h = Histogram::new(5.0, BINS);
        h.add(&uniform);
        let (_, hi) = h.entropy_range();
        assert!(hi > 4.5, "uniform: {hi} should keep nearly all of [0, 5]");
    }

    #[test]
    fn smoothing_fills_empty_bins_and_keeps_the_total() {
        let s = smooth(&[0.0, 2.0, 0.0, 2.0]).unwrap();
        assert!(s.iter().all(|v| *v > 0.0));
        assert!((s.iter().sum::<f64>() - 4.0).abs() < 1e-12);
        assert!(smooth(&[0.0, 0.0]).is_none());
    }

    #[test]
    fn kl_is_zero_for_equal_histograms_and_positive_otherwise() {
        assert!(kl_divergence(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]).abs() < 1e-12);
        assert!(kl_divergence(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) > 0.1);
        assert!(kl_divergence(&[0.0, 0.0], &[1.0, 1.0]).is_infinite());
    }
}
