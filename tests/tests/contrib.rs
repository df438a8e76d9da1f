//! onnxruntime's `com.microsoft` contrib ops — the ones its quantizer (QOperator form), graph
//! optimizer and transformer optimizer write — one model each, generated with onnxruntime's
//! outputs by `scripts/contrib_cases.py` (run by `scripts/fetch-models`), through tern's CPU
//! backend. Ops tract lacks are rewritten to standard ONNX at load (`tern::model`'s
//! `contrib`); every case must match onnxruntime: float outputs to 1e-4 absolute / 1e-3
//! relative, quantized ones to one quantization step.

use tern::{Backend, NanPolicy, SessionOptions};
use tern_tests::node_suite::{manifest_in, run_cases_in};
use tern_tests::reports_dir;

#[test]
fn contrib_ops_match_onnxruntime() {
    let manifest = manifest_in("contrib-ops");
    let names: Vec<&String> = manifest.keys().collect();
    assert!(names.len() >= 25, "only {} contrib cases", names.len());
    let options = SessionOptions::new()
        .backend(Backend::Cpu)
        .nan_policy(NanPolicy::Allow)
        .without_telemetry();
    let results = run_cases_in("contrib-ops", &manifest, &names, &options);
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| format!("{}: {}", r.name, r.reason))
        .collect();
    let summary = format!(
        "onnxruntime contrib ops: {}/{} single-op models match onnxruntime (tests/tests/contrib.rs)",
        results.len() - failed.len(),
        results.len()
    );
    println!("{summary}");
    let report = serde_json::json!({ "summary": summary, "cases": results });
    std::fs::write(reports_dir().join("contrib.json"), report.to_string()).unwrap();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
