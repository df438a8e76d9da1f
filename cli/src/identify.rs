//! `tern identify`: the main job on the embedded default model.
//!
//! The default model is Google's magika `standard_v3_3` (Apache-2.0), a small network
//! that names the content type of a file (python, pdf, png, …) from its first and last
//! bytes. The feature extraction below follows magika's own (v2 features): up to
//! `block_size` bytes from each end, whitespace stripped, `beg_size`/`end_size` bytes
//! kept and padded with `padding_token`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tern::{Model, Session, SessionOptions, Tensor};

/// The embedded model and its label config.
#[cfg(feature = "embedded-model")]
const MODEL: &[u8] = include_bytes!("../../models/magika/model.onnx");
#[cfg(feature = "embedded-model")]
const CONFIG: &str = include_str!("../../models/magika/config.min.json");

/// magika's model config (the fields tern uses).
#[derive(Debug, Deserialize)]
pub struct MagikaConfig {
    beg_size: usize,
    end_size: usize,
    padding_token: i32,
    block_size: usize,
    min_file_size_for_dl: usize,
    medium_confidence_threshold: f32,
    target_labels_space: Vec<String>,
    #[serde(default)]
    thresholds: BTreeMap<String, f32>,
    #[serde(default)]
    overwrite_map: BTreeMap<String, String>,
}

/// The content type of one file.
#[derive(Debug, Serialize)]
pub struct Identification {
    /// The file.
    pub path: String,
    /// The label after thresholds (`txt`/`unknown` when the model is unsure).
    pub label: String,
    /// The model's top label and its probability.
    pub model_label: String,
    /// Probability of `model_label`.
    pub score: f32,
}

/// The content-type classifier: a session on the magika model plus its config.
pub struct Identifier {
    session: Session,
    input: String,
    config: MagikaConfig,
}

impl Identifier {
    /// The classifier on the embedded model, or on `model_dir` (holding `model.onnx` and
    /// `config.min.json`).
    pub fn new(model_dir: Option<&Path>, options: SessionOptions) -> Result<Identifier> {
        let (model, config) = match model_dir {
            Some(dir) => (
                Model::load(dir.join("model.onnx"))?,
                std::fs::read_to_string(dir.join("config.min.json"))
                    .with_context(|| format!("reading {}/config.min.json", dir.display()))?,
            ),
            None => embedded()?,
        };
        let config: MagikaConfig =
            serde_json::from_str(&config).context("parsing magika config")?;
        let input = model
            .inputs()
            .first()
            .context("model has no input")?
            .name
            .clone();
        Ok(Identifier {
            session: Session::new(&model, options)?,
            input,
            config,
        })
    }

    /// The session, for reporting.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Identifies every file in one batched run.
    pub fn identify(&self, paths: &[impl AsRef<Path>]) -> Result<Vec<Identification>> {
        let cfg = &self.config;
        let width = cfg.beg_size + cfg.end_size;
        let mut features = Vec::with_capacity(paths.len() * width);
        let mut contents = Vec::with_capacity(paths.len());
        for path in paths {
            let path = path.as_ref();
            // Regular files only (a FIFO would block, /dev/zero never end), up to 1 GiB.
            let bytes = tern::fs::read_regular(path, 1 << 30)
                .with_context(|| format!("reading {}", path.display()))?;
            features.extend(self.features(&bytes));
            contents.push(bytes);
        }
        let batch = Tensor::from_vec(&[paths.len(), width], features)?;
        let outputs = self.session.run([(self.input.as_str(), batch)])?;
        let scores = outputs[0].to_f32_vec()?;
        let labels = &cfg.target_labels_space;
        Ok(paths
            .iter()
            .zip(&contents)
            .zip(scores.chunks(labels.len()))
            .map(|((path, bytes), probs)| {
                let (best, score) = probs.iter().enumerate().fold((0, f32::MIN), |acc, (i, p)| {
                    if *p > acc.1 {
                        (i, *p)
                    } else {
                        acc
                    }
                });
                let model_label = labels[best].clone();
                let label = self.decide(&model_label, score, bytes);
                Identification {
                    path: path.as_ref().display().to_string(),
                    label,
                    model_label,
                    score,
                }
            })
            .collect())
    }

    /// magika's v2 features: stripped head and tail bytes, padded to fixed widths.
    fn features(&self, bytes: &[u8]) -> Vec<i32> {
        let cfg = &self.config;
        let block = cfg.block_size.min(bytes.len());
        let head = bytes[..block].trim_ascii_start();
        let tail = bytes[bytes.len() - block..].trim_ascii_end();
        let mut out = Vec::with_capacity(cfg.beg_size + cfg.end_size);
        let beg = &head[..head.len().min(cfg.beg_size)];
        out.extend(beg.iter().map(|b| i32::from(*b)));
        out.resize(cfg.beg_size, cfg.padding_token);
        let end = &tail[tail.len() - tail.len().min(cfg.end_size)..];
        out.resize(cfg.beg_size + cfg.end_size - end.len(), cfg.padding_token);
        out.extend(end.iter().map(|b| i32::from(*b)));
        out
    }

    /// Applies magika's per-label thresholds and overwrite map ("high confidence" mode).
    fn decide(&self, model_label: &str, score: f32, bytes: &[u8]) -> String {
        let cfg = &self.config;
        let is_text = std::str::from_utf8(bytes).is_ok();
        if bytes.is_empty() {
            return "empty".into();
        }
        if bytes.len() < cfg.min_file_size_for_dl {
            return if is_text {
                "txt".into()
            } else {
                "unknown".into()
            };
        }
        let threshold = cfg
            .thresholds
            .get(model_label)
            .copied()
            .unwrap_or(cfg.medium_confidence_threshold);
        let label = if score >= threshold {
            model_label.to_string()
        } else if is_text {
            "txt".to_string()
        } else {
            "unknown".to_string()
        };
        cfg.overwrite_map.get(&label).cloned().unwrap_or(label)
    }
}

#[cfg(feature = "embedded-model")]
fn embedded() -> Result<(Model, String)> {
    Ok((Model::from_bytes(MODEL)?, CONFIG.to_string()))
}

#[cfg(not(feature = "embedded-model"))]
fn embedded() -> Result<(Model, String)> {
    anyhow::bail!("this tern was built without the embedded model; pass --model-dir")
}

#[cfg(all(test, feature = "embedded-model"))]
mod tests {
    use super::*;

    fn identifier() -> Identifier {
        Identifier::new(None, SessionOptions::default()).unwrap()
    }

    #[test]
    fn features_strip_whitespace_and_pad() {
        let id = identifier();
        // Like magika: the head is only left-stripped, the tail only right-stripped.
        let f = id.features(b"  \nab\n ");
        assert_eq!(f.len(), 2048);
        assert_eq!(&f[..4], &[97, 98, 10, 32]);
        assert!(f[4..2043].iter().all(|v| *v == 256));
        assert_eq!(&f[2043..], &[32, 32, 10, 97, 98]);
    }

    #[test]
    fn tiny_and_empty_files_skip_the_model() {
        let id = identifier();
        assert_eq!(id.decide("python", 0.99, b""), "empty");
        assert_eq!(id.decide("python", 0.99, b"abc"), "txt");
        assert_eq!(id.decide("python", 0.99, &[0xff, 0xfe, 0]), "unknown");
    }
}
