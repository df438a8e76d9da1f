//! The bundle's manifest: what the model is, what it promises, and the length and SHA-256
//! of every file in the bundle (TUF's target file metadata), all covered by the signatures.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tern::TensorInfo;

use crate::error::{Error, Result};

/// The manifest format this library writes and reads.
pub const SPEC_VERSION: u32 = 1;

/// The manifest's file name, always the bundle's first entry.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The manifest's `_type`, so a manifest is never mistaken for another signed document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManifestType {
    /// A tern bundle manifest.
    #[serde(rename = "tern-bundle")]
    TernBundle,
}

/// A bundle's signed manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`ManifestType::TernBundle`].
    #[serde(rename = "_type")]
    pub kind: ManifestType,
    /// The manifest format ([`SPEC_VERSION`]).
    pub spec_version: u32,
    /// The model's name: what a store and an update repository call it.
    pub name: String,
    /// The bundle's version: a store never installs a lower one than it has.
    pub version: u64,
    /// The oldest tern that can run it (semver).
    pub min_tern: String,
    /// When the signed manifest stops being valid (RFC 3339, UTC).
    pub expires: String,
    /// The model's licence, as the publisher states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub licence: Option<String>,
    /// The ONNX model's path in the bundle.
    pub model: String,
    /// The inputs the model takes (names, element types, shapes).
    pub inputs: Vec<TensorInfo>,
    /// The outputs it gives.
    pub outputs: Vec<TensorInfo>,
    /// Every other file in the bundle by path, with its length and hash.
    pub files: BTreeMap<String, FileMeta>,
    /// Inputs with the outputs the model gave where it was built.
    pub golden: Vec<GoldenSample>,
    /// How devices roll this version out when the app sets no policy of its own: each
    /// device finds its own cohort in it (a canary's share of devices by a hash of its
    /// install id), with no per-device server logic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::rollout::RolloutPolicy>,
}

/// A file's length and hashes, as TUF's targets metadata lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMeta {
    /// Its length in bytes.
    pub length: u64,
    /// Its hashes.
    pub hashes: Hashes,
}

/// A file's hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hashes {
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

impl FileMeta {
    /// The metadata of `bytes`.
    pub fn of(bytes: &[u8]) -> FileMeta {
        use sha2::{Digest, Sha256};
        FileMeta {
            length: bytes.len() as u64,
            hashes: Hashes {
                sha256: hex::encode(Sha256::digest(bytes)),
            },
        }
    }
}

/// One golden sample: input and output tensors by name (`.npy` files in the bundle) and
/// the tolerance outputs on a device must meet: `|device − golden| ≤ atol + rtol·|golden|`
/// element by element, NaN only where the golden output has NaN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenSample {
    /// Input name → file.
    pub inputs: BTreeMap<String, String>,
    /// Output name → file.
    pub outputs: BTreeMap<String, String>,
    /// Absolute tolerance.
    pub atol: Tolerance,
    /// Relative tolerance.
    pub rtol: Tolerance,
}

/// A tolerance, written as a decimal string (canonical JSON has no floats).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Tolerance(pub f64);

impl Serialize for Tolerance {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        decimal::serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for Tolerance {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        decimal::deserialize(d).map(Tolerance)
    }
}

/// Non-negative numbers in signed documents, as decimal strings (`"1e-4"`): canonical JSON
/// has no floats. For `#[serde(with = "…")]`.
pub mod decimal {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `v` as a decimal string.
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:e}"))
    }

    /// Reads a decimal string holding a finite number ≥ 0.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        let text = String::deserialize(d)?;
        match text.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
            _ => Err(serde::de::Error::custom(format!(
                "{text:?} is not a finite number ≥ 0"
            ))),
        }
    }
}

impl Manifest {
    /// Every file the bundle must hold besides the manifest: the model and the listed ones.
    pub(crate) fn check_references(&self) -> Result<()> {
        if self.spec_version != SPEC_VERSION {
            return Err(Error::malformed(format!(
                "manifest spec_version {} (this tern reads {SPEC_VERSION})",
                self.spec_version
            )));
        }
        let listed = |path: &str, what: &str| {
            if self.files.contains_key(path) {
                Ok(())
            } else {
                Err(Error::malformed(format!(
                    "{what} {path:?} is not listed in the manifest's files"
                )))
            }
        };
        check_name(&self.name).map_err(Error::malformed)?;
        listed(&self.model, "the model")?;
        for (i, sample) in self.golden.iter().enumerate() {
            for path in sample.inputs.values().chain(sample.outputs.values()) {
                listed(path, &format!("golden sample {i}'s file"))?;
            }
        }
        for path in self.files.keys() {
            crate::archive::check_path(path)?;
            if path == MANIFEST_FILE {
                return Err(Error::malformed("the manifest lists itself"));
            }
        }
        Ok(())
    }

    /// The bytes all files add up to.
    pub fn total_length(&self) -> u64 {
        self.files
            .values()
            .map(|f| f.length)
            .fold(0u64, u64::saturating_add)
    }
}

/// A model name: 1-128 ASCII letters, digits, `-`, `_` or `.`, not starting with `.` (it
/// names a folder in a store).
pub(crate) fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bundle name {name:?}: 1-128 letters, digits, '-', '_' or '.', not starting with '.'"
        ))
    }
}
