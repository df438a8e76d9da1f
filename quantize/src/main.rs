//! `tern-quantize`: fp32 ONNX → dynamic or static int8, int4 weights, fp16 weights or a pruned model, with
//! a report of size, speed and accuracy against the original.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;
use tern_quantize::sensitivity::{self, NodeSensitivity};
use tern_quantize::{dynamic, fp16, graph, int4, prune, report, static_qdq, QuantizeError};

#[derive(Parser)]
#[command(
    name = "tern-quantize",
    version,
    about = "Quantize ONNX models for tern"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print the report as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Threads for the latency comparison.
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    /// Random evaluation input sets.
    #[arg(long, global = true, default_value_t = 16)]
    eval: usize,
    /// Size of a symbolic dimension for evaluation inputs, as SYMBOL=N.
    #[arg(long, global = true)]
    dim: Vec<String>,
    /// Evaluate on the images in this folder (through --preprocess) instead of random inputs.
    #[arg(long, global = true, requires = "preprocess")]
    eval_images: Option<PathBuf>,
    /// How images become inputs, e.g. "size=48x192,order=bgr,mean=0.5,std=0.5" (keys:
    /// size=HxW, layout=nchw|nhwc, order=rgb|bgr|gray, scale, mean, std, input).
    #[arg(long, global = true)]
    preprocess: Option<tern_quantize::images::Preprocess>,
}

#[derive(Subcommand)]
enum Command {
    /// int8 weights for MatMul/Gemm, activations quantized at run time.
    Dynamic {
        /// fp32 model.
        input: PathBuf,
        /// Where to write the quantized model.
        output: PathBuf,
        /// One scale per tensor instead of per output column.
        #[arg(long)]
        per_tensor: bool,
        /// Leave these nodes (by name) or op types in float. Repeatable.
        #[arg(long)]
        exclude: Vec<String>,
    },
    /// Static int8 (QDQ): Conv/MatMul weights int8, activations uint8 with ranges calibrated
    /// by running the fp32 model through tern.
    Static {
        /// fp32 model.
        input: PathBuf,
        /// Where to write the quantized model.
        output: PathBuf,
        /// Calibration input as NAME=FILE.npy; the k-th file per input is sample k. Repeatable.
        #[arg(long)]
        calib: Vec<String>,
        /// Calibration images (PNG/JPEG): one sample per file in this folder, turned into
        /// tensors by --preprocess.
        #[arg(long, requires = "preprocess", conflicts_with = "calib")]
        calib_images: Option<PathBuf>,
        /// Without --calib or --calib-images: this many seeded random calibration samples
        /// (smoke tests only).
        #[arg(long, default_value_t = 16)]
        calib_random: usize,
        /// Leave these nodes (by name) or op types in float. Repeatable.
        #[arg(long)]
        exclude: Vec<String>,
        /// How activation ranges are chosen: minmax, percentile[=P] (default P 99.99), or
        /// entropy (KL divergence).
        #[arg(long, default_value = "minmax")]
        method: static_qdq::Calibration,
        /// Graph form: qdq (QuantizeLinear/DequantizeLinear around float ops; faster on tract)
        /// or qoperator (QLinearConv/QLinearMatMul).
        #[arg(long, default_value = "qdq")]
        format: static_qdq::Format,
        /// One weight scale per tensor (default: per output channel, upgrading models below
        /// opset 13 to 13).
        #[arg(long)]
        per_tensor: bool,
        /// Keep the N layers that lose most accuracy when quantized alone in fp32 (runs the
        /// sensitivity analysis).
        #[arg(long, default_value_t = 0)]
        keep_fp32: usize,
        /// Print the layer-wise sensitivity table (each layer quantized alone, SQNR vs fp32).
        #[arg(long)]
        sensitivity: bool,
    },
    /// Pruning: zero the smallest weights (--sparsity) or remove whole conv channels
    /// (--channels).
    Prune {
        /// fp32 model.
        input: PathBuf,
        /// Where to write the pruned model.
        output: PathBuf,
        /// Unstructured: share of each Conv/MatMul/Gemm weight set to zero (0..1).
        #[arg(
            long,
            conflicts_with = "channels",
            required_unless_present = "channels"
        )]
        sparsity: Option<f32>,
        /// Structured: share of the channels of each prunable conv channel space removed (0..1).
        #[arg(long)]
        channels: Option<f32>,
        /// Leave these nodes (by name) or op types alone. Repeatable.
        #[arg(long)]
        exclude: Vec<String>,
    },
    /// Only the report: any candidate model (another quantizer's, say) against the original.
    Compare {
        /// The reference model.
        original: PathBuf,
        /// The model to judge.
        candidate: PathBuf,
    },
    /// Blockwise 4-bit weights for MatMul/Gemm (onnxruntime's MatMulNBits), activations
    /// in float: about 7× smaller weights for transformer layers.
    Int4 {
        /// fp32 model.
        input: PathBuf,
        /// Where to write the quantized model.
        output: PathBuf,
        /// Weights per scale along K (a power of two ≥ 16; tract keeps 32 packed in memory).
        #[arg(long, default_value_t = 32)]
        block_size: usize,
        /// Symmetric blocks (no zero points) instead of min/max ones.
        #[arg(long)]
        symmetric: bool,
        /// Leave these nodes (by name) or op types in float. Repeatable.
        #[arg(long)]
        exclude: Vec<String>,
    },
    /// fp16 weight storage, fp32 inputs, outputs and compute.
    Fp16 {
        /// fp32 model.
        input: PathBuf,
        /// Where to write the converted model.
        output: PathBuf,
        /// Keep the weights of these op types in fp32. Repeatable.
        #[arg(long)]
        block_op: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What one run did, as printed with `--json`.
#[derive(Serialize)]
struct Outcome {
    /// What changed, in words.
    transformation: String,
    /// The written model.
    output: PathBuf,
    /// Size, speed and accuracy against the original.
    report: report::Report,
    /// Layer-wise sensitivity, most sensitive first (static, when asked for).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sensitivity: Vec<NodeSensitivity>,
    /// Nodes kept in fp32 because they were the most sensitive.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    kept_fp32: Vec<String>,
}

fn parse_dims(specs: &[String]) -> Result<BTreeMap<String, usize>, QuantizeError> {
    specs
        .iter()
        .map(|d| {
            d.split_once('=')
                .and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                .ok_or_else(|| QuantizeError::BadArgument(format!("--dim {d}: expected SYMBOL=N")))
        })
        .collect()
}

/// One sample per image in `dir`, feeding `model`'s first input unless the spec names one.
fn image_samples(
    model: &std::path::Path,
    dir: &std::path::Path,
    spec: &tern_quantize::images::Preprocess,
) -> Result<Vec<Vec<(String, tern::Tensor)>>, QuantizeError> {
    let first = tern::Model::load(model)?
        .info()
        .inputs
        .first()
        .map(|i| i.name.clone())
        .unwrap_or_default();
    tern_quantize::images::samples_from_folder(dir, spec, &first)
}

fn run(cli: &Cli) -> Result<(), QuantizeError> {
    let dims = parse_dims(&cli.dim)?;
    let eval_inputs = |input: &PathBuf| match (&cli.eval_images, &cli.preprocess) {
        (Some(dir), Some(spec)) => image_samples(input, dir, spec),
        _ => report::random_eval_inputs(input, cli.eval, 1000, &dims),
    };
    let mut sensitivity = Vec::new();
    let mut kept_fp32 = Vec::new();
    let (input, output, transformation) = match &cli.command {
        Command::Static {
            input,
            output,
            calib,
            calib_random,
            calib_images,
            exclude,
            method,
            format,
            per_tensor,
            keep_fp32: keep,
            sensitivity: show,
        } => {
            let mut model = graph::load(input)?;
            let samples = match (calib_images, &cli.preprocess) {
                (Some(dir), Some(spec)) => image_samples(input, dir, spec)?,
                _ if calib.is_empty() => {
                    report::random_eval_inputs(input, *calib_random, 0, &dims)?
                }
                _ => calibration_samples(calib)?,
            };
            let mut options = static_qdq::StaticOptions {
                exclude: graph::Exclusions::by_name_or_op(exclude),
                calibration: *method,
                format: *format,
                per_tensor: *per_tensor,
                ..Default::default()
            };
            let ranges = static_qdq::calibrate(&model, &samples, &options)?;
            if *keep > 0 || *show {
                sensitivity =
                    sensitivity::analyze(&model, &ranges, &options, &eval_inputs(input)?)?;
                kept_fp32 = sensitivity
                    .iter()
                    .take(*keep)
                    .map(|s| s.node.clone())
                    .collect();
                options.exclude.nodes.extend(kept_fp32.iter().cloned());
            }
            let n = static_qdq::quantize_static(&mut model, &ranges, &options)?;
            graph::save(&model, output)?;
            (
                input,
                output,
                format!(
                    "{n} Conv/ConvTranspose/MatMul node(s) quantized to int8 ({format:?}, {method:?} calibration on {} samples{})",
                    samples.len(),
                    if kept_fp32.is_empty() { String::new() } else { format!(", {} kept fp32", kept_fp32.len()) }
                ),
            )
        }
        Command::Prune {
            input,
            output,
            sparsity,
            channels,
            exclude,
        } => {
            let mut model = graph::load(input)?;
            let options = prune::PruneOptions {
                exclude: graph::Exclusions::by_name_or_op(exclude),
            };
            let summary = match (sparsity, channels) {
                (Some(s), _) => {
                    let m = prune::prune_magnitude(&mut model, *s, &options)?;
                    format!(
                        "{} of {} weights zeroed in {} tensor(s) (magnitude pruning)",
                        m.zeroed, m.total, m.tensors
                    )
                }
                (None, Some(r)) => {
                    let c = prune::prune_channels(&mut model, *r, &options)?;
                    format!(
                        "{} of {} channels removed in {} channel space(s), {} left whole (structured pruning)",
                        c.removed, c.total, c.spaces, c.locked
                    )
                }
                (None, None) => {
                    return Err(QuantizeError::BadArgument(
                        "prune needs --sparsity or --channels".into(),
                    ))
                }
            };
            graph::save(&model, output)?;
            (input, output, summary)
        }
        Command::Compare {
            original,
            candidate,
        } => (original, candidate, "compared".to_string()),
        Command::Dynamic {
            input,
            output,
            per_tensor,
            exclude,
        } => {
            let mut model = graph::load(input)?;
            let options = dynamic::DynamicOptions {
                per_channel: !per_tensor,
                exclude: graph::Exclusions::by_name_or_op(exclude),
            };
            let n = dynamic::quantize_dynamic(&mut model, &options)?;
            graph::save(&model, output)?;
            (
                input,
                output,
                format!("{n} MatMul/Gemm node(s) quantized to int8"),
            )
        }
        Command::Int4 {
            input,
            output,
            block_size,
            symmetric,
            exclude,
        } => {
            let mut model = graph::load(input)?;
            let options = int4::Int4Options {
                block_size: *block_size,
                symmetric: *symmetric,
                exclude: graph::Exclusions::by_name_or_op(exclude),
            };
            let n = int4::quantize_int4(&mut model, &options)?;
            graph::save(&model, output)?;
            (
                input,
                output,
                format!("{n} MatMul/Gemm weight(s) quantized to 4 bits (block {block_size})"),
            )
        }
        Command::Fp16 {
            input,
            output,
            block_op,
        } => {
            let mut model = graph::load(input)?;
            let n = fp16::convert_fp16(
                &mut model,
                &block_op.iter().cloned().collect::<HashSet<_>>(),
            )?;
            graph::save(&model, output)?;
            (
                input,
                output,
                format!("{n} weight tensor(s) stored as fp16"),
            )
        }
    };
    let r = report::evaluate(input, output, &eval_inputs(input)?, cli.threads, 20)?;
    let outcome = Outcome {
        transformation,
        output: output.clone(),
        report: r,
        sensitivity,
        kept_fp32,
    };
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcome).unwrap_or_default()
        );
        return Ok(());
    }
    print_outcome(&outcome);
    Ok(())
}

fn print_outcome(outcome: &Outcome) {
    let r = &outcome.report;
    println!("{} → {}", outcome.transformation, outcome.output.display());
    println!(
        "size      {:.2} MB → {:.2} MB ({:.2}×)",
        r.size_before as f64 / 1e6,
        r.size_after as f64 / 1e6,
        r.size_ratio
    );
    println!(
        "latency   {:.3} ms → {:.3} ms ({:.2}× faster, {} thread(s), through tern)",
        r.latency_before_ms, r.latency_after_ms, r.speedup, r.threads
    );
    println!(
        "gzipped   {:.2} MB → {:.2} MB ({:.2}×)",
        r.compressed_before as f64 / 1e6,
        r.compressed_after as f64 / 1e6,
        r.compressed_after as f64 / r.compressed_before.max(1) as f64
    );
    for o in &r.outputs {
        println!(
            "output {}: cosine {:.5}, SQNR {:.1} dB, max abs {:.2e}, top-1 agreement {:.1}% ({} inputs)",
            o.name, o.cosine, o.sqnr_db, o.max_abs, o.top1_agreement * 100.0, r.eval_inputs
        );
    }
    if !outcome.sensitivity.is_empty() {
        println!("sensitivity (each layer quantized alone, most sensitive first):");
        for s in &outcome.sensitivity {
            let kept = if outcome.kept_fp32.contains(&s.node) {
                "  kept fp32"
            } else {
                ""
            };
            println!(
                "  {:<40} {:<8} SQNR {:>6.1} dB  cosine {:.5}{kept}",
                s.node, s.op, s.sqnr_db, s.cosine
            );
        }
    }
}

/// `NAME=FILE.npy` arguments grouped into samples: the k-th file given per name is sample k.
fn calibration_samples(
    specs: &[String],
) -> Result<Vec<Vec<(String, tern::Tensor)>>, QuantizeError> {
    let mut samples: Vec<Vec<(String, tern::Tensor)>> = Vec::new();
    for spec in specs {
        let (name, path) = spec.split_once('=').ok_or_else(|| {
            QuantizeError::BadArgument(format!("--calib {spec}: expected NAME=FILE.npy"))
        })?;
        let bytes = std::fs::read(path).map_err(|source| QuantizeError::Io {
            path: path.into(),
            source,
        })?;
        let tensor = tern::Tensor::from_npy(&bytes)?;
        match samples
            .iter_mut()
            .find(|s| !s.iter().any(|(n, _)| n == name))
        {
            Some(sample) => sample.push((name.to_string(), tensor)),
            None => samples.push(vec![(name.to_string(), tensor)]),
        }
    }
    Ok(samples)
}
