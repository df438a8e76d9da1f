//! Real-model parity: tern (CPU) against onnxruntime on the same models and inputs.
//!
//! `scripts/fetch-models` saved seeded inputs and onnxruntime's outputs for every model in
//! `models/manifest.json`, with the tolerance each model is held to. Models whose expected
//! result is a failure must fail with a typed error (not a panic, not wrong numbers).

use std::path::Path;

use tern::{Backend, Model, NanPolicy, Session, SessionOptions, Tensor};
use tern_tests::{compare, fetched, reports_dir, workspace, Diff};

#[derive(serde::Deserialize)]
struct Entry {
    name: String,
    kind: String,
    licence: String,
    bytes: u64,
    inputs: Vec<String>,
    outputs: Vec<String>,
    output_files: Vec<String>,
    atol: f64,
    rtol: f64,
    expect: String,
}

#[derive(serde::Serialize)]
struct Row {
    model: String,
    threads: usize,
    status: String,
    diff: Option<Diff>,
}

fn npy(path: &Path) -> Tensor {
    Tensor::from_npy(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap()
}

fn check(entry: &Entry, dir: &Path, threads: usize) -> Result<Diff, String> {
    let model = Model::load(dir.join("model.onnx")).map_err(|e| format!("[{}] {e}", e.kind()))?;
    let options = SessionOptions::new()
        .backend(Backend::Cpu)
        .threads(threads)
        .nan_policy(NanPolicy::Reject);
    let session = Session::new(&model, options).map_err(|e| format!("[{}] {e}", e.kind()))?;
    let inputs: Vec<(String, Tensor)> = entry
        .inputs
        .iter()
        .map(|n| (n.clone(), npy(&dir.join(format!("ref/input.{n}.npy")))))
        .collect();
    let outputs = session
        .run(inputs)
        .map_err(|e| format!("[{}] {e}", e.kind()))?;
    let mut worst = Diff::default();
    for (name, file) in entry.outputs.iter().zip(&entry.output_files) {
        let actual = outputs
            .get(name)
            .ok_or_else(|| format!("no output {name}"))?;
        let d = compare(
            actual,
            &npy(&dir.join("ref").join(file)),
            entry.atol,
            entry.rtol,
        )
        .map_err(|e| format!("output {name}: {e}"))?;
        worst.max_abs = worst.max_abs.max(d.max_abs);
        worst.max_rel = worst.max_rel.max(d.max_rel);
    }
    Ok(worst)
}

#[test]
fn real_models_match_onnxruntime() {
    let root = fetched("models");
    let manifest: Vec<Entry> =
        serde_json::from_slice(&std::fs::read(root.join("manifest.json")).unwrap()).unwrap();
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    let mut table = String::from(
        "| model | what it is | licence | size | tolerance (atol / rtol) | tern vs onnxruntime, 1 thread | 2 threads |\n|---|---|---|---|---|---|---|\n",
    );
    for entry in &manifest {
        let dir = root.join(&entry.name);
        let mut cells = Vec::new();
        for threads in [1, 2] {
            let result = check(entry, &dir, threads);
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
            "| {} | {} | {} | {:.1} MB | {:.0e} / {:.0e} | {} | {} |\n",
            entry.name,
            entry.kind,
            entry.licence,
            entry.bytes as f64 / 1e6,
            entry.atol,
            entry.rtol,
            cells[0],
            cells[1]
        ));
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
