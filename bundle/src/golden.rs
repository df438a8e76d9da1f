//! Golden samples: inputs a bundle carries with the outputs the model gave where it was
//! built. Before a store activates a new version, the samples run on this device's own
//! backend and must match within the bundle's tolerance — a wrong kernel, a GPU driver bug
//! or a corrupt file that still parses is caught before the model serves anyone.

use std::collections::BTreeMap;

use tern::tensor::compare_close;
use tern::{Session, Tensor};

use crate::archive::Bundle;
use crate::error::{Error, Result};
use crate::manifest::GoldenSample;

/// How close one output came to its golden value.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OutputCheck {
    /// The sample's index in the manifest.
    pub sample: usize,
    /// The output's name.
    pub output: String,
    /// The largest absolute difference from the golden output.
    pub max_abs_diff: f64,
    /// The largest difference as a share of what the tolerance allows (≤ 1 passes).
    pub worst_share: f64,
}

/// The result of a passed golden check: every sample's outputs within tolerance.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GoldenReport {
    /// The samples run.
    pub samples: usize,
    /// One entry per sample and output.
    pub outputs: Vec<OutputCheck>,
}

impl GoldenReport {
    /// The largest [`OutputCheck::worst_share`] (0 with no outputs).
    pub fn worst_share(&self) -> f64 {
        self.outputs
            .iter()
            .map(|o| o.worst_share)
            .fold(0.0, f64::max)
    }
}

impl Bundle {
    /// A golden sample's inputs, by name.
    pub fn golden_inputs(&self, sample: &GoldenSample) -> Result<Vec<(String, Tensor)>> {
        sample
            .inputs
            .iter()
            .map(|(name, path)| Ok((name.clone(), self.tensor(path)?)))
            .collect()
    }

    /// Runs every golden sample on `session` (built from this bundle's model, on the
    /// backend the device will serve it with) and checks each output against the golden
    /// one: the first one out of tolerance is [`Error::GoldenMismatch`].
    pub fn check_golden(&self, session: &Session) -> Result<GoldenReport> {
        let mut outputs = Vec::new();
        for (i, sample) in self.manifest().golden.iter().enumerate() {
            let got = session.run(self.golden_inputs(sample)?)?;
            for (name, path) in &sample.outputs {
                let want = self.tensor(path)?;
                let actual = got.get(name).ok_or_else(|| Error::GoldenMismatch {
                    sample: i,
                    output: name.clone(),
                    detail: "the model gave no such output".into(),
                })?;
                let close = compare_close(actual, &want, sample.atol.0, sample.rtol.0).map_err(
                    |detail| Error::GoldenMismatch {
                        sample: i,
                        output: name.clone(),
                        detail,
                    },
                )?;
                outputs.push(OutputCheck {
                    sample: i,
                    output: name.clone(),
                    max_abs_diff: close.max_abs,
                    worst_share: close.worst_share,
                });
            }
        }
        Ok(GoldenReport {
            samples: self.manifest().golden.len(),
            outputs,
        })
    }
}

/// Golden outputs for `inputs`, computed by `session` (what `create` stores).
pub(crate) fn run_sample(
    session: &Session,
    inputs: &[(String, Tensor)],
) -> Result<BTreeMap<String, Tensor>> {
    let outputs = session.run(inputs.iter().map(|(n, t)| (n.clone(), t.clone())))?;
    Ok(outputs
        .iter()
        .map(|(name, t)| (name.to_string(), t.clone()))
        .collect())
}
