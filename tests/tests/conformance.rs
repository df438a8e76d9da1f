//! The ONNX backend node test suite (generated from the `onnx` wheel by
//! `scripts/fetch-models`) run through tern on the CPU backend (`tests/tests/gpu.rs` runs
//! its cases for the GPU's ops through the GPU backend).
//!
//! Every case either passes or is listed in `tests/conformance/expected_failures.txt`. A
//! listed case that passes, or an unlisted one that fails, fails this test: regressions
//! are caught and progress is never silent. `TERN_BLESS=1` rewrites the list and
//! `docs/CONFORMANCE.md` from the current results.

use std::collections::BTreeMap;

use tern::{Backend, NanPolicy, SessionOptions};
use tern_tests::node_suite::{check_expected_failures, manifest, per_op, run_cases};
use tern_tests::{reports_dir, workspace};

#[test]
fn onnx_node_suite() {
    let manifest = manifest();
    let names: Vec<&String> = manifest.keys().collect();
    let options = SessionOptions::new()
        .backend(Backend::Cpu)
        .nan_policy(NanPolicy::Allow)
        .without_telemetry();
    let results = run_cases(&manifest, &names, &options);
    let per_op = per_op(&results);
    let passed = results.iter().filter(|r| r.passed).count();
    let full_ops = per_op.values().filter(|(p, t)| p == t).count();
    let summary = format!(
        "ONNX node conformance: {passed}/{} cases pass ({:.1}%); {full_ops}/{} ops pass all their cases",
        results.len(),
        100.0 * passed as f64 / results.len() as f64,
        per_op.len()
    );
    println!("{summary}");
    for (op, (p, t)) in &per_op {
        if p != t {
            println!("  {op:<32} {p}/{t}");
        }
    }
    std::fs::write(
        reports_dir().join("conformance.json"),
        serde_json::to_string_pretty(
            &serde_json::json!({ "summary": summary, "per_op": per_op, "cases": results }),
        )
        .unwrap(),
    )
    .unwrap();

    let doc_path = workspace().join("docs/CONFORMANCE.md");
    let checked = check_expected_failures(
        &results,
        &workspace().join("tests/conformance/expected_failures.txt"),
        "# ONNX node tests tern does not pass yet, one per line with the reason.\n\
         # Regenerate with: TERN_BLESS=1 cargo test -p tern-tests --test conformance\n",
    );
    if !checked {
        std::fs::write(&doc_path, conformance_doc(&summary, &per_op)).unwrap();
        return;
    }
    let doc = std::fs::read_to_string(&doc_path).unwrap_or_default();
    assert!(
        doc.contains(&summary),
        "docs/CONFORMANCE.md is stale: it must state `{summary}` (TERN_BLESS=1)"
    );
}

fn conformance_doc(summary: &str, per_op: &BTreeMap<&str, (usize, usize)>) -> String {
    let mut doc = format!(
        "# ONNX conformance\n\n\
         The ONNX backend node tests (generated from the `onnx` 1.23.2 wheel by `scripts/fetch-models`)\n\
         run through tern's CPU backend (tract) by `tests/tests/conformance.rs`, comparing each output\n\
         with the suite's own tolerances (rtol 1e-3, atol 1e-7 unless the case says otherwise).\n\
         Failing cases are listed with their reasons in `tests/conformance/expected_failures.txt`;\n\
         CI fails when an unlisted case fails or a listed one starts passing.\n\n\
         **{summary}.**\n\n\
         | op | passing / cases |\n|---|---|\n"
    );
    for (op, (p, t)) in per_op {
        doc.push_str(&format!(
            "| {op} | {p}/{t}{} |\n",
            if p == t { "" } else { " ⚠" }
        ));
    }
    doc
}
