//! Drift baselines: the distribution a model's tensors had when it was validated.
//!
//! A [`Baseline`] describes, for some tensors, the distribution seen when the model was
//! validated: bin edges and the expected share of values per bin, for the whole tensor or
//! per feature along an axis (channels of an image, columns of a table). It travels inside
//! the model (`metadata_props["tern.baseline"]`, JSON) or is given in
//! [`SessionOptions::baseline`](crate::SessionOptions::baseline). Sampled runs count their
//! values per bin ([`TensorBaseline::count`]); at upload telemetry compares the counts of a
//! batch with the baseline ([`crate::telemetry::drift`]). Model loading reads the baseline a
//! model carries; the CLI's `baseline` command builds one from samples and [`embed`]s it.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::onnx;
use crate::tensor::Tensor;

/// Returns the ONNX model `model` (serialized bytes) with `baseline` stored in its
/// `metadata_props["tern.baseline"]` (replacing any previous one), so it ships with the model.
pub fn embed(model: &[u8], baseline: &Baseline) -> Result<Vec<u8>> {
    let mut proto = onnx::decode(model)?;
    onnx::set_metadata(&mut proto, METADATA_KEY, baseline.to_json());
    Ok(onnx::encode(&proto))
}

/// The `metadata_props` key a model carries its baseline under.
pub const METADATA_KEY: &str = "tern.baseline";

/// Reference distribution of one tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorBaseline {
    /// Tensor (input or output) name.
    pub name: String,
    /// Feature axis (negative counts from the end); `None`: the whole tensor is one feature.
    #[serde(default)]
    pub axis: Option<i64>,
    /// Ascending bin edges: `n + 1` edges make `n` bins; values below the first or above the
    /// last edge count in the first or last bin.
    pub edges: Vec<f64>,
    /// Expected share of values per bin, one row per feature (one row when `axis` is `None`).
    pub proportions: Vec<Vec<f64>>,
}

/// Reference distributions for some of a model's tensors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// One entry per tensor watched.
    pub tensors: Vec<TensorBaseline>,
}

impl Baseline {
    /// Parses a baseline from JSON, checking its shape.
    pub fn from_json(json: &str) -> Result<Baseline> {
        let b: Baseline = serde_json::from_str(json).map_err(|e| Error::InvalidOption {
            reason: format!("invalid baseline JSON: {e}"),
        })?;
        for t in &b.tensors {
            let bins = t.edges.len().saturating_sub(1);
            let sorted = t.edges.windows(2).all(|w| w[0] < w[1]);
            if bins == 0
                || !sorted
                || t.proportions.is_empty()
                || t.proportions.iter().any(|r| r.len() != bins)
            {
                return Err(Error::InvalidOption {
                    reason: format!(
                        "baseline for {:?}: need ascending edges and one proportion per bin",
                        t.name
                    ),
                });
            }
        }
        Ok(b)
    }

    /// The baseline as JSON (to store in the model's metadata).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl TensorBaseline {
    /// Builds a baseline for tensor `name` from representative samples: `bins` bins at the
    /// quantiles of all values, proportions per feature along `axis`.
    pub fn from_samples(
        name: &str,
        axis: Option<i64>,
        samples: &[Tensor],
        bins: usize,
    ) -> Result<TensorBaseline> {
        let mut all = Vec::new();
        for t in samples {
            all.extend(
                t.to_f32_vec()?
                    .into_iter()
                    .filter(|v| v.is_finite())
                    .map(f64::from),
            );
        }
        if all.is_empty() || bins == 0 {
            return Err(Error::InvalidOption {
                reason: format!("no finite sample values for {name:?}"),
            });
        }
        all.sort_by(f64::total_cmp);
        let mut edges: Vec<f64> = (0..=bins)
            .map(|i| all[(i * (all.len() - 1)) / bins])
            .collect();
        edges.dedup();
        if edges.len() < 2 {
            edges = vec![edges[0] - 0.5, edges[0] + 0.5];
        }
        let mut base = TensorBaseline {
            name: name.to_string(),
            axis,
            edges,
            proportions: Vec::new(),
        };
        let mut counts: Vec<Vec<u64>> = Vec::new();
        for t in samples {
            let c = base.count(t).ok_or_else(|| Error::InvalidOption {
                reason: format!("samples for {name:?} do not have the feature axis {axis:?}"),
            })?;
            if counts.is_empty() {
                counts = c;
            } else if counts.len() == c.len() {
                counts
                    .iter_mut()
                    .zip(c)
                    .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(x, y)| *x += y));
            }
        }
        base.proportions = counts.iter().map(|row| shares(row)).collect();
        Ok(base)
    }

    /// Counts `t`'s finite values per feature and bin; `None` if its shape does not fit.
    pub fn count(&self, t: &Tensor) -> Option<Vec<Vec<u64>>> {
        let values = t.to_f32_vec().ok()?;
        let shape = t.shape();
        let (features, stride) = match self.axis {
            None => (1, values.len().max(1)),
            Some(a) => {
                let a = if a < 0 { shape.len() as i64 + a } else { a };
                let a = usize::try_from(a).ok().filter(|a| *a < shape.len())?;
                (shape[a], shape[a + 1..].iter().product::<usize>().max(1))
            }
        };
        if self.proportions.len() > 1 && self.proportions.len() != features {
            return None;
        }
        let bins = self.edges.len() - 1;
        let mut counts = vec![vec![0u64; bins]; features];
        for (i, v) in values.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let f = if self.axis.is_none() {
                0
            } else {
                (i / stride) % features
            };
            let bin = self.edges[1..bins].partition_point(|e| *e <= f64::from(*v));
            counts[f][bin] += 1;
        }
        Some(counts)
    }
}

/// Each count's share of their total.
pub(crate) fn shares(counts: &[u64]) -> Vec<f64> {
    let total = counts.iter().sum::<u64>().max(1) as f64;
    counts.iter().map(|c| *c as f64 / total).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two features (axis 1) of 100 values each, shifted by `offset` in feature 0.
    pub(crate) fn samples(offset: f32) -> Vec<Tensor> {
        // Two features (axis 1): feature 0 uniform in [0, 1), feature 1 uniform in [10, 11).
        (0..20)
            .map(|s| {
                let v: Vec<f32> = (0..100)
                    .flat_map(|i| {
                        let u = ((i * 37 + s * 11) % 100) as f32 / 100.0;
                        [u + offset, 10.0 + u]
                    })
                    .collect();
                Tensor::from_vec(&[100, 2], v).unwrap()
            })
            .collect()
    }

    #[test]
    fn a_baseline_embedded_in_a_model_comes_back_on_load() {
        let bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/magika/model.onnx"
        ))
        .unwrap();
        let base = Baseline {
            tensors: vec![TensorBaseline::from_samples("bytes", None, &samples(0.0), 4).unwrap()],
        };
        let twice = embed(&embed(&bytes, &base).unwrap(), &base).unwrap();
        let model = crate::Model::from_bytes(&twice).unwrap();
        assert_eq!(model.baseline(), Some(&base));
        assert_eq!(model.info().metadata.len(), 1, "replaced, not duplicated");
        assert!(embed(b"junk", &base).is_err());
    }

    #[test]
    fn json_round_trips_and_is_validated() {
        let base = TensorBaseline::from_samples("x", None, &samples(0.0), 4).unwrap();
        let b = Baseline {
            tensors: vec![base],
        };
        assert_eq!(Baseline::from_json(&b.to_json()).unwrap(), b);
        assert!(Baseline::from_json(
            r#"{"tensors":[{"name":"x","edges":[1,0],"proportions":[[1]]}]}"#
        )
        .is_err());
        assert!(Baseline::from_json("nope").is_err());
    }
}
