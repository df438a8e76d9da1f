//! `tern flow FLOW.toml --input NAME=FILE`: a request-path flow from a flow file
//! ([`tern_flows::FlowFile`]: sessions by path, cascades, fan-outs and pipelines with
//! deadlines, budgets, caches, breakers and fallbacks), run once or `--repeat` times.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tern::{SessionOptions, Tensor};
use tern_flows::{BuildOptions, CacheStats, FlowAnswer, FlowFile, StepStats};

/// What `tern flow` reports (`--json`).
#[derive(Debug, Serialize)]
pub struct FlowReport {
    /// The flow run.
    pub flow: String,
    /// The last request's outputs, as `Tensor::to_json`.
    pub outputs: BTreeMap<String, serde_json::Value>,
    /// The last request's steps that answered, with who answered for each.
    pub answered: Vec<Answered>,
    /// The last request's fan-out steps that did not contribute.
    pub missing: Vec<Answered>,
    /// The last request's answering cascade stage.
    pub stage: Option<usize>,
    /// The last request's confidence per cascade stage that ran.
    pub confidences: Vec<f32>,
    /// Why the answer did not come from where it should have (`timeout`, `error`, …).
    pub failure: Option<String>,
    /// Requests run.
    pub runs: usize,
    /// Median latency over the runs.
    pub p50_ms: f64,
    /// 95th percentile latency.
    pub p95_ms: f64,
    /// Slowest run.
    pub max_ms: f64,
    /// Every step's counters.
    pub steps: BTreeMap<String, StepStats>,
    /// Every cache's hits, misses and size.
    pub caches: BTreeMap<String, CacheStats>,
}

/// A step and who answered for it (`model`, `cache`, `last_good`, `rule`, `default`), or
/// why it is missing.
#[derive(Debug, Serialize)]
pub struct Answered {
    /// The step.
    pub step: String,
    /// The source, or the failure for a missing step.
    pub what: &'static str,
}

/// Builds the file's flows and runs `flow` (the file's only one when `None`) `repeat`
/// times on `inputs`.
pub fn run(
    file: &Path,
    flow: Option<&str>,
    inputs: Vec<(String, Tensor)>,
    repeat: usize,
    options: SessionOptions,
) -> Result<FlowReport> {
    anyhow::ensure!(repeat > 0, "--repeat must be at least 1");
    let flows = FlowFile::load(file, BuildOptions::default().session(options))?;
    let name = match flow {
        Some(f) => f.to_string(),
        None => match flows.names().as_slice() {
            [only] => only.clone(),
            names => anyhow::bail!("the file has several flows {names:?}; pick one with --flow"),
        },
    };
    let mut times = Vec::with_capacity(repeat);
    let mut last: Option<FlowAnswer> = None;
    for _ in 0..repeat {
        let answer = flows
            .run(&name, &inputs)
            .with_context(|| format!("running flow {name:?}"))?;
        times.push(answer.elapsed);
        last = Some(answer);
    }
    let answer = last.context("no run")?;
    times.sort();
    let mut outputs = BTreeMap::new();
    for (n, t) in answer.outputs.iter() {
        outputs.insert(n.to_string(), t.to_json()?);
    }
    Ok(FlowReport {
        flow: name,
        outputs,
        answered: answer
            .answered
            .iter()
            .map(|(step, s)| Answered {
                step: step.clone(),
                what: s.as_str(),
            })
            .collect(),
        missing: answer
            .missing
            .iter()
            .map(|m| Answered {
                step: m.step.clone(),
                what: m.failure.as_str(),
            })
            .collect(),
        stage: answer.stage,
        confidences: answer.confidences,
        failure: answer.failure.as_ref().map(|f| f.as_str().to_string()),
        runs: times.len(),
        p50_ms: crate::bench::percentile_ms(&times, 0.5),
        p95_ms: crate::bench::percentile_ms(&times, 0.95),
        max_ms: times
            .last()
            .copied()
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
            * 1e3,
        steps: flows.step_stats(),
        caches: flows.cache_stats(),
    })
}
