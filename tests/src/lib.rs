//! Shared helpers for the integration suites: where the fetched models live, comparing
//! tensors against reference outputs with explicit tolerances, building small ONNX models
//! in code, and writing reports.

use std::path::{Path, PathBuf};

use tern::{Model, Outputs, Tensor};

pub mod fixtures;
pub mod node_suite;

/// The cache `scripts/fetch-models` fills ([`tern::fs::cache_dir`]).
pub fn cache_dir() -> PathBuf {
    tern::fs::cache_dir()
}

/// A path in the cache, which must exist: the suites are meant to run, not to skip.
pub fn fetched(rel: &str) -> PathBuf {
    tern::fs::fetched(rel).unwrap_or_else(|e| panic!("{e}"))
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

/// One real model fetched by `scripts/fetch-models`, as `models/manifest.json` lists it,
/// with seeded inputs and onnxruntime's outputs saved under its `ref/` folder.
#[derive(Debug, serde::Deserialize)]
pub struct ModelEntry {
    /// Folder name under `models/`.
    pub name: String,
    /// What the model is.
    pub kind: String,
    /// Its licence and origin.
    pub licence: String,
    /// File size.
    pub bytes: u64,
    /// Input names (each saved as `ref/input.NAME.npy`).
    pub inputs: Vec<String>,
    /// Output names.
    pub outputs: Vec<String>,
    /// onnxruntime's output for each, under `ref/`.
    pub output_files: Vec<String>,
    /// Absolute tolerance against onnxruntime.
    pub atol: f64,
    /// Relative tolerance against onnxruntime.
    pub rtol: f64,
    /// The largest share of an output's elements allowed outside the tolerance (0 for
    /// most models; int8 models whose float Softmax turns a one-step rounding difference
    /// into a large probability difference state theirs in `scripts/fetch_models.py`).
    #[serde(default)]
    pub outliers: f64,
    /// `pass`, or the expected failure.
    pub expect: String,
}

/// Every fetched real model.
pub fn model_manifest() -> Vec<ModelEntry> {
    serde_json::from_slice(&std::fs::read(fetched("models/manifest.json")).expect("manifest"))
        .expect("models/manifest.json")
}

/// Writes a tensor as a `.npy` file ([`Tensor::to_npy`]), for the Python reference scripts.
pub fn write_npy(path: &Path, tensor: &Tensor) {
    let bytes = tensor.to_npy().expect("a numeric tensor");
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// onnxruntime's first output for `model` on these inputs, run by `scripts/ort_run.py` in
/// tern's Python environment: the reference for inputs a test makes up. `tag` names the
/// scratch files (unique per test).
pub fn onnxruntime_output(model: &Path, inputs: &[(&str, &Tensor)], tag: &str) -> Tensor {
    let scratch = |name: &str| {
        std::env::temp_dir().join(format!("tern-ort-{}-{tag}-{name}", std::process::id()))
    };
    let out = scratch("output.npy");
    let mut command = std::process::Command::new(python());
    command
        .arg(workspace().join("scripts/ort_run.py"))
        .arg(model)
        .arg(&out);
    for (name, tensor) in inputs {
        let file = scratch(&format!("{name}.npy"));
        write_npy(&file, tensor);
        command.arg(format!("{name}={}", file.display()));
    }
    let ran = command.output().expect("run scripts/ort_run.py");
    assert!(
        ran.status.success(),
        "onnxruntime failed on {}: {}",
        model.display(),
        String::from_utf8_lossy(&ran.stderr)
    );
    read_npy(&out)
}

/// Reads a `.npy` file that must exist.
pub fn read_npy(path: &Path) -> Tensor {
    Tensor::from_npy(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

impl ModelEntry {
    /// The model's folder in the cache.
    pub fn dir(&self) -> PathBuf {
        fetched(&format!("models/{}", self.name))
    }

    /// Loads the model.
    pub fn load(&self) -> tern::Result<Model> {
        Model::load(self.dir().join("model.onnx"))
    }

    /// The seeded inputs the reference outputs were computed from.
    pub fn reference_inputs(&self) -> Vec<(String, Tensor)> {
        let dir = self.dir();
        self.inputs
            .iter()
            .map(|n| (n.clone(), read_npy(&dir.join(format!("ref/input.{n}.npy")))))
            .collect()
    }

    /// Compares each output with onnxruntime's at the model's tolerance; the worst difference.
    pub fn compare_with_reference(&self, outputs: &Outputs) -> Result<Diff, String> {
        let dir = self.dir().join("ref");
        let mut worst = Diff::default();
        for (name, file) in self.outputs.iter().zip(&self.output_files) {
            let actual = outputs
                .get(name)
                .ok_or_else(|| format!("no output {name}"))?;
            let expected = read_npy(&dir.join(file));
            let d = if self.outliers > 0.0 {
                compare_with_outliers(actual, &expected, self.atol, self.rtol, self.outliers)
            } else {
                compare(actual, &expected, self.atol, self.rtol)
            }
            .map_err(|e| format!("output {name}: {e}"))?;
            worst = worst.worst(d);
        }
        Ok(worst)
    }
}

/// [`compare`] that lets at most `share` of the elements exceed the tolerance (shapes must
/// still match); the figures are those of the elements within it.
fn compare_with_outliers(
    actual: &Tensor,
    expected: &Tensor,
    atol: f64,
    rtol: f64,
    share: f64,
) -> Result<Diff, String> {
    if actual.shape() != expected.shape() {
        return compare(actual, expected, atol, rtol);
    }
    let (a, e) = (
        actual.to_f32_vec().map_err(|e| e.to_string())?,
        expected.to_f32_vec().map_err(|e| e.to_string())?,
    );
    let (mut kept_a, mut kept_e, mut outside) = (Vec::new(), Vec::new(), 0usize);
    for (&x, &y) in a.iter().zip(&e) {
        if x.is_finite() && (f64::from(x) - f64::from(y)).abs() > atol + rtol * f64::from(y).abs() {
            outside += 1;
        } else {
            kept_a.push(x);
            kept_e.push(y);
        }
    }
    if outside as f64 > share * a.len() as f64 {
        return Err(format!(
            "{outside} of {} elements outside the tolerance (at most {:.2} % allowed)",
            a.len(),
            share * 100.0
        ));
    }
    let flat = |v: Vec<f32>| Tensor::from_vec(&[v.len()], v).map_err(|e| e.to_string());
    compare(&flat(kept_a)?, &flat(kept_e)?, atol, rtol)
}

/// Whether to rewrite checked-in expectations (`TERN_BLESS=1`).
pub fn bless() -> bool {
    std::env::var("TERN_BLESS").is_ok_and(|v| v == "1")
}

/// Largest differences found by [`compare`].
pub use tern::tensor::Closeness as Diff;

/// Compares like `numpy.testing.assert_allclose` ([`tern::tensor::compare_close`]).
pub use tern::tensor::compare_close as compare;

/// PP-OCR's classifier preprocessing: BGR, 48×192, (x/255 − 0.5) / 0.5.
pub const CLS_PREPROCESS: &str = "size=48x192,order=bgr,mean=0.5,std=0.5";

/// `n` text-line images rendered into `dir` by `scripts/make_text_images.py` (seeded), as
/// inputs named `input` made by `preprocess` (a `tern_quantize::images::Preprocess` spec),
/// each with its angle (0 or 180: ppocr_cls's classes 0 and 1), in file order.
pub fn text_lines(
    dir: &Path,
    n: usize,
    seed: u64,
    input: &str,
    preprocess: &str,
) -> Vec<(Vec<(String, Tensor)>, u32)> {
    let out = std::process::Command::new(python())
        .arg(workspace().join("scripts/make_text_images.py"))
        .arg(dir)
        .args([n.to_string(), seed.to_string()])
        .output()
        .expect("run make_text_images.py");
    assert!(
        out.status.success(),
        "make_text_images.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spec: tern_quantize::images::Preprocess = preprocess.parse().expect("preprocess spec");
    let samples = tern_quantize::images::samples_from_folder(dir, &spec, input).expect("samples");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("read images")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|f| f.ends_with(".png"))
        .collect();
    files.sort();
    assert_eq!(files.len(), samples.len());
    files
        .iter()
        .zip(samples)
        .map(|(f, s)| (s, u32::from(f.ends_with("_180.png")) * 180))
        .collect()
}
