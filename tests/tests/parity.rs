//! Real-model parity: tern (CPU) against onnxruntime on the same models and inputs.
//!
//! `scripts/fetch-models` saved seeded inputs and onnxruntime's outputs for every model in
//! `models/manifest.json`, with the tolerance each model is held to. Models whose expected
//! result is a failure must fail with a typed error (not a panic, not wrong numbers).
//!
//! `TERN_PARITY_MODELS=a,b` checks only those models (each must be in the manifest) and
//! leaves the reports and docs/MODELS.md alone; with it, `TERN_PARITY_THREADS=1` checks one
//! thread count only. scripts/test-arm64 runs it that way under qemu-aarch64, where the
//! whole manifest, or the 13 runs of a two-thread session's pool race, would take too long
//! (magika and ppocr_cls_int8_qdq at 1 and 2 threads: 814 s on a busy machine; ppocr_cls and
//! ppocr_cls_int8_qdq at one thread: 13 s).

use tern::{Backend, NanPolicy, Session, SessionOptions};
use tern_tests::{model_manifest, reports_dir, workspace, Diff, ModelEntry};

#[derive(serde::Serialize)]
struct Row {
    model: String,
    threads: usize,
    status: String,
    diff: Option<Diff>,
}

fn check(entry: &ModelEntry, threads: usize) -> Result<Diff, String> {
    let model = entry.load().map_err(|e| format!("[{}] {e}", e.kind()))?;
    let options = SessionOptions::new()
        .backend(Backend::Cpu)
        .threads(threads)
        .nan_policy(NanPolicy::Reject);
    let session = Session::new(&model, options).map_err(|e| format!("[{}] {e}", e.kind()))?;
    // A session is a function of its inputs: the second run must give what the first did
    // (tract's LSTM carries its hidden state over between runs of one plan state). With
    // threads, the first 12 runs measure the pool against one thread
    // (ThreadPolicy::Measure): the result must hold on both sides of that choice.
    let runs = if threads > 1 { 13 } else { 2 };
    let mut diff = None;
    for run in 0..runs {
        let outputs = session
            .run(entry.reference_inputs())
            .map_err(|e| format!("[{}] {e}", e.kind()))?;
        if run == 0 || run == runs - 1 {
            diff = Some(entry.compare_with_reference(&outputs)?);
        }
    }
    diff.ok_or_else(|| "no run".to_string())
}

/// The models `TERN_PARITY_MODELS` names, or `None` for the whole manifest.
fn only_models(manifest: &[ModelEntry]) -> Option<Vec<String>> {
    let names: Vec<String> = std::env::var("TERN_PARITY_MODELS")
        .ok()?
        .split(',')
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    for name in &names {
        assert!(
            manifest.iter().any(|e| &e.name == name),
            "TERN_PARITY_MODELS names {name}, which models/manifest.json does not have"
        );
    }
    assert!(!names.is_empty(), "TERN_PARITY_MODELS names no model");
    Some(names)
}

#[test]
fn real_models_match_onnxruntime() {
    let mut manifest = model_manifest();
    let only = only_models(&manifest);
    if let Some(names) = &only {
        manifest.retain(|e| names.contains(&e.name));
    }
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    let mut table = String::from(
        "| model | what it is | licence | size | tolerance (atol / rtol) | tern vs onnxruntime, 1 thread | 2 threads |\n|---|---|---|---|---|---|---|\n",
    );
    let thread_counts: Vec<usize> = match (&only, std::env::var("TERN_PARITY_THREADS")) {
        (Some(_), Ok(list)) => list
            .split(',')
            .map(|t| {
                t.trim()
                    .parse()
                    .expect("TERN_PARITY_THREADS: thread counts")
            })
            .collect(),
        _ => vec![1, 2],
    };
    for entry in &manifest {
        let mut cells = Vec::new();
        for &threads in &thread_counts {
            let result = check(entry, threads);
            let status = match (&result, entry.expect.as_str()) {
                (Ok(d), "pass") => format!(
                    "pass (max abs {:.1e}, max rel {:.1e})",
                    d.max_abs, d.max_rel
                ),
                (Err(e), "pass") => {
                    problems.push(format!("{} ({threads} threads): {e}", entry.name));
                    format!("FAIL: {e}")
                }
                (Ok(_), _) => {
                    problems.push(format!("{} now passes: update its expectation", entry.name));
                    "unexpected pass".into()
                }
                (Err(e), expect) => {
                    if e.contains("[panic]") {
                        problems.push(format!("{}: panicked: {e}", entry.name));
                    }
                    let how = match e.strip_prefix('[').and_then(|r| r.split_once(']')) {
                        Some((kind, _)) => format!("typed error `{kind}`"),
                        None => "outputs differ from onnxruntime".to_string(),
                    };
                    format!(
                        "expected failure, {how}: {}",
                        expect.trim_start_matches("fail: ")
                    )
                }
            };
            println!("{:<22} {threads}T  {status}", entry.name);
            cells.push(status.clone());
            rows.push(Row {
                model: entry.name.clone(),
                threads,
                status,
                diff: result.ok(),
            });
        }
        table.push_str(&format!(
            "| {} | {} | {} | {:.1} MB | {:.0e} / {:.0e}{} | {} | {} |\n",
            entry.name,
            entry.kind,
            entry.licence,
            entry.bytes as f64 / 1e6,
            entry.atol,
            entry.rtol,
            if entry.outliers > 0.0 {
                format!(", at most {} % of elements outside", entry.outliers * 100.0)
            } else {
                String::new()
            },
            cells.first().map_or("", String::as_str),
            cells.get(1).map_or("", String::as_str)
        ));
    }
    if only.is_some() {
        assert!(
            problems.is_empty(),
            "parity problems:\n{}",
            problems.join("\n")
        );
        return;
    }
    std::fs::write(
        reports_dir().join("parity.json"),
        serde_json::to_string_pretty(&rows).unwrap(),
    )
    .unwrap();
    std::fs::write(reports_dir().join("parity.md"), &table).unwrap();
    assert!(
        problems.is_empty(),
        "parity problems:\n{}",
        problems.join("\n")
    );
    // The doc must list every model with its current pass/fail status.
    let doc_path = workspace().join("docs/MODELS.md");
    if tern_tests::bless() {
        let doc = std::fs::read_to_string(&doc_path).unwrap_or_default();
        let start = doc
            .find("<!-- parity -->")
            .map(|i| i + "<!-- parity -->\n".len());
        let end = doc.find("<!-- /parity -->");
        if let (Some(s), Some(e)) = (start, end) {
            std::fs::write(&doc_path, format!("{}{table}{}", &doc[..s], &doc[e..])).unwrap();
        }
    }
    let doc = std::fs::read_to_string(&doc_path).unwrap_or_default();
    for entry in &manifest {
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| {} |", entry.name)));
        let row = row.unwrap_or_else(|| {
            panic!(
                "docs/MODELS.md has no row for {} (TERN_BLESS=1)",
                entry.name
            )
        });
        let want = if entry.expect == "pass" {
            "| pass ("
        } else {
            "| expected failure"
        };
        assert!(
            row.contains(want),
            "docs/MODELS.md row for {} is stale (TERN_BLESS=1)",
            entry.name
        );
    }
}
