//! Model-health samples: aggregate statistics of a run's tensors (never the values
//! themselves) and their counts in the model's drift baseline. Sessions call [`sample`] on
//! the fraction of runs [`TelemetryConfig::health_sample_rate`](super::TelemetryConfig)
//! picks.

use super::record::{now_ns, DriftCounts, HealthRecord, TensorStats};
use crate::baseline::Baseline;
use crate::kinds::TensorRole;
use crate::tensor::Tensor;

/// The health record of one run of `model` (`version`): per tensor, its element and NaN
/// counts, mean, min and max of the finite values, and bin counts where `baseline` has the
/// tensor. Tensors that do not convert to f32 (strings) are left out.
pub(crate) fn sample<'t>(
    model: &str,
    version: &str,
    baseline: Option<&Baseline>,
    tensors: impl Iterator<Item = (TensorRole, &'t str, &'t Tensor)>,
) -> HealthRecord {
    let tensors = tensors
        .filter_map(|(io, name, t)| {
            let values = t.to_f32_vec().ok()?;
            let finite: Vec<f64> = values
                .iter()
                .filter(|v| v.is_finite())
                .map(|v| f64::from(*v))
                .collect();
            let n = finite.len().max(1) as f64;
            // With no finite value at all, the statistics are 0 (count and nan say why).
            let fold = |init: f64, f: fn(f64, f64) -> f64| match finite.iter().copied().reduce(f) {
                Some(v) => v,
                None => init,
            };
            let max = fold(0.0, f64::max);
            let drift = baseline
                .and_then(|b| b.tensors.iter().find(|tb| tb.name == name))
                .and_then(|tb| {
                    Some(DriftCounts {
                        counts: tb.count(t)?,
                        expected: tb.proportions.clone(),
                    })
                });
            Some(TensorStats {
                name: name.to_string(),
                io,
                count: values.len() as u64,
                nan: values.iter().filter(|v| v.is_nan()).count() as u64,
                mean: finite.iter().sum::<f64>() / n,
                min: fold(0.0, f64::min),
                max,
                top: max,
                drift,
            })
        })
        .collect();
    HealthRecord {
        at_ns: now_ns(),
        model: model.to_string(),
        version: version.to_string(),
        tensors,
    }
}
