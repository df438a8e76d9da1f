//! The ONNX backend node test suite (generated from the `onnx` wheel by
//! `scripts/fetch-models`) run through tern on the CPU backend.
//!
//! Every case either passes or is listed in `tests/conformance/expected_failures.txt`. A
//! listed case that passes, or an unlisted one that fails, fails this test: regressions
//! are caught and progress is never silent. `TERN_BLESS=1` rewrites the list and
//! `docs/CONFORMANCE.md` from the current results.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tern::{Backend, Model, NanPolicy, Session, SessionOptions, Tensor};
use tern_tests::{bless, compare, fetched, reports_dir, workspace};

#[derive(serde::Deserialize)]
struct Case {
    op: String,
    rtol: f64,
    atol: f64,
    non_tensor_io: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
struct Outcome {
    name: String,
    op: String,
    passed: bool,
    reason: String,
}

fn run_case(dir: &Path, case: &Case) -> Result<(), String> {
    if !case.non_tensor_io.is_empty() {
        return Err(format!(
            "non-tensor I/O ({}) is outside tern's tensor API",
            case.non_tensor_io.join(", ")
        ));
    }
    let model = Model::load(dir.join("model.onnx")).map_err(|e| format!("[{}] {e}", e.kind()))?;
    let options = SessionOptions::new()
        .backend(Backend::Cpu)
        .nan_policy(NanPolicy::Allow);
    let session = Session::new(&model, options).map_err(|e| format!("[{}] {e}", e.kind()))?;
    let mut sets: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    sets.sort();
    for set in sets {
        let load = |prefix: &str, i: usize| -> Option<Result<Tensor, String>> {
            let p = set.join(format!("{prefix}_{i}.pb"));
            p.exists().then(|| {
                let bytes = std::fs::read(&p).map_err(|e| e.to_string())?;
                Tensor::from_onnx_proto(&bytes).map_err(|e| format!("reading {}: {e}", p.display()))
            })
        };
        let mut inputs = Vec::new();
        for (i, info) in model.inputs().iter().enumerate() {
            match load("input", i) {
                Some(t) => inputs.push((info.name.clone(), t?)),
                None => break,
            }
        }
        let outputs = session
            .run(inputs)
            .map_err(|e| format!("[{}] {e}", e.kind()))?;
        for (i, (name, actual)) in outputs.iter().enumerate() {
            let expected =
                load("output", i).ok_or_else(|| format!("no reference for output {i}"))??;
            compare(actual, &expected, case.atol, case.rtol)
                .map_err(|e| format!("output {name}: {e}"))?;
        }
    }
    Ok(())
}

#[test]
fn onnx_node_suite() {
    let root = fetched("onnx-node");
    let manifest: BTreeMap<String, Case> =
        serde_json::from_slice(&std::fs::read(root.join("manifest.json")).expect("manifest"))
            .expect("manifest json");
    let names: Vec<&String> = manifest.keys().collect();
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..std::thread::available_parallelism().map_or(2, |n| n.get()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(name) = names.get(i) else { break };
                let case = &manifest[*name];
                let result = run_case(&root.join(name), case);
                results.lock().unwrap().push(Outcome {
                    name: (*name).clone(),
                    op: case.op.clone(),
                    passed: result.is_ok(),
                    reason: result.err().unwrap_or_default().chars().take(300).collect(),
                });
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by(|a, b| a.name.cmp(&b.name));

    let mut per_op: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for r in &results {
        let e = per_op.entry(&r.op).or_default();
        e.1 += 1;
        e.0 += usize::from(r.passed);
    }
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

    let list_path = workspace().join("tests/conformance/expected_failures.txt");
    let doc_path = workspace().join("docs/CONFORMANCE.md");
    let failing: BTreeSet<&str> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.name.as_str())
        .collect();
    if bless() {
        let mut list = String::from(
            "# ONNX node tests tern does not pass yet, one per line with the reason.\n\
             # Regenerate with: TERN_BLESS=1 cargo test -p tern-tests --test conformance\n",
        );
        for r in results.iter().filter(|r| !r.passed) {
            list.push_str(&format!("{}  # {}\n", r.name, r.reason.replace('\n', " ")));
        }
        std::fs::write(&list_path, list).unwrap();
        std::fs::write(&doc_path, conformance_doc(&summary, &per_op)).unwrap();
        return;
    }
    let listed: BTreeSet<String> = std::fs::read_to_string(&list_path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect();
    let regressions: Vec<_> = failing.iter().filter(|n| !listed.contains(**n)).collect();
    let fixed: Vec<_> = listed
        .iter()
        .filter(|n| !failing.contains(n.as_str()))
        .collect();
    for n in &regressions {
        let r = results.iter().find(|r| r.name == ***n).unwrap();
        println!("REGRESSION {n}: {}", r.reason);
    }
    for n in &fixed {
        println!("NOW PASSING {n}: remove it from tests/conformance/expected_failures.txt");
    }
    assert!(
        regressions.is_empty(),
        "{} node tests fail that are not expected to",
        regressions.len()
    );
    assert!(
        fixed.is_empty(),
        "{} expected failures now pass: update the list (TERN_BLESS=1)",
        fixed.len()
    );
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
