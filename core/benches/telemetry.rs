//! Cost of recording into the telemetry buffer, and of a session run with telemetry on vs
//! off. Run: `cargo bench -p tern --bench telemetry`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use tern::telemetry::{AttrValue, Outcome, Record, SpanRecord, Telemetry, TelemetryConfig};
use tern::{Model, Session, SessionOptions, Tensor};

fn span() -> Record {
    Record::Span(SpanRecord {
        trace_id: "0123456789abcdef0123456789abcdef".into(),
        start_ns: 1,
        model: "model".into(),
        version: "1".into(),
        backend: tern::Backend::Cpu,
        stages: vec![("model".into(), 1000)],
        outcome: Outcome::Ok,
        labels: Vec::new(),
    })
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("tern-bench-telemetry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A large queue and cap so the benchmark measures recording, not dropping.
    let config = TelemetryConfig {
        queue_capacity: 1 << 20,
        max_bytes: 1 << 30,
        ..Default::default()
    };
    let telemetry = Telemetry::open(&dir, config).expect("open telemetry");
    c.bench_function("telemetry/record_span", |b| {
        b.iter(|| telemetry.record(black_box(span())))
    });
    c.bench_function("telemetry/counter", |b| {
        b.iter(|| telemetry.counter("app.count", 1, &[("screen", AttrValue::from("home"))]))
    });

    // Telemetry's share of a real run (magika, 1 thread).
    let model_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/magika/model.onnx");
    let model = Model::load(model_path).expect("magika model");
    let input = Tensor::from_vec(&[1, 2048], (0..2048).map(|i| i % 257).collect::<Vec<i32>>())
        .expect("input");
    for (name, options) in [
        (
            "session_run/magika/telemetry_off",
            SessionOptions::new().without_telemetry(),
        ),
        (
            "session_run/magika/telemetry_on",
            SessionOptions::new().telemetry(telemetry.clone()),
        ),
    ] {
        let session = Session::new(&model, options).expect("session");
        c.bench_function(name, |b| {
            b.iter(|| session.run([("bytes", input.clone())]).expect("run"))
        });
    }
    let _ = telemetry.close();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
