//! `tern bench`: load time, cold start, steady-state latency percentiles and peak RSS.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use tern::{Model, Session, SessionOptions, Tensor};

/// What `tern bench` measured.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// Model file.
    pub model: String,
    /// Backend used.
    pub backend: String,
    /// Threads.
    pub threads: usize,
    /// Timed runs.
    pub runs: usize,
    /// Model::load time.
    pub load_ms: f64,
    /// Session::new time (typing, optimisation, planning).
    pub prepare_ms: f64,
    /// Load + prepare + first run: what an app waits for its first result.
    pub cold_start_ms: f64,
    /// Steady-state latency, after warm-up.
    pub median_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Fastest run.
    pub min_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Peak resident set size of the process (VmHWM), in MiB.
    pub peak_rss_mib: Option<f64>,
    /// Peak RSS minus the RSS before the model was loaded: what the model and runs cost.
    pub rss_growth_mib: Option<f64>,
    /// Input shapes used.
    pub input_shapes: BTreeMap<String, Vec<usize>>,
}

/// Benchmark settings.
pub struct BenchConfig {
    /// Session options (threads, backend).
    pub options: SessionOptions,
    /// Timed runs.
    pub runs: usize,
    /// Untimed warm-up runs.
    pub warmup: usize,
    /// Given inputs; the rest are random.
    pub inputs: Vec<(String, Tensor)>,
    /// Sizes for symbolic dimensions of random inputs (default 1).
    pub dims: BTreeMap<String, usize>,
}

/// Runs the benchmark.
pub fn bench(path: &Path, cfg: BenchConfig) -> Result<BenchReport> {
    let base_rss = proc_status_mib("VmRSS:");
    let t0 = Instant::now();
    let model = Model::load(path)?;
    let load = t0.elapsed();
    let t1 = Instant::now();
    let session = Session::new(&model, cfg.options.clone())?;
    let prepare = t1.elapsed();
    let mut inputs = cfg.inputs.clone();
    for (name, tensor) in model.random_inputs(7, &cfg.dims)? {
        if !inputs.iter().any(|(n, _)| *n == name) {
            inputs.push((name, tensor));
        }
    }
    session.run(inputs.clone())?;
    let cold = t0.elapsed();
    for _ in 0..cfg.warmup {
        session.run(inputs.clone())?;
    }
    let mut times: Vec<Duration> = Vec::with_capacity(cfg.runs);
    for _ in 0..cfg.runs.max(1) {
        let t = Instant::now();
        session.run(inputs.clone())?;
        times.push(t.elapsed());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pct = |p: f64| ms(times[((times.len() - 1) as f64 * p).round() as usize]);
    Ok(BenchReport {
        model: path.display().to_string(),
        backend: session.backend().to_string(),
        threads: session.options().threads,
        runs: times.len(),
        load_ms: ms(load),
        prepare_ms: ms(prepare),
        cold_start_ms: ms(cold),
        median_ms: pct(0.5),
        p95_ms: pct(0.95),
        p99_ms: pct(0.99),
        min_ms: ms(times[0]),
        mean_ms: times.iter().map(|d| ms(*d)).sum::<f64>() / times.len() as f64,
        peak_rss_mib: proc_status_mib("VmHWM:"),
        rss_growth_mib: proc_status_mib("VmHWM:").zip(base_rss).map(|(p, b)| p - b),
        input_shapes: inputs
            .iter()
            .map(|(n, t)| (n.clone(), t.shape().to_vec()))
            .collect(),
    })
}

/// A memory figure of this process from `/proc/self/status` (Linux), in MiB: `VmHWM:` is
/// the peak RSS, `VmRSS:` the current one.
fn proc_status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
