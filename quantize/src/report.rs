//! Comparing a transformed model with the original through tern: size, latency at the same
//! thread count, and accuracy on held-out inputs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use tern::{Model, Outputs, Session, SessionOptions, Tensor};

use crate::error::Result;

/// Accuracy of one output against the original model's.
#[derive(Debug, Clone, Serialize)]
pub struct OutputAccuracy {
    /// Output name.
    pub name: String,
    /// Cosine similarity of all values (1 = identical direction).
    pub cosine: f64,
    /// Signal-to-quantization-noise ratio in dB.
    pub sqnr_db: f64,
    /// Largest absolute difference.
    pub max_abs: f64,
    /// Share of rows (last axis) whose argmax agrees: top-1 agreement for classifiers.
    pub top1_agreement: f64,
}

/// Size, speed and accuracy of `after` against `before`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Bytes of the original model.
    pub size_before: u64,
    /// Bytes of the transformed model.
    pub size_after: u64,
    /// `size_after / size_before`.
    pub size_ratio: f64,
    /// Bytes of the original model gzip-compressed (what a download ships).
    pub compressed_before: u64,
    /// Bytes of the transformed model gzip-compressed.
    pub compressed_after: u64,
    /// Median latency of the original through tern, ms.
    pub latency_before_ms: f64,
    /// Median latency of the transformed model, ms.
    pub latency_after_ms: f64,
    /// `latency_before / latency_after` (above 1: faster).
    pub speedup: f64,
    /// Threads both ran with.
    pub threads: usize,
    /// Evaluation inputs used.
    pub eval_inputs: usize,
    /// Per output.
    pub outputs: Vec<OutputAccuracy>,
}

/// Running sums for one output's accuracy figures.
#[derive(Default)]
struct Sums {
    dot: f64,
    ref_sq: f64,
    new_sq: f64,
    err_sq: f64,
    max_abs: f64,
    agree: usize,
    rows: usize,
}

/// Accumulates the accuracy of a candidate model's outputs against reference outputs over
/// many input sets.
#[derive(Default)]
pub struct AccuracyMeter {
    sums: BTreeMap<String, Sums>,
}

impl AccuracyMeter {
    /// Adds one input set's outputs: `reference` from the original, `candidate` from the
    /// transformed model (matched by name).
    pub fn add(&mut self, reference: &Outputs, candidate: &Outputs) -> Result<()> {
        for (name, r) in reference.iter() {
            let Some(c) = candidate.get(name) else {
                continue;
            };
            let (a, b) = (r.to_f32_vec()?, c.to_f32_vec()?);
            let e = self.sums.entry(name.to_string()).or_default();
            let width = r.shape().last().copied().unwrap_or(a.len()).max(1);
            for (x, y) in a.iter().zip(&b) {
                let (x, y) = (f64::from(*x), f64::from(*y));
                e.dot += x * y;
                e.ref_sq += x * x;
                e.new_sq += y * y;
                e.err_sq += (x - y) * (x - y);
                e.max_abs = e.max_abs.max((x - y).abs());
            }
            let argmax = |r: &[f32]| {
                r.iter()
                    .enumerate()
                    .max_by(|p, q| p.1.total_cmp(q.1))
                    .map(|(i, _)| i)
            };
            for (ra, rb) in a.chunks(width).zip(b.chunks(width)) {
                e.agree += usize::from(argmax(ra) == argmax(rb));
                e.rows += 1;
            }
        }
        Ok(())
    }

    /// The figures per output, by name.
    pub fn finish(self) -> Vec<OutputAccuracy> {
        self.sums
            .into_iter()
            .map(|(name, a)| OutputAccuracy {
                name,
                cosine: a.dot / (a.ref_sq.sqrt() * a.new_sq.sqrt()).max(f64::MIN_POSITIVE),
                sqnr_db: 10.0 * (a.ref_sq / a.err_sq.max(f64::MIN_POSITIVE)).log10(),
                max_abs: a.max_abs,
                top1_agreement: a.agree as f64 / a.rows.max(1) as f64,
            })
            .collect()
    }
}

/// Session options for comparisons: no telemetry, NaN allowed through (a broken candidate
/// should show as bad accuracy, not as an error).
pub fn session_options(threads: usize) -> SessionOptions {
    SessionOptions::new()
        .threads(threads)
        .without_telemetry()
        .nan_policy(tern::NanPolicy::Allow)
}

fn median_ms(session: &Session, inputs: &[(String, Tensor)], runs: usize) -> Result<f64> {
    session.run(inputs.to_vec())?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        session.run(inputs.to_vec())?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Evaluates `after` against `before` on `eval` input sets (`runs` timed runs each side).
pub fn evaluate(
    before: &Path,
    after: &Path,
    eval: &[Vec<(String, Tensor)>],
    threads: usize,
    runs: usize,
) -> Result<Report> {
    let (m0, m1) = (Model::load(before)?, Model::load(after)?);
    let s0 = Session::new(&m0, session_options(threads))?;
    let s1 = Session::new(&m1, session_options(threads))?;
    let mut meter = AccuracyMeter::default();
    let progress = indicatif::ProgressBar::new(eval.len() as u64);
    for inputs in eval {
        meter.add(&s0.run(inputs.clone())?, &s1.run(inputs.clone())?)?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    let first = eval.first().cloned().unwrap_or_default();
    let (l0, l1) = (median_ms(&s0, &first, runs)?, median_ms(&s1, &first, runs)?);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (b, a) = (size(before), size(after));
    let (cb, ca) = (compressed_size(before)?, compressed_size(after)?);
    Ok(Report {
        size_before: b,
        size_after: a,
        size_ratio: a as f64 / b.max(1) as f64,
        compressed_before: cb,
        compressed_after: ca,
        latency_before_ms: l0,
        latency_after_ms: l1,
        speedup: l0 / l1,
        threads,
        eval_inputs: eval.len(),
        outputs: meter.finish(),
    })
}

/// Bytes of the file at `path` once gzip-compressed (default level).
pub fn compressed_size(path: &Path) -> Result<u64> {
    use std::io::Write;
    let io = |source| crate::QuantizeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&bytes).map_err(io)?;
    Ok(gz.finish().map_err(io)?.len() as u64)
}

/// `n` seeded random input sets for `model` (seeds `seed..seed + n`).
pub fn random_eval_inputs(
    model: &Path,
    n: usize,
    seed: u64,
    dims: &BTreeMap<String, usize>,
) -> Result<Vec<Vec<(String, Tensor)>>> {
    let m = Model::load(model)?;
    let symbols: Vec<&str> = m
        .info()
        .inputs
        .iter()
        .flat_map(|i| i.shape.iter().flatten())
        .filter_map(|d| match d {
            tern::Dim::Symbolic(s) => Some(s.as_str()),
            tern::Dim::Fixed(_) => None,
        })
        .collect();
    // A misspelt symbol would silently leave its dimension at 1.
    if let Some(unknown) = dims.keys().find(|k| !symbols.contains(&k.as_str())) {
        return Err(crate::QuantizeError::BadArgument(format!(
            "--dim {unknown}: the model's inputs have no such symbol (they have: {})",
            symbols.join(", ")
        )));
    }
    (0..n as u64)
        .map(|i| Ok(m.random_inputs(seed + i, dims)?))
        .collect()
}
