//! An app-shaped example: a text-orientation classifier (PP-OCR's `cls` model) with its own
//! pre- and post-processing stages traced into a telemetry buffer, then uploaded as OTLP
//! through an uploader that prints what it would send.
//!
//! `cargo run --release -p tern-examples --bin traced_classifier -- ~/.cache/tern/models/ppocr_cls/model.onnx`

use tern::telemetry::{self, TelemetryConfig, UploadBatch, UploadResult, Uploader};
use tern::{DType, Model, Session, SessionOptions, Tensor};

struct PrintingUploader;

impl Uploader for PrintingUploader {
    fn upload(&self, batch: &UploadBatch) -> UploadResult {
        for p in &batch.payloads {
            println!(
                "POST {} ({} bytes of OTLP/JSON)",
                p.signal.path(),
                p.json.len()
            );
        }
        UploadResult::Accepted
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: traced_classifier PPOCR_CLS.onnx")?;
    let dir = std::env::temp_dir().join("tern-example-telemetry");
    let buffer = telemetry::init(
        &dir,
        TelemetryConfig {
            health_sample_rate: 0.5,
            ..Default::default()
        },
    )?;
    let model = Model::load(&path)?;
    let session = Session::new(&model, SessionOptions::new())?;
    for i in 0..4 {
        let mut trace = session.trace();
        // Preprocess: a synthetic 48×192 "image", normalised to [-1, 1] as PP-OCR expects.
        let input = trace.stage("preprocess", || -> tern::Result<Tensor> {
            let mut x = Tensor::zeros(DType::F32, &[1, 3, 48, 192])?;
            for (j, v) in x.as_mut_slice::<f32>()?.iter_mut().enumerate() {
                *v = (((j * 31 + i * 7) % 255) as f32 / 127.5) - 1.0;
            }
            Ok(x)
        })?;
        let outputs = trace.run([("x", input)])?;
        let label = trace.stage("postprocess", || -> tern::Result<&str> {
            let p = outputs[0].as_slice::<f32>()?;
            Ok(if p[0] >= p[1] { "0°" } else { "180°" })
        })?;
        println!("image {i}: text at {label}");
    }
    let report = buffer.upload_pending(&PrintingUploader)?;
    println!(
        "uploaded {} records in {} batch(es)",
        report.records_accepted, report.batches_accepted
    );
    Ok(())
}
