//! `tern bench --callers 1,2,4,…`: throughput and latency of concurrent callers, each
//! calling the session directly (unbatched) and through a `tern_flows::Batcher`, on one
//! session with the same options, side by side in one process.

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use tern::{Model, Session, SessionOptions, Tensor};
use tern_flows::{BatchOptions, Batcher};

/// Settings of a concurrent-callers benchmark.
pub struct CallersConfig {
    /// Session options (threads, backend), the same for both ways.
    pub options: SessionOptions,
    /// Caller counts to measure.
    pub callers: Vec<usize>,
    /// Requests per caller, each way.
    pub runs: usize,
    /// Untimed warm-up runs of the session.
    pub warmup: usize,
    /// The batcher's options.
    pub batch: BatchOptions,
    /// Inputs of one request (one row along the batch axis).
    pub inputs: Vec<(String, Tensor)>,
}

/// One way of serving N callers, measured.
#[derive(Debug, Serialize)]
pub struct Served {
    /// Requests answered per second, all callers together.
    pub requests_per_s: f64,
    /// Median latency of one request (ms).
    pub p50_ms: f64,
    /// 99th percentile latency (ms).
    pub p99_ms: f64,
}

/// One caller count.
#[derive(Debug, Serialize)]
pub struct CallersRow {
    /// Concurrent callers.
    pub callers: usize,
    /// Each caller calling `Session::run`.
    pub unbatched: Served,
    /// Each caller calling `Batcher::run`.
    pub batched: Served,
    /// Mean requests per session run in the batched case.
    pub mean_batch: f64,
}

/// What `tern bench --callers` measured.
#[derive(Debug, Serialize)]
pub struct CallersReport {
    /// Model file.
    pub model: String,
    /// Session threads.
    pub threads: usize,
    /// The batcher's largest batch (rows).
    pub max_batch: usize,
    /// The batcher's window (ms).
    pub max_wait_ms: f64,
    /// Whether the batcher runs as soon as every waiting request is in.
    pub eager: bool,
    /// The batcher's worker threads.
    pub workers: usize,
    /// Requests per caller, each way.
    pub runs: usize,
    /// One row per caller count.
    pub rows: Vec<CallersRow>,
}

/// `callers` threads released together, each making `runs` calls of `call`.
fn serve(callers: usize, runs: usize, call: impl Fn() -> Result<()> + Sync) -> Result<Served> {
    let barrier = Barrier::new(callers);
    let start = Instant::now();
    let mut latencies: Vec<Duration> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..callers)
            .map(|_| {
                scope.spawn(|| -> Result<Vec<Duration>> {
                    barrier.wait();
                    (0..runs)
                        .map(|_| {
                            let t = Instant::now();
                            call().map(|()| t.elapsed())
                        })
                        .collect()
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| anyhow::anyhow!("a caller thread panicked"))?
            })
            .collect::<Result<Vec<Vec<Duration>>>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    let wall = start.elapsed();
    latencies.sort();
    Ok(Served {
        requests_per_s: latencies.len() as f64 / wall.as_secs_f64(),
        p50_ms: crate::bench::percentile_ms(&latencies, 0.5),
        p99_ms: crate::bench::percentile_ms(&latencies, 0.99),
    })
}

/// Runs the benchmark.
pub fn callers(path: &Path, cfg: CallersConfig) -> Result<CallersReport> {
    let model = Model::load(path)?;
    let session = Arc::new(Session::new(&model, cfg.options.clone())?);
    for _ in 0..cfg.warmup.max(1) {
        session.run(cfg.inputs.clone())?;
    }
    let runs = cfg.runs.max(1);
    let mut rows = Vec::new();
    for &n in &cfg.callers {
        let unbatched = serve(n, runs, || {
            session.run(cfg.inputs.clone())?;
            Ok(())
        })?;
        let batcher = Batcher::new(session.clone(), cfg.batch.clone())?;
        // Warm the batched shapes' plans before timing.
        serve(n, 2, || {
            batcher.run(cfg.inputs.clone())?;
            Ok(())
        })?;
        let before = batcher.stats();
        let batched = serve(n, runs, || {
            batcher.run(cfg.inputs.clone())?;
            Ok(())
        })?;
        let after = batcher.stats();
        rows.push(CallersRow {
            callers: n,
            unbatched,
            batched,
            mean_batch: (after.requests - before.requests) as f64
                / (after.runs - before.runs).max(1) as f64,
        });
    }
    Ok(CallersReport {
        model: path.display().to_string(),
        threads: session.options().cpu.threads,
        max_batch: cfg.batch.max_batch,
        max_wait_ms: cfg.batch.max_wait.as_secs_f64() * 1e3,
        eager: cfg.batch.eager,
        workers: cfg.batch.workers,
        runs,
        rows,
    })
}
