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
use tern_tests::node_suite::{
    check_expected_failures, manifest, onnxruntime_failures, per_op, run_cases, Outcome,
};
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
    // onnxruntime on the same cases, side by side (measured by scripts/fetch-models).
    let rival = onnxruntime_failures().map(|(version, failures)| {
        let theirs: Vec<Outcome> = results
            .iter()
            .map(|r| Outcome {
                passed: !failures.contains_key(&r.name),
                reason: failures.get(&r.name).cloned().unwrap_or_default(),
                ..r.clone()
            })
            .collect();
        (version, theirs)
    });
    let versus = rival.as_ref().map(|(version, theirs)| {
        let their_ops = per_op_owned(theirs);
        let ours_only = results
            .iter()
            .zip(theirs)
            .filter(|(a, b)| a.passed && !b.passed)
            .count();
        let theirs_only = results
            .iter()
            .zip(theirs)
            .filter(|(a, b)| !a.passed && b.passed)
            .count();
        let at_least = per_op
            .iter()
            .filter(|(op, (p, _))| their_ops.get(**op).is_none_or(|(q, _)| p >= q))
            .count();
        format!(
            "onnxruntime {version} on the same cases: {}/{}; tern passes {ours_only} it fails, \
             it passes {theirs_only} tern fails; tern ≥ onnxruntime on {at_least}/{} ops",
            theirs.iter().filter(|r| r.passed).count(),
            theirs.len(),
            per_op.len()
        )
    });
    println!("{summary}");
    if let Some(versus) = &versus {
        println!("{versus}");
    }
    for (op, (p, t)) in &per_op {
        if p != t {
            println!("  {op:<32} {p}/{t}");
        }
    }
    std::fs::write(
        reports_dir().join("conformance.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "summary": summary,
            "onnxruntime": versus,
            "per_op": per_op,
            "cases": results,
        }))
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
    let their_ops = rival.as_ref().map(|(_, theirs)| per_op_owned(theirs));
    if !checked {
        let doc = conformance_doc(&summary, versus.as_deref(), &per_op, their_ops.as_ref());
        std::fs::write(&doc_path, doc).unwrap();
        return;
    }
    let doc = std::fs::read_to_string(&doc_path).unwrap_or_default();
    assert!(
        doc.contains(&summary),
        "docs/CONFORMANCE.md is stale: it must state `{summary}` (TERN_BLESS=1)"
    );
}

/// [`per_op`] with owned keys.
fn per_op_owned(results: &[Outcome]) -> BTreeMap<String, (usize, usize)> {
    per_op(results)
        .into_iter()
        .map(|(op, n)| (op.to_string(), n))
        .collect()
}

fn conformance_doc(
    summary: &str,
    versus: Option<&str>,
    per_op: &BTreeMap<&str, (usize, usize)>,
    theirs: Option<&BTreeMap<String, (usize, usize)>>,
) -> String {
    let mut doc = format!(
        "# ONNX conformance\n\n\
         The ONNX backend node tests (generated from the `onnx` 1.23.2 wheel by `scripts/fetch-models`)\n\
         run through tern's CPU backend (tract) by `tests/tests/conformance.rs`, comparing each output\n\
         with the suite's own tolerances (rtol 1e-3, atol 1e-7 unless the case says otherwise).\n\
         Failing cases are listed with their reasons in `tests/conformance/expected_failures.txt`;\n\
         CI fails when an unlisted case fails or a listed one starts passing.\n\n\
         onnxruntime runs the same cases in `scripts/fetch-models` (CPU provider, one thread, the\n\
         same tolerances through `numpy.testing.assert_allclose`); its failures and their reasons\n\
         are in the cache's `onnx-node/onnxruntime.json`. Cases with packed 4- or 2-bit values\n\
         count as its failures: its Python API cannot be fed them.\n\n\
         **{summary}.**\n\n{}\
         | op | tern | onnxruntime |\n|---|---|---|\n",
        versus.map_or(String::new(), |v| format!("**{v}.**\n\n"))
    );
    for (op, (p, t)) in per_op {
        let (rival, mark) = match theirs.and_then(|m| m.get(*op)) {
            Some((q, _)) => (
                format!("{q}/{t}"),
                match p.cmp(q) {
                    std::cmp::Ordering::Greater => " ▲",
                    std::cmp::Ordering::Less => " ▼",
                    std::cmp::Ordering::Equal => "",
                },
            ),
            None => ("-".to_string(), ""),
        };
        doc.push_str(&format!("| {op} | {p}/{t}{mark} | {rival} |\n"));
    }
    doc
}
