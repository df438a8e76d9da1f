//! The ONNX backend node test suite (generated from the `onnx` wheel by
//! `scripts/fetch-models`): running its cases through a tern backend, and holding the
//! results to a checked-in list of expected failures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tern::{Model, Session, SessionOptions, Tensor};

use crate::{bless, compare, fetched};

/// One case of the suite's manifest.
#[derive(Debug, serde::Deserialize)]
pub struct Case {
    /// The ONNX op the case tests.
    pub op: String,
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// Inputs or outputs that are not tensors (sequences, optionals).
    pub non_tensor_io: Vec<String>,
}

/// The result of one case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    /// The case's directory name.
    pub name: String,
    /// Its op.
    pub op: String,
    /// Whether every output matched.
    pub passed: bool,
    /// Why not.
    pub reason: String,
}

/// The suite's manifest, by case name.
pub fn manifest() -> BTreeMap<String, Case> {
    manifest_in(NODE_SUITE)
}

/// The ONNX node suite's folder in the cache.
const NODE_SUITE: &str = "onnx-node";

/// The manifest of a suite in this layout (the node suite's, or `contrib-ops`), by case.
pub fn manifest_in(suite: &str) -> BTreeMap<String, Case> {
    let path = fetched(&format!("{suite}/manifest.json"));
    serde_json::from_slice(&std::fs::read(path).expect("manifest")).expect("manifest json")
}

/// Runs one case (every data set in its directory) with these session options.
pub fn run_case(dir: &Path, case: &Case, options: &SessionOptions) -> Result<(), String> {
    if !case.non_tensor_io.is_empty() {
        return Err(format!(
            "non-tensor I/O ({}) is outside tern's tensor API",
            case.non_tensor_io.join(", ")
        ));
    }
    let model = Model::load(dir.join("model.onnx")).map_err(|e| format!("[{}] {e}", e.kind()))?;
    let session =
        Session::new(&model, options.clone()).map_err(|e| format!("[{}] {e}", e.kind()))?;
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

/// Runs the named cases on all cores, sorted by name.
pub fn run_cases(
    manifest: &BTreeMap<String, Case>,
    names: &[&String],
    options: &SessionOptions,
) -> Vec<Outcome> {
    run_cases_in(NODE_SUITE, manifest, names, options)
}

/// [`run_cases`] for the cases of another suite in the same layout.
pub fn run_cases_in(
    suite: &str,
    manifest: &BTreeMap<String, Case>,
    names: &[&String],
    options: &SessionOptions,
) -> Vec<Outcome> {
    let root = fetched(suite);
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..std::thread::available_parallelism().map_or(2, |n| n.get()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(name) = names.get(i) else { break };
                let case = &manifest[*name];
                let result = run_case(&root.join(name), case, options);
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
    results
}

/// Passing and total cases per op.
pub fn per_op(results: &[Outcome]) -> BTreeMap<&str, (usize, usize)> {
    let mut per_op: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for r in results {
        let e = per_op.entry(&r.op).or_default();
        e.1 += 1;
        e.0 += usize::from(r.passed);
    }
    per_op
}

/// onnxruntime's results on the same cases, as `scripts/fetch-models` measured them: its
/// version and the cases it fails, with reasons (`None` if the cache has no such file).
pub fn onnxruntime_failures() -> Option<(String, BTreeMap<String, String>)> {
    #[derive(serde::Deserialize)]
    struct Rival {
        onnxruntime: String,
        failures: BTreeMap<String, String>,
    }
    let path = tern::fs::fetched("onnx-node/onnxruntime.json").ok()?;
    let rival: Rival = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    Some((rival.onnxruntime, rival.failures))
}

/// The case names an expected-failure list holds.
pub fn listed(list_path: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(list_path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

/// Holds `results` to the expected-failure list at `list_path`: fails on a case that fails
/// unlisted (a regression) or passes listed (progress to record). With `TERN_BLESS=1`
/// rewrites the list instead and returns `false`; otherwise returns `true` once checked.
pub fn check_expected_failures(results: &[Outcome], list_path: &Path, header: &str) -> bool {
    if bless() {
        let mut list = String::from(header);
        for r in results.iter().filter(|r| !r.passed) {
            list.push_str(&format!("{}  # {}\n", r.name, r.reason.replace('\n', " ")));
        }
        std::fs::write(list_path, list).unwrap();
        return false;
    }
    let failing: BTreeSet<&str> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.name.as_str())
        .collect();
    let listed = listed(list_path);
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
        println!("NOW PASSING {n}: remove it from {}", list_path.display());
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
    true
}
