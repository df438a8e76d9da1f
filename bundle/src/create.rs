//! Building a bundle from an ONNX model and sample inputs: the golden outputs are the
//! model's own, computed here through tern (or given by the caller, e.g. from onnxruntime).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tern::{Model, ModelFiles, Session, SessionOptions, Tensor};

use crate::archive::Bundle;
use crate::error::{Error, Result};
use crate::golden::run_sample;
use crate::manifest::{
    check_name, FileMeta, GoldenSample, Manifest, ManifestType, Tolerance, SPEC_VERSION,
};

/// The model's path in bundles tern writes.
pub const MODEL_FILE: &str = "model.onnx";

/// What a new bundle says about itself.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BundleSpec {
    /// The model's name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// The bundle's version.
    pub version: u64,
    /// How long the signed manifest stays valid (default 365 days).
    pub valid_for: Duration,
    /// The oldest tern that can run it (default: this one).
    pub min_tern: String,
    /// The model's licence.
    pub licence: Option<String>,
    /// The golden samples' absolute tolerance (default 1e-4).
    pub atol: f64,
    /// Their relative tolerance (default 1e-3).
    pub rtol: f64,
    /// The rollout policy devices follow when their app sets none (default none).
    pub rollout: Option<crate::rollout::RolloutPolicy>,
}

impl BundleSpec {
    /// A spec with the defaults above.
    pub fn new(name: impl Into<String>, version: u64) -> BundleSpec {
        BundleSpec {
            name: name.into(),
            version,
            valid_for: Duration::from_secs(365 * 24 * 3600),
            min_tern: tern::VERSION.into(),
            licence: None,
            atol: 1e-4,
            rtol: 1e-3,
            rollout: None,
        }
    }

    /// Sets how long the manifest stays valid.
    pub fn valid_for(mut self, d: Duration) -> Self {
        self.valid_for = d;
        self
    }

    /// Sets the oldest tern that can run it.
    pub fn min_tern(mut self, v: impl Into<String>) -> Self {
        self.min_tern = v.into();
        self
    }

    /// Sets the licence.
    pub fn licence(mut self, l: impl Into<String>) -> Self {
        self.licence = Some(l.into());
        self
    }

    /// Sets the golden samples' tolerances.
    pub fn tolerance(mut self, atol: f64, rtol: f64) -> Self {
        self.atol = atol;
        self.rtol = rtol;
        self
    }

    /// Carries a rollout policy in the signed manifest.
    pub fn rollout(mut self, policy: crate::rollout::RolloutPolicy) -> Self {
        self.rollout = Some(policy);
        self
    }

    fn check(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidOption { reason });
        if let Err(reason) = check_name(&self.name) {
            return bad(reason);
        }
        if semver::Version::parse(&self.min_tern).is_err() {
            return bad(format!(
                "min_tern {:?} is not a semver version",
                self.min_tern
            ));
        }
        for (what, v) in [("atol", self.atol), ("rtol", self.rtol)] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{what} {v} must be a finite number ≥ 0"));
            }
        }
        if self.valid_for.is_zero() {
            return bad("the validity period must not be 0".into());
        }
        if let Some(policy) = &self.rollout {
            policy.check()?;
        }
        Ok(())
    }
}

/// Builds an unsigned bundle from `model_bytes`: the model is loaded and run on each sample
/// with `options` (CPU by default) to record the golden outputs.
pub fn create(
    model: impl Into<ModelFiles>,
    spec: &BundleSpec,
    samples: &[Vec<(String, Tensor)>],
    options: SessionOptions,
) -> Result<Bundle> {
    spec.check()?;
    let files = model.into();
    let model = files.load()?;
    let session = Session::new(&model, options)?;
    let golden: Vec<_> = samples
        .iter()
        .map(|inputs| Ok((inputs.clone(), run_sample(&session, inputs)?)))
        .collect::<Result<_>>()?;
    assemble(files, &model, spec, &golden)
}

/// One golden sample given whole: its named inputs (in the model's order) and the outputs
/// the reference gave for them.
pub type GoldenPair = (Vec<(String, Tensor)>, BTreeMap<String, Tensor>);

/// Builds an unsigned bundle whose golden samples are given with their outputs (computed
/// elsewhere, e.g. by onnxruntime where the model was built).
pub fn create_with_outputs(
    model: impl Into<ModelFiles>,
    spec: &BundleSpec,
    samples: &[GoldenPair],
) -> Result<Bundle> {
    spec.check()?;
    let files = model.into();
    let model = files.load()?;
    assemble(files, &model, spec, samples)
}

/// The bundle of `files` (loaded as `model`) with its golden samples; `spec` is checked.
fn assemble(
    files: ModelFiles,
    model: &Model,
    spec: &BundleSpec,
    samples: &[GoldenPair],
) -> Result<Bundle> {
    let ModelFiles {
        model: model_bytes,
        data,
    } = files;
    let mut files = BTreeMap::new();
    let mut golden = Vec::new();
    for (i, (inputs, outputs)) in samples.iter().enumerate() {
        let mut sample = GoldenSample {
            inputs: BTreeMap::new(),
            outputs: BTreeMap::new(),
            atol: Tolerance(spec.atol),
            rtol: Tolerance(spec.rtol),
        };
        // Files are numbered, not named after tensors: graph names may hold any character.
        for (k, (name, tensor)) in inputs.iter().enumerate() {
            let path = format!("golden/{i}/input.{k}.npy");
            files.insert(path.clone(), tensor.to_npy()?);
            if sample.inputs.insert(name.clone(), path).is_some() {
                return Err(Error::InvalidOption {
                    reason: format!("golden sample {i} gives input {name:?} twice"),
                });
            }
        }
        for (k, (name, tensor)) in outputs.iter().enumerate() {
            let path = format!("golden/{i}/output.{k}.npy");
            files.insert(path.clone(), tensor.to_npy()?);
            sample.outputs.insert(name.clone(), path);
        }
        golden.push(sample);
    }
    // External data files sit next to the model, named as the model names them.
    for (location, bytes) in data {
        if files.contains_key(&location) || location == MODEL_FILE {
            return Err(Error::InvalidOption {
                reason: format!("external data file {location:?} collides with a bundle file"),
            });
        }
        files.insert(location, bytes);
    }
    files.insert(MODEL_FILE.to_string(), model_bytes);
    let expires = crate::signed::expires_after(SystemTime::now(), spec.valid_for)?;
    let manifest = Manifest {
        kind: ManifestType::TernBundle,
        spec_version: SPEC_VERSION,
        name: spec.name.clone(),
        version: spec.version,
        min_tern: spec.min_tern.clone(),
        expires,
        licence: spec.licence.clone(),
        model: MODEL_FILE.into(),
        inputs: model.inputs().to_vec(),
        outputs: model.outputs().to_vec(),
        files: files
            .iter()
            .map(|(p, b)| (p.clone(), FileMeta::of(b)))
            .collect(),
        golden,
        rollout: spec.rollout,
    };
    Bundle::new(manifest, files)
}
