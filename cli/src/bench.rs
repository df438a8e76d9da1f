//! `tern bench`: load time, cold start, steady-state latency percentiles and peak RSS.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
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
    /// Input shapes used (for `--vary`, the warm-up's).
    pub input_shapes: BTreeMap<String, Vec<usize>>,
    /// Sum of the timed runs.
    pub total_ms: f64,
    /// The varied axis, as given to `--vary`, when the timed runs were a stream of shapes.
    pub vary: Option<String>,
    /// What the backend had planned at the end (which shapes got a plan of their own).
    pub plans: tern::backend::PlanReport,
    /// With `--profile`: where a run's time goes.
    pub profile: Option<Profile>,
}

/// Where a run's time goes (`tern bench --profile`): every node timed, over the same
/// number of runs as the benchmark, on the calling thread.
#[derive(Debug, Serialize)]
pub struct Profile {
    /// Profiled runs.
    pub runs: usize,
    /// Time per run by op, largest first.
    pub ops: Vec<OpShare>,
    /// The nodes that take longest, largest first (at most [`TOP_NODES`]).
    pub nodes: Vec<NodeShare>,
}

/// One op's share of a profiled run.
#[derive(Debug, Serialize)]
pub struct OpShare {
    /// The op as the backend names it.
    pub op: String,
    /// Nodes running it.
    pub nodes: usize,
    /// Milliseconds per run, all its nodes together.
    pub ms: f64,
    /// Its share of the profiled run (0..=1).
    pub share: f64,
}

/// One node's share of a profiled run.
#[derive(Debug, Serialize)]
pub struct NodeShare {
    /// The node's name.
    pub node: String,
    /// Its op.
    pub op: String,
    /// Milliseconds per run.
    pub ms: f64,
}

/// Nodes listed in a profile.
pub const TOP_NODES: usize = 15;

/// Profiles `runs` runs of `inputs` and sums them up by op and by node.
fn profile(session: &Session, inputs: &[(String, Tensor)], runs: usize) -> Result<Profile> {
    let mut by_node: Vec<(String, String, Duration)> = Vec::new();
    for _ in 0..runs {
        let times = session.profile(inputs.iter().cloned())?;
        if by_node.is_empty() {
            by_node = times.into_iter().map(|t| (t.node, t.op, t.time)).collect();
        } else {
            for (slot, t) in by_node.iter_mut().zip(times) {
                slot.2 += t.time;
            }
        }
    }
    let per_run = |d: Duration| d.as_secs_f64() * 1e3 / runs as f64;
    let total: Duration = by_node.iter().map(|n| n.2).sum();
    let mut ops: BTreeMap<&str, (usize, Duration)> = BTreeMap::new();
    for (_, op, time) in &by_node {
        let entry = ops.entry(op).or_default();
        entry.0 += 1;
        entry.1 += *time;
    }
    let mut ops: Vec<OpShare> = ops
        .into_iter()
        .map(|(op, (nodes, time))| OpShare {
            op: op.to_string(),
            nodes,
            ms: per_run(time),
            share: time.as_secs_f64() / total.as_secs_f64().max(f64::MIN_POSITIVE),
        })
        .collect();
    ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    let mut nodes: Vec<NodeShare> = by_node
        .iter()
        .map(|(node, op, time)| NodeShare {
            node: node.clone(),
            op: op.clone(),
            ms: per_run(*time),
        })
        .collect();
    nodes.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    nodes.truncate(TOP_NODES);
    Ok(Profile { runs, ops, nodes })
}

/// A stream of shapes: timed run `i` stretches `input` along `axis` to
/// [`Vary::size`]`(i)` (tiling its values, then cropping), the same sequence
/// `bench/ort_bench.py --vary` uses.
#[derive(Debug, Clone)]
pub struct Vary {
    /// The input to vary.
    pub input: String,
    /// Its axis to vary.
    pub axis: usize,
    /// Smallest size.
    pub lo: usize,
    /// Largest size.
    pub hi: usize,
}

impl Vary {
    /// Parses `NAME:AXIS=LO..HI`.
    pub fn parse(spec: &str) -> Result<Vary> {
        let parsed = (|| {
            let (name, rest) = spec.split_once(':')?;
            let (axis, range) = rest.split_once('=')?;
            let (lo, hi) = range.split_once("..")?;
            let (axis, lo, hi) = (axis.parse().ok()?, lo.parse().ok()?, hi.parse().ok()?);
            (lo >= 1 && hi >= lo).then(|| Vary {
                input: name.to_string(),
                axis,
                lo,
                hi,
            })
        })();
        parsed.with_context(|| {
            format!("--vary takes NAME:AXIS=LO..HI with 1 <= LO <= HI, not {spec}")
        })
    }

    /// The size of timed run `i`: steps of 37 through the range, so that every size comes
    /// once before any repeats when the range's length is not a multiple of 37.
    pub fn size(&self, i: usize) -> usize {
        self.lo + (i * 37) % (self.hi - self.lo + 1)
    }

    /// `tensor` (f32) stretched along the axis to `size`.
    fn stretch(&self, tensor: &Tensor, size: usize) -> Result<Tensor> {
        let shape = tensor.shape();
        anyhow::ensure!(
            self.axis < shape.len() && shape[self.axis] > 0,
            "--vary axis {} is not an axis of {:?}",
            self.axis,
            shape
        );
        let values = tensor.to_f32_vec()?;
        let outer: usize = shape[..self.axis].iter().product();
        let (len, inner): (usize, usize) =
            (shape[self.axis], shape[self.axis + 1..].iter().product());
        let mut out = Vec::with_capacity(outer * size * inner);
        for o in 0..outer {
            for k in 0..size {
                let start = (o * len + k % len) * inner;
                out.extend_from_slice(&values[start..start + inner]);
            }
        }
        let mut new_shape = shape.to_vec();
        new_shape[self.axis] = size;
        Ok(Tensor::from_vec(&new_shape, out)?)
    }
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
    /// Time a stream of shapes instead of one shape.
    pub vary: Option<Vary>,
    /// After timing, profile as many runs node by node.
    pub profile: bool,
}

/// The sizes of symbolic dimensions for random inputs: `--dim`'s, and where an input's
/// shape is pinned, the pinned sizes of its symbolic dimensions (so random inputs have
/// the shape the session accepts).
fn pinned_dims(model: &Model, cfg: &BenchConfig) -> BTreeMap<String, usize> {
    let mut dims = cfg.dims.clone();
    for info in model.inputs() {
        let (Some(pinned), Some(shape)) = (
            cfg.options.inputs.pinned_shapes.get(&info.name),
            info.shape.as_ref(),
        ) else {
            continue;
        };
        for (dim, &size) in shape.iter().zip(pinned) {
            if let tern::Dim::Symbolic(symbol) = dim {
                dims.entry(symbol.clone()).or_insert(size);
            }
        }
    }
    dims
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
    for (name, tensor) in model.random_inputs(7, &pinned_dims(&model, &cfg))? {
        if !inputs.iter().any(|(n, _)| *n == name) {
            inputs.push((name, tensor));
        }
    }
    session.run(inputs.clone())?;
    let cold = t0.elapsed();
    for _ in 0..cfg.warmup {
        session.run(inputs.clone())?;
    }
    let runs = cfg.runs.max(1);
    // Every timed run's inputs, made before the clock starts.
    let stream: Vec<Vec<(String, Tensor)>> = match &cfg.vary {
        None => vec![inputs.clone(); runs],
        Some(vary) => (0..runs)
            .map(|i| {
                inputs
                    .iter()
                    .map(|(n, t)| {
                        let t = match *n == vary.input {
                            true => vary.stretch(t, vary.size(i))?,
                            false => t.clone(),
                        };
                        Ok((n.clone(), t))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?,
    };
    let mut times: Vec<Duration> = Vec::with_capacity(runs);
    for run in stream {
        let t = Instant::now();
        session.run(run)?;
        times.push(t.elapsed());
    }
    let total: Duration = times.iter().sum();
    times.sort();
    let profile = match cfg.profile {
        true => Some(profile(&session, &inputs, runs)?),
        false => None,
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pct = |p: f64| percentile_ms(&times, p);
    Ok(BenchReport {
        model: path.display().to_string(),
        backend: session.backend().to_string(),
        threads: session.options().cpu.threads,
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
        total_ms: ms(total),
        vary: cfg
            .vary
            .as_ref()
            .map(|v| format!("{}:{}={}..{}", v.input, v.axis, v.lo, v.hi)),
        plans: session.plans(),
        profile,
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

/// The `p` quantile (0 … 1) of `sorted` durations, in milliseconds (nearest rank; 0 for none).
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n => sorted[((n - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3,
    }
}
