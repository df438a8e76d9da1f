//! The smallest useful tern program: load a model, run it on zeros, print output shapes.
//! Also the yardstick for "what does linking tern cost" in BENCHMARKS.md.
//!
//! `cargo run --release -p tern-examples --bin minimal -- MODEL.onnx [DIM=N …]`

use tern::{DType, Dim, Model, Session, SessionOptions, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: minimal MODEL.onnx [SYMBOL=N …]")?;
    let sizes: Vec<(String, usize)> = args
        .filter_map(|a| {
            a.split_once('=')
                .and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        })
        .collect();
    let model = Model::load(&path)?;
    let session = Session::new(&model, SessionOptions::new().without_telemetry())?;
    let mut inputs = Vec::new();
    for input in model.inputs() {
        let shape: Vec<usize> = input
            .shape
            .iter()
            .flatten()
            .map(|d| match d {
                Dim::Fixed(n) => *n,
                Dim::Symbolic(s) => sizes.iter().find(|(k, _)| k == s).map_or(1, |(_, v)| *v),
            })
            .collect();
        inputs.push((
            input.name.clone(),
            Tensor::zeros(input.dtype.unwrap_or(DType::F32), &shape)?,
        ));
    }
    for (name, tensor) in session.run(inputs)?.iter() {
        println!("{name}: {} {:?}", tensor.dtype(), tensor.shape());
    }
    Ok(())
}
