//! `tern-quantize`: fp32 ONNX → dynamic int8 or fp16-weight ONNX, with a report.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tern_quantize::{dynamic, fp16, graph, report, QuantizeError};

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
    let (input, output, converted) = match &cli.command {
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
    let mut dims = BTreeMap::new();
    for d in &cli.dim {
        if let Some((k, v)) = d.split_once('=') {
            dims.insert(k.to_string(), v.parse().unwrap_or(1));
        }
    }
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
