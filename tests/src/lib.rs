//! Shared helpers for the integration suites: where the fetched models live, comparing
//! tensors against reference outputs with explicit tolerances, building small ONNX models
//! in code, and writing reports.

use std::path::{Path, PathBuf};

use tern::{DType, Tensor};

pub mod fixtures;
pub mod node_suite;

/// The cache `scripts/fetch-models` fills (`$TERN_CACHE`, default `~/.cache/tern`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("TERN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/tern")
        })
}

/// A path in the cache, which must exist: the suites are meant to run, not to skip.
pub fn fetched(rel: &str) -> PathBuf {
    let p = cache_dir().join(rel);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models first (the README's test command does)",
        p.display()
    );
    p
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Where suites write their JSON reports (`target/tern-reports`).
pub fn reports_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
        .join("tern-reports");
    std::fs::create_dir_all(&dir).expect("create reports dir");
    dir
}

/// The project's Python (a venv with onnx, onnxruntime, opentelemetry-proto), created on
/// first use by `scripts/python-env`.
pub fn python() -> PathBuf {
    let out = std::process::Command::new(workspace().join("scripts/python-env"))
        .output()
        .expect("run scripts/python-env");
    assert!(
        out.status.success(),
        "scripts/python-env failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Whether to rewrite checked-in expectations (`TERN_BLESS=1`).
pub fn bless() -> bool {
    std::env::var("TERN_BLESS").is_ok_and(|v| v == "1")
}

/// Largest differences found by [`compare`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Diff {
    /// max |actual - expected|
    pub max_abs: f64,
    /// max |actual - expected| / |expected| over elements with |expected| > 1e-6
    pub max_rel: f64,
}

/// Compares like `numpy.testing.assert_allclose`: each element must satisfy
/// `|a - e| <= atol + rtol * |e|`; NaN matches NaN and infinities must be equal.
/// Integers, bools and strings must match exactly. Shapes and dtypes must match.
pub fn compare(actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> Result<Diff, String> {
    if actual.dtype() != expected.dtype() {
        return Err(format!(
            "dtype {} != expected {}",
            actual.dtype(),
            expected.dtype()
        ));
    }
    if actual.shape() != expected.shape() {
        return Err(format!(
            "shape {:?} != expected {:?}",
            actual.shape(),
            expected.shape()
        ));
    }
    if actual.dtype() == DType::String {
        let (a, e) = (
            actual.as_slice::<String>().map_err(|e| e.to_string())?,
            expected.as_slice::<String>().map_err(|e| e.to_string())?,
        );
        return if a == e {
            Ok(Diff::default())
        } else {
            Err("string values differ".into())
        };
    }
    let a = actual.to_f32_vec().map_err(|e| e.to_string())?;
    let e = expected.to_f32_vec().map_err(|e| e.to_string())?;
    let exact = !actual.dtype().is_float();
    let mut diff = Diff::default();
    for (i, (&x, &y)) in a.iter().zip(&e).enumerate() {
        let (x, y) = (f64::from(x), f64::from(y));
        if x.is_nan() && y.is_nan() || x == y {
            continue;
        }
        let d = (x - y).abs();
        let ok = if exact || !y.is_finite() || !x.is_finite() {
            false
        } else {
            d <= atol + rtol * y.abs()
        };
        if !ok {
            return Err(format!(
                "element {i}: {x} vs expected {y} (|diff| {d:.3e}, atol {atol:e}, rtol {rtol:e})"
            ));
        }
        diff.max_abs = diff.max_abs.max(d);
        if y.abs() > 1e-6 {
            diff.max_rel = diff.max_rel.max(d / y.abs());
        }
    }
    Ok(diff)
}
