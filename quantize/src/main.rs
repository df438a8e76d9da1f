//! `tern-quantize`: fp32 ONNX → dynamic int8 or fp16-weight ONNX, with a report.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tern_quantize::{dynamic, fp16, graph, report, static_qdq, QuantizeError};

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
        /// Without --calib: this many seeded random calibration samples (smoke tests only).
        #[arg(long, default_value_t = 16)]
        calib_random: usize,
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

fn run(cli: &Cli) -> Result<(), QuantizeError> {
    let mut dims = BTreeMap::new();
    for d in &cli.dim {
        if let Some((k, v)) = d.split_once('=') {
            dims.insert(k.to_string(), v.parse().unwrap_or(1));
        }
    }
    let (input, output, converted) = match &cli.command {
        Command::Static {
            input,
            output,
            calib,
            calib_random,
            exclude,
        } => {
            let mut model = graph::load(input)?;
            let samples = if calib.is_empty() {
                report::random_eval_inputs(input, *calib_random, 0, &dims)?
            } else {
                calibration_samples(calib)?
            };
            let options = static_qdq::StaticOptions {
                exclude_nodes: exclude.iter().cloned().collect(),
                exclude_ops: exclude.iter().cloned().collect(),
            };
            let ranges = static_qdq::calibrate(&model, &samples, &options)?;
            let n = static_qdq::quantize_static(&mut model, &ranges, &options)?;
            graph::save(&model, output)?;
            (
                input,
                output,
                format!(
                    "{n} Conv/MatMul node(s) quantized to int8 (QDQ, {} calibration samples)",
                    samples.len()
                ),
            )
        }
        Command::Dynamic {
            input,
            output,
            per_tensor,
            exclude,
        } => {
            let mut model = graph::load(input)?;
            let options = dynamic::DynamicOptions {
                per_channel: !per_tensor,
                exclude_nodes: exclude.iter().cloned().collect(),
                exclude_ops: exclude.iter().cloned().collect(),
            };
            let n = dynamic::quantize_dynamic(&mut model, &options)?;
            graph::save(&model, output)?;
            (
                input,
                output,
                format!("{n} MatMul/Gemm node(s) quantized to int8"),
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
    let eval = report::random_eval_inputs(input, cli.eval, 1000, &dims)?;
    let r = report::evaluate(input, output, &eval, cli.threads, 20)?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
        return Ok(());
    }
    println!("{converted} → {}", output.display());
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
    for o in &r.outputs {
        println!(
            "output {}: cosine {:.5}, SQNR {:.1} dB, max abs {:.2e}, top-1 agreement {:.1}% ({} inputs)",
            o.name, o.cosine, o.sqnr_db, o.max_abs, o.top1_agreement * 100.0, r.eval_inputs
        );
    }
    Ok(())
}

/// `NAME=FILE.npy` arguments grouped into samples: the k-th file given per name is sample k.
fn calibration_samples(
    specs: &[String],
) -> Result<Vec<Vec<(String, tern::Tensor)>>, QuantizeError> {
    let mut samples: Vec<Vec<(String, tern::Tensor)>> = Vec::new();
    for spec in specs {
        let (name, path) = spec.split_once('=').ok_or_else(|| {
            QuantizeError::NothingToDo(format!("--calib {spec}: expected NAME=FILE.npy"))
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
