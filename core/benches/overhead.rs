//! tern's own per-run cost: `Session::run` vs running the same optimized tract plan
//! directly (a fresh state per run, as `plan.run` does, and one state reused), on the
//! embedded magika model with the input shape pinned (so both run the same single plan).
//! Run: `cargo bench -p tern --bench overhead`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use tract_onnx::prelude::*;

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/magika/model.onnx");

fn bench(c: &mut Criterion) {
    let data: Vec<i32> = (0..2048).map(|i| i % 257).collect();

    let raw = tract_onnx::onnx()
        .model_for_path(MODEL)
        .and_then(|m| m.with_input_fact(0, i32::fact([1, 2048]).into()))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .expect("raw tract plan");
    let raw_input: TValue = tract_ndarray::Array2::from_shape_vec((1, 2048), data.clone())
        .expect("shape")
        .into_tensor()
        .into();
    c.bench_function("overhead/raw_tract", |b| {
        b.iter(|| raw.run(tvec![raw_input.clone()]).expect("run"))
    });
    // tract at its best: one run state kept across runs, as tern's pool does.
    let mut state = raw.spawn().expect("state");
    c.bench_function("overhead/raw_tract_reused_state", |b| {
        b.iter(|| state.run(tvec![raw_input.clone()]).expect("run"))
    });

    let model = tern::Model::load(MODEL).expect("model");
    let input = tern::Tensor::from_vec(&[1, 2048], data).expect("tensor");
    let dir = std::env::temp_dir().join(format!("tern-bench-overhead-{}", std::process::id()));
    let telemetry = tern::Telemetry::open(&dir, tern::telemetry::TelemetryConfig::default())
        .expect("telemetry");
    for (name, options) in [
        (
            "overhead/tern_session",
            tern::SessionOptions::new().without_telemetry(),
        ),
        (
            "overhead/tern_session_telemetry",
            tern::SessionOptions::new().telemetry(telemetry.clone()),
        ),
    ] {
        let session = tern::Session::new(&model, options.pin_input_shape("bytes", &[1, 2048]))
            .expect("session");
        c.bench_function(name, |b| {
            b.iter(|| {
                session
                    .run([("bytes", black_box(input.clone()))])
                    .expect("run")
            })
        });
    }
    let _ = telemetry.close();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
