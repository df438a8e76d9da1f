//! `tern`: the command-line face of the tern SDK for Linux and IoT devices.
//!
//! - `tern identify FILE…` — the main job on the embedded default model (content type).
//! - `tern inspect MODEL` — inputs, outputs, opsets, op histogram, parameters.
//! - `tern run MODEL --input name=file.npy|json …` — one inference, outputs as JSON.
//! - `tern bench MODEL` — load time, cold start, latency percentiles, peak RSS.
//! - `tern baseline MODEL --input … -o OUT` — store a drift baseline in the model.
//! - `tern stream MODEL --chunk IN=N [--carry OUT=IN] [--context IN=N]` — a stateful model
//!   over raw f32 samples from a file or stdin, one JSON line per chunk.
//! - `tern bench MODEL --callers 1,2,4,8` — concurrent callers, unbatched and micro-batched.
//! - `tern jobs --dir DIR submit|run|status|take` — a persistent queue of inference jobs.
//! - `tern flow FLOW.toml --input name=file …` — a cascade, fan-out or pipeline of models
//!   described in a flow file, with budgets, caches, breakers and fallbacks.
//! - `tern bundle keygen|create|sign|verify|inspect` — signed model bundles with golden
//!   samples (docs/DEPLOY.md).
//! - `tern store --dir DIR --trust KEY install|status|activate|rollback|load|update|stage|rollout`
//!   — the on-device model store, updates from a repository and staged rollouts.
//!
//! - `tern agent --models DIR [--listen 127.0.0.1:8000]` — serve a directory of models over
//!   the Open Inference Protocol (KServe v2) until SIGTERM (docs/AGENT.md).
//!
//! Every command takes `--json` for machine-readable output.

mod agent;
mod bench;
mod bundle;
mod callers;
mod flow;
mod identify;
mod store;
mod stream;
mod tensor_io;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tern::{
    Backend, GpuPrecision, Model, NanPolicy, Session, SessionOptions, ShapePolicy, ThreadPolicy,
};

#[derive(Parser)]
#[command(name = "tern", version, about = "On-device ONNX inference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Name the content type of files with the embedded default model (magika).
    Identify {
        /// Files to identify.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Use the magika model in this folder (model.onnx + config.min.json) instead of
        /// the embedded one.
        #[arg(long)]
        model_dir: Option<PathBuf>,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Describe a model: inputs, outputs, opsets, operators, parameters.
    Inspect {
        /// The ONNX model.
        model: PathBuf,
    },
    /// Run a model once on inputs from .npy or .json files.
    Run {
        /// The ONNX model.
        model: PathBuf,
        /// An input, as NAME=FILE (or FILE alone for a single-input model). Repeatable.
        #[arg(long, short)]
        input: Vec<String>,
        /// Write the outputs as JSON to this file (default: print them).
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Store a drift baseline in a model: the distribution of chosen tensors over sample
    /// inputs, which telemetry later compares live inputs and outputs against (PSI).
    Baseline {
        /// The ONNX model.
        model: PathBuf,
        /// A sample input as NAME=FILE; give each input once per sample. Repeatable.
        #[arg(long, short, required = true)]
        input: Vec<String>,
        /// A tensor to watch as NAME or NAME:AXIS (per feature along AXIS); default: every
        /// input and output.
        #[arg(long)]
        watch: Vec<String>,
        /// Bins per feature.
        #[arg(long, default_value_t = 10)]
        bins: usize,
        /// Where to write the model with its baseline.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Benchmark a model: load, cold start, latency percentiles, peak RSS.
    Bench {
        /// The ONNX model.
        model: PathBuf,
        /// Timed runs.
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// Untimed warm-up runs (with more than one thread the session's first 12 runs
        /// also decide whether the thread pool pays off).
        #[arg(long, default_value_t = 12)]
        warmup: usize,
        /// An input as NAME=FILE; inputs not given are random.
        #[arg(long, short)]
        input: Vec<String>,
        /// Size of a symbolic dimension for random inputs, as SYMBOL=N (default 1).
        #[arg(long)]
        dim: Vec<String>,
        /// Time a stream of shapes: after the warm-up, timed run i stretches input NAME
        /// along AXIS to a size in LO..HI (a fixed sequence that visits every size once),
        /// as NAME:AXIS=LO..HI.
        #[arg(long)]
        vary: Option<String>,
        /// Then profile as many runs node by node (one thread): time per op and the
        /// slowest nodes.
        #[arg(long)]
        profile: bool,
        /// Instead, serve this many concurrent callers (a list, e.g. 1,2,4,8,16), each
        /// making `--runs` requests, once calling the session directly and once through a
        /// micro-batcher: throughput and p50/p99 latency side by side.
        #[arg(long, value_delimiter = ',')]
        callers: Vec<usize>,
        /// With --callers: the batcher's largest batch, in rows.
        #[arg(long, default_value_t = 8)]
        max_batch: usize,
        /// With --callers: the batcher's window in milliseconds.
        #[arg(long, default_value_t = 2.0)]
        max_wait_ms: f64,
        /// With --callers: hold the window open for requests not yet submitted instead of
        /// running as soon as every waiting request is in.
        #[arg(long)]
        hold_window: bool,
        /// With --callers: the batcher's worker threads (batches run side by side).
        #[arg(long, default_value_t = 1)]
        workers: usize,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// A persistent queue of inference jobs: submit now, run later (e.g. from a timer or
    /// when the device is idle), collect the results; survives the process being killed.
    Jobs {
        /// The queue's directory (created if needed).
        #[arg(long)]
        dir: PathBuf,
        #[command(subcommand)]
        action: JobsAction,
    },
    /// Run a stateful model over a stream of raw little-endian f32 samples (a file or
    /// stdin), chunk by chunk with its state carried: one JSON line of outputs per chunk.
    Stream {
        /// The ONNX model.
        model: PathBuf,
        /// The streamed input and the new samples per chunk along its last axis, as IN=N.
        #[arg(long, required = true)]
        chunk: String,
        /// Feed output OUT of each chunk to input IN of the next, as OUT=IN. Repeatable.
        #[arg(long)]
        carry: Vec<String>,
        /// Prefix each chunk of input IN with the last N samples the model saw in the
        /// previous one (zeros first), as IN=N.
        #[arg(long)]
        context: Vec<String>,
        /// The samples: a file of raw f32, or - for stdin.
        #[arg(long, default_value = "-")]
        samples: PathBuf,
        /// Another input, the same for every chunk, as NAME=FILE. Repeatable.
        #[arg(long, short)]
        input: Vec<String>,
        /// Samples per second of the stream, to report the real-time factor.
        #[arg(long)]
        rate: Option<f64>,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Signed model bundles: make keys, build a bundle with golden samples, sign it,
    /// verify it as a device would, inspect it.
    Bundle {
        #[command(subcommand)]
        action: bundle::BundleAction,
    },
    /// The on-device model store: install verified bundles (golden-checked on this
    /// device), activate a version, roll back, stage a candidate and roll it out.
    Store {
        #[command(flatten)]
        args: store::StoreArgs,
        #[command(subcommand)]
        action: store::StoreAction,
    },
    /// Run a request-path flow from a flow file (TOML, or JSON for a .json file): a
    /// cascade, fan-out or pipeline of models with deadlines, budgets, result caches,
    /// circuit breakers and fallbacks (docs/FLOWS.md describes the file).
    Flow {
        /// The flow file; its models' paths are relative to it.
        file: PathBuf,
        /// The flow to run (default: the file's only flow).
        #[arg(long)]
        flow: Option<String>,
        /// An input, as NAME=FILE (.npy or .json). Repeatable.
        #[arg(long, short)]
        input: Vec<String>,
        /// Run the request this many times (the cache and breakers see every run) and
        /// report latency percentiles.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Serve a directory of models over the Open Inference Protocol (KServe v2, HTTP/JSON
    /// with binary tensors) until SIGTERM: hot reload, /metrics, bounded queue (docs/AGENT.md).
    Agent {
        #[command(flatten)]
        args: agent::AgentArgs,
    },
}

#[derive(Subcommand)]
enum JobsAction {
    /// Queue a run of MODEL (the job names the model by this path); prints the job's id.
    Submit {
        /// The ONNX model.
        model: PathBuf,
        /// An input, as NAME=FILE (or FILE alone for a single-input model). Repeatable.
        #[arg(long, short)]
        input: Vec<String>,
        /// An idempotency key (1-64 of A-Z a-z 0-9 _ .): the job's id, one job per key.
        #[arg(long)]
        key: Option<String>,
        /// high, normal or low.
        #[arg(long, default_value = "normal")]
        priority: tern_flows::Priority,
    },
    /// Run the due jobs for at most --max-ms milliseconds.
    Run {
        /// The time budget.
        #[arg(long, default_value_t = 60_000)]
        max_ms: u64,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Where a job is: pending, running, finished or unknown.
    Status {
        /// The job's id.
        id: String,
    },
    /// Collect a finished job's result (removing it from the queue), as JSON.
    Take {
        /// The job's id.
        id: String,
    },
}

#[derive(Args)]
struct SessionArgs {
    /// Threads for the CPU kernels (0 = all cores).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// With more than one thread: measure (each plan keeps the pool only if its first runs
    /// show it is faster than one thread) or always.
    #[arg(long, default_value = "measure")]
    thread_policy: ThreadPolicy,
    /// Plans for inputs with symbolic dimensions: measure (a plan per concrete shape where
    /// the first runs show it is faster and the shape recurs), symbolic or per-shape.
    #[arg(long, default_value = "measure")]
    shape_policy: ShapePolicy,
    /// Backend: cpu, gpu or auto.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// GPU float precision: auto (f16 on a hardware GPU with shader-f16), f32 or f16.
    #[arg(long, default_value = "auto")]
    gpu_precision: GpuPrecision,
    /// Let NaN through instead of failing on it (same as --nan-policy allow).
    #[arg(long)]
    allow_nan: bool,
    /// NaN handling: reject (inputs and outputs, the default), reject-inputs or allow.
    #[arg(long, conflicts_with = "allow_nan")]
    nan_policy: Option<NanPolicy>,
    /// Leave every layer to tract (no tern kernels; for comparison or as a workaround).
    #[arg(long)]
    no_tern_kernels: bool,
    /// Pin an input's shape, as NAME=D0,D1,… (lets the backend specialise). Repeatable.
    #[arg(long)]
    pin: Vec<String>,
}

impl SessionArgs {
    fn options(&self) -> Result<SessionOptions> {
        let mut options = SessionOptions::new()
            .threads(self.threads)
            .thread_policy(self.thread_policy)
            .shape_policy(self.shape_policy)
            .tern_kernels(!self.no_tern_kernels)
            .backend(self.backend)
            .gpu_precision(self.gpu_precision)
            .nan_policy(match (self.allow_nan, self.nan_policy) {
                (true, _) => NanPolicy::Allow,
                (false, policy) => policy.unwrap_or_default(),
            });
        for pin in &self.pin {
            let (name, dims) = pin.split_once('=').context("--pin takes NAME=D0,D1,…")?;
            let dims = dims
                .split(',')
                .map(|d| d.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("bad dimensions in --pin {pin}"))?;
            options = options.pin_input_shape(name, &dims);
        }
        Ok(options)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let kind = match (
                e.downcast_ref::<tern::Error>(),
                e.downcast_ref::<tern_flows::Error>(),
                e.downcast_ref::<tern_bundle::Error>(),
            ) {
                (Some(e), _, _)
                | (_, Some(tern_flows::Error::Model(e)), _)
                | (_, _, Some(tern_bundle::Error::Model(e))) => e.kind(),
                (_, Some(e), _) => e.kind().as_str(),
                (_, _, Some(e)) => e.kind(),
                _ => "cli",
            };
            if cli.json {
                let msg =
                    serde_json::json!({ "error": { "kind": kind, "message": format!("{e:#}") } });
                println!("{msg}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// A command line clap refused: help and version print as usual; anything else is an
/// `invalid_option` error like every other failure (exit 1; JSON under `--json`, clap's
/// explanation on stderr otherwise).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if std::env::args_os().any(|a| a == "--json") {
        let message = e.render().to_string();
        let message = message
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ");
        let msg = serde_json::json!({ "error": { "kind": "invalid_option", "message": message } });
        println!("{msg}");
    } else {
        let _ = e.print();
    }
    ExitCode::FAILURE
}

fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Identify {
            files,
            model_dir,
            session,
        } => {
            let identifier = identify::Identifier::new(model_dir.as_deref(), session.options()?)?;
            let found = identifier.identify(files)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                let width = found.iter().map(|f| f.path.len()).max().unwrap_or(0);
                for f in &found {
                    println!(
                        "{:width$}  {:<12} (model: {} {:.1}%)",
                        f.path,
                        f.label,
                        f.model_label,
                        f.score * 100.0
                    );
                }
                eprintln!(
                    "[magika standard_v3_3 on {}: {}]",
                    identifier.session().backend(),
                    identifier.session().backend_reason()
                );
            }
        }
        Command::Inspect { model } => {
            let model = Model::load(model)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(model.info())?);
            } else {
                print_info(&model);
            }
        }
        Command::Run {
            model,
            input,
            output,
            session,
        } => {
            let model = Model::load(model)?;
            let session = Session::new(&model, session.options()?)?;
            let inputs = parse_inputs(&model, input)?;
            let outputs = session.run(inputs)?;
            let mut map = serde_json::Map::new();
            for (name, tensor) in outputs.iter() {
                map.insert(name.to_string(), tensor.to_json()?);
            }
            let doc = serde_json::json!({
                "outputs": map,
                "backend": session.backend(),
                "backend_reason": session.backend_reason(),
                "plans": session.plans(),
            });
            match output {
                Some(path) => std::fs::write(path, serde_json::to_string(&doc)?)
                    .with_context(|| format!("writing {}", path.display()))?,
                None if cli.json => println!("{doc}"),
                None => print_outputs(&outputs)?,
            }
        }
        Command::Flow {
            file,
            flow,
            input,
            repeat,
            session,
        } => {
            let inputs = input
                .iter()
                .map(|spec| {
                    let (name, path) = spec
                        .split_once('=')
                        .with_context(|| format!("--input {spec}: use NAME=FILE"))?;
                    Ok((name.to_string(), tensor_io::read_tensor(path.as_ref())?))
                })
                .collect::<Result<Vec<_>>>()?;
            let report = flow::run(file, flow.as_deref(), inputs, *repeat, session.options()?)?;
            if cli.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                for (name, value) in &report.outputs {
                    println!("{name}: {}", preview(value));
                }
                for a in &report.answered {
                    println!("answered by {} ({})", a.step, a.what);
                }
                for m in &report.missing {
                    println!("missing     {} ({})", m.step, m.what);
                }
                println!(
                    "{} run(s): p50 {:.3} ms, p95 {:.3} ms, max {:.3} ms",
                    report.runs, report.p50_ms, report.p95_ms, report.max_ms
                );
            }
        }
        Command::Baseline {
            model,
            input,
            watch,
            bins,
            output,
        } => {
            let loaded = Model::load(model)?;
            let session = Session::new(
                &loaded,
                SessionOptions::new()
                    .without_telemetry()
                    .nan_policy(NanPolicy::Allow),
            )?;
            // The k-th file given for each input makes sample k.
            let mut samples: Vec<Vec<(String, tern::Tensor)>> = Vec::new();
            for (name, tensor) in parse_inputs(&loaded, input)? {
                match samples
                    .iter_mut()
                    .find(|s| !s.iter().any(|(n, _)| *n == name))
                {
                    Some(sample) => sample.push((name, tensor)),
                    None => samples.push(vec![(name, tensor)]),
                }
            }
            let mut seen: BTreeMap<String, Vec<tern::Tensor>> = BTreeMap::new();
            for sample in &samples {
                for (name, t) in sample {
                    seen.entry(name.clone()).or_default().push(t.clone());
                }
                for (name, t) in session.run(sample.clone())?.iter() {
                    seen.entry(name.to_string()).or_default().push(t.clone());
                }
            }
            let watched: Vec<(String, Option<i64>)> = if watch.is_empty() {
                seen.keys().map(|k| (k.clone(), None)).collect()
            } else {
                watch
                    .iter()
                    .map(|w| match w.rsplit_once(':') {
                        Some((n, a)) => Ok((
                            n.to_string(),
                            Some(
                                a.parse::<i64>()
                                    .with_context(|| format!("bad axis in {w}"))?,
                            ),
                        )),
                        None => Ok((w.clone(), None)),
                    })
                    .collect::<Result<_>>()?
            };
            let mut baseline = tern::baseline::Baseline::default();
            for (name, axis) in watched {
                let tensors = seen
                    .get(&name)
                    .with_context(|| format!("no input or output named {name:?}"))?;
                baseline
                    .tensors
                    .push(tern::baseline::TensorBaseline::from_samples(
                        &name, axis, tensors, *bins,
                    )?);
            }
            let bytes = tern::fs::read_regular(model, tern::fs::MAX_MODEL_BYTES)
                .with_context(|| format!("reading {}", model.display()))?;
            std::fs::write(output, tern::baseline::embed(&bytes, &baseline)?)
                .with_context(|| format!("writing {}", output.display()))?;
            let names: Vec<&str> = baseline.tensors.iter().map(|t| t.name.as_str()).collect();
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({ "output": output, "samples": samples.len(), "tensors": names })
                );
            } else {
                println!(
                    "baseline of {} over {} sample(s) written to {}",
                    names.join(", "),
                    samples.len(),
                    output.display()
                );
            }
        }
        Command::Bench {
            model,
            runs,
            warmup,
            input,
            dim,
            vary,
            profile,
            callers,
            max_batch,
            max_wait_ms,
            hold_window,
            workers,
            session,
        } => {
            if !callers.is_empty() {
                let loaded = Model::load(model)?;
                let mut inputs = parse_inputs(&loaded, input)?;
                for (name, tensor) in loaded.random_inputs(7, &parse_dims(dim)?)? {
                    if !inputs.iter().any(|(n, _)| *n == name) {
                        inputs.push((name, tensor));
                    }
                }
                drop(loaded);
                anyhow::ensure!(
                    max_wait_ms.is_finite() && *max_wait_ms >= 0.0,
                    "--max-wait-ms must be a number of milliseconds"
                );
                let report = callers::callers(
                    model,
                    callers::CallersConfig {
                        options: session.options()?,
                        callers: callers.clone(),
                        runs: *runs,
                        warmup: *warmup,
                        batch: tern_flows::BatchOptions::default()
                            .max_batch(*max_batch)
                            .max_wait(std::time::Duration::from_secs_f64(max_wait_ms / 1e3))
                            .eager(!hold_window)
                            .workers(*workers),
                        inputs,
                    },
                )?;
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    println!(
                        "{} — {} thread(s), batches of at most {} rows, window {} ms{}, {} worker(s)",
                        report.model,
                        report.threads,
                        report.max_batch,
                        report.max_wait_ms,
                        if report.eager { " (eager)" } else { "" },
                        report.workers
                    );
                    println!(
                        "{:>7}  {:>10} {:>8} {:>8}  {:>10} {:>8} {:>8}  {:>6}",
                        "callers",
                        "req/s",
                        "p50 ms",
                        "p99 ms",
                        "batched/s",
                        "p50 ms",
                        "p99 ms",
                        "batch"
                    );
                    for r in &report.rows {
                        println!(
                            "{:>7}  {:>10.1} {:>8.2} {:>8.2}  {:>10.1} {:>8.2} {:>8.2}  {:>6.2}",
                            r.callers,
                            r.unbatched.requests_per_s,
                            r.unbatched.p50_ms,
                            r.unbatched.p99_ms,
                            r.batched.requests_per_s,
                            r.batched.p50_ms,
                            r.batched.p99_ms,
                            r.mean_batch
                        );
                    }
                }
                return Ok(());
            }
            let vary = vary.as_deref().map(bench::Vary::parse).transpose()?;
            let loaded = Model::load(model)?;
            let inputs = parse_inputs(&loaded, input)?;
            drop(loaded);
            let dims = parse_dims(dim)?;
            let report = bench::bench(
                model,
                bench::BenchConfig {
                    options: session.options()?,
                    runs: *runs,
                    warmup: *warmup,
                    inputs,
                    dims,
                    vary,
                    profile: *profile,
                },
            )?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("model        {}", report.model);
                println!(
                    "backend      {} ({} thread(s))",
                    report.backend, report.threads
                );
                println!("inputs       {:?}", report.input_shapes);
                println!("load         {:9.2} ms", report.load_ms);
                println!("prepare      {:9.2} ms", report.prepare_ms);
                println!(
                    "cold start   {:9.2} ms  (load + prepare + first run)",
                    report.cold_start_ms
                );
                println!(
                    "median       {:9.3} ms  over {} runs",
                    report.median_ms, report.runs
                );
                println!(
                    "p95 / p99    {:9.3} / {:.3} ms",
                    report.p95_ms, report.p99_ms
                );
                println!(
                    "min / mean   {:9.3} / {:.3} ms",
                    report.min_ms, report.mean_ms
                );
                if let Some(vary) = &report.vary {
                    println!("stream       {:9.1} ms  total, {vary}", report.total_ms);
                }
                println!(
                    "plans        {:?}, {} shape(s) with a plan of their own",
                    report.plans.specialisation,
                    report.plans.concrete.len()
                );
                if let (Some(rss), Some(growth)) = (report.peak_rss_mib, report.rss_growth_mib) {
                    println!(
                        "peak RSS     {rss:9.1} MiB  ({growth:.1} MiB for the model and its runs)"
                    );
                }
                if let Some(profile) = &report.profile {
                    println!("\nprofile over {} run(s), one thread:", profile.runs);
                    println!("{:>9} {:>6} {:>6}  op", "ms/run", "share", "nodes");
                    for op in &profile.ops {
                        println!(
                            "{:9.3} {:5.1}% {:6}  {}",
                            op.ms,
                            op.share * 100.0,
                            op.nodes,
                            op.op
                        );
                    }
                    println!("\n{:>9}  slowest nodes", "ms/run");
                    for node in &profile.nodes {
                        println!("{:9.3}  {} ({})", node.ms, node.node, node.op);
                    }
                }
            }
        }
        Command::Jobs { dir, action } => jobs(dir, action, cli.json)?,
        Command::Bundle { action } => bundle::print(&bundle::run(action)?, cli.json),
        Command::Agent { args } => agent::run(args)?,
        Command::Store { args, action } => {
            let doc = store::store(args, action)?;
            match cli.json {
                true => println!("{doc}"),
                false => println!("{}", serde_json::to_string_pretty(&doc)?),
            }
        }
        Command::Stream {
            model,
            chunk,
            carry,
            context,
            samples,
            input,
            rate,
            session,
        } => {
            let (chunk_input, n) = stream::pair(chunk, "--chunk")?;
            let loaded = Model::load(model)?;
            let fixed = parse_inputs(&loaded, input)?;
            drop(loaded);
            let config = stream::StreamConfig {
                options: session.options()?,
                carries: carry
                    .iter()
                    .map(|c| stream::pair(c, "--carry"))
                    .collect::<Result<_>>()?,
                contexts: context
                    .iter()
                    .map(|c| {
                        let (i, n) = stream::pair(c, "--context")?;
                        Ok((i, n.parse().with_context(|| format!("bad --context {c}"))?))
                    })
                    .collect::<Result<_>>()?,
                chunk_input,
                chunk: n.parse().with_context(|| format!("bad --chunk {chunk}"))?,
                samples: samples.clone(),
                fixed,
                rate: *rate,
            };
            let summary = stream::stream(model, config, &mut std::io::stdout().lock())?;
            if cli.json {
                println!("{}", serde_json::json!({ "summary": summary }));
            } else {
                eprintln!(
                    "[{} chunk(s), {} sample(s){}, {:.1} ms in the model{}]",
                    summary.chunks,
                    summary.samples,
                    summary
                        .seconds
                        .map_or(String::new(), |s| format!(" = {s:.2} s")),
                    summary.model_ms,
                    summary
                        .real_time_factor
                        .map_or(String::new(), |r| format!(", real-time factor {r:.4}"))
                );
            }
        }
    }
    Ok(())
}

/// `tern jobs`.
fn jobs(dir: &std::path::Path, action: &JobsAction, json: bool) -> Result<()> {
    use tern_flows::{JobOptions, JobOutcome, JobQueue, JobStatus};
    let queue = JobQueue::open(dir, JobOptions::default())?;
    let doc = match action {
        JobsAction::Submit {
            model,
            input,
            key,
            priority,
        } => {
            let loaded = Model::load(model)?;
            let inputs = parse_inputs(&loaded, input)?;
            let name = model.to_string_lossy();
            let id = queue.submit(&name, inputs, *priority, key.as_deref())?;
            serde_json::json!({ "id": id })
        }
        JobsAction::Run { max_ms, session } => {
            let options = session.options()?;
            for name in queue.pending_models()? {
                // A model that no longer loads fails its jobs as unknown_model.
                if let Ok(model) = Model::load(&name) {
                    let session = Session::new(&model, options.clone())?;
                    queue.register(&name, std::sync::Arc::new(session));
                }
            }
            let r = queue.run_pending(std::time::Duration::from_millis(*max_ms))?;
            let recovery = queue.recovery();
            serde_json::json!({
                "succeeded": r.succeeded, "failed": r.failed, "retried": r.retried,
                "pending": r.pending, "out_of_time": r.out_of_time,
                "recovered": { "requeued": recovery.requeued, "crashed": recovery.crashed,
                               "finished": recovery.finished, "quarantined": recovery.quarantined },
            })
        }
        JobsAction::Status { id } => match queue.status(id)? {
            JobStatus::Pending { attempts } => {
                serde_json::json!({ "id": id, "status": "pending", "attempts": attempts })
            }
            JobStatus::Running => serde_json::json!({ "id": id, "status": "running" }),
            JobStatus::Finished => serde_json::json!({ "id": id, "status": "finished" }),
            JobStatus::Unknown => serde_json::json!({ "id": id, "status": "unknown" }),
        },
        // Peeked, printed, then removed: a result is never lost to a closed pipe.
        JobsAction::Take { id } => match queue.peek_result(id)? {
            None => anyhow::bail!("job {id:?} has no result (see `tern jobs status`)"),
            Some(JobOutcome::Done(outputs)) => {
                let mut map = serde_json::Map::new();
                for (name, tensor) in outputs.iter() {
                    map.insert(name.to_string(), tensor.to_json()?);
                }
                serde_json::json!({ "id": id, "status": "done", "outputs": map })
            }
            Some(JobOutcome::Failed { error, message }) => serde_json::json!({
                "id": id, "status": "failed", "error": error, "message": message,
            }),
        },
    };
    let text = match json {
        true => doc.to_string(),
        false => serde_json::to_string_pretty(&doc)?,
    };
    writeln!(std::io::stdout().lock(), "{text}").context("writing to stdout")?;
    if let JobsAction::Take { id } = action {
        queue.take_result(id)?;
    }
    Ok(())
}

/// Parses `--dim SYMBOL=N` flags.
fn parse_dims(specs: &[String]) -> Result<BTreeMap<String, usize>> {
    specs
        .iter()
        .map(|d| {
            let (k, v) = d.split_once('=').context("--dim takes SYMBOL=N")?;
            let n = v
                .parse::<usize>()
                .with_context(|| format!("bad --dim {d}"))?;
            Ok((k.to_string(), n))
        })
        .collect()
}

/// Parses `NAME=FILE` (or a bare `FILE` for single-input models) into named tensors.
fn parse_inputs(model: &Model, specs: &[String]) -> Result<Vec<(String, tern::Tensor)>> {
    specs
        .iter()
        .map(|spec| {
            let (name, file) = match spec.split_once('=') {
                Some((n, f)) => (n.to_string(), f),
                None if model.inputs().len() == 1 => {
                    (model.inputs()[0].name.clone(), spec.as_str())
                }
                None => {
                    anyhow::bail!("--input {spec}: the model has several inputs; use NAME=FILE")
                }
            };
            Ok((name, tensor_io::read_tensor(file.as_ref())?))
        })
        .collect()
}

/// One line per output: dtype, shape and the first values.
fn print_outputs(outputs: &tern::Outputs) -> Result<()> {
    for (name, tensor) in outputs.iter() {
        println!("{name}: {}", preview(&tensor.to_json()?));
    }
    Ok(())
}

/// `f32 [1, 2] [0.5, 0.25, …]` from a tensor's JSON.
fn preview(values: &serde_json::Value) -> String {
    let data = values["data"].as_array().map(Vec::len).unwrap_or(0);
    let first: Vec<String> = values["data"]
        .as_array()
        .into_iter()
        .flatten()
        .take(8)
        .map(|v| v.to_string())
        .collect();
    let more = if data > 8 { ", …" } else { "" };
    let shape: Vec<String> = values["shape"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.to_string())
        .collect();
    format!(
        "{} [{}] [{}{more}]",
        values["dtype"].as_str().unwrap_or("?"),
        shape.join(", "),
        first.join(", ")
    )
}

fn print_info(model: &Model) {
    let info = model.info();
    println!("model       {}", model.name());
    println!(
        "producer    {}",
        if info.producer.is_empty() {
            "-"
        } else {
            &info.producer
        }
    );
    let opsets: Vec<String> = info
        .opsets
        .iter()
        .map(|o| {
            format!(
                "{}:{}",
                if o.domain.is_empty() {
                    "ai.onnx"
                } else {
                    &o.domain
                },
                o.version
            )
        })
        .collect();
    println!("ir / opset  {} / {}", info.ir_version, opsets.join(", "));
    println!(
        "parameters  {} ({:.2} MiB){}",
        info.parameter_count,
        info.parameter_bytes as f64 / 1048576.0,
        if info.quantized { ", quantized" } else { "" }
    );
    for (label, tensors) in [("inputs", &info.inputs), ("outputs", &info.outputs)] {
        println!("{label}");
        for t in tensors {
            println!(
                "  {:<24} {:<6} {}",
                t.name,
                t.dtype.map_or("?", |d| d.name()),
                t.shape_string()
            );
        }
    }
    if !info.value_inputs.is_empty() {
        println!(
            "by value    {} (read as shapes, axes or parameters: the CPU plans them as \
             constants when it must, a plan per value)",
            info.value_inputs.join(", ")
        );
    }
    println!("operators   {} nodes", info.node_count);
    let mut ops: Vec<_> = info.op_histogram.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, n) in ops {
        println!("  {op:<24} {n}");
    }
    for (k, v) in &info.metadata {
        println!("meta        {k} = {v}");
    }
}
