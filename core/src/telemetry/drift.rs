//! Input and output drift: sampled runs count their values in the bins of the model's
//! [`Baseline`](crate::baseline::Baseline); at upload the counts of a batch are compared with
//! the baseline by the population stability index,
//! `PSI = Σ (actual − expected) · ln(actual / expected)`: below 0.1 is stable, above 0.25 a
//! real shift.

use crate::baseline::shares;

/// Population stability index of observed bin counts against expected shares.
pub fn psi(counts: &[u64], expected: &[f64]) -> f64 {
    const EPS: f64 = 1e-4;
    shares(counts)
        .iter()
        .zip(expected)
        .map(|(a, e)| {
            let (a, e) = (a.max(EPS), e.max(EPS));
            (a - e) * (a / e).ln()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baseline::tests::samples;
    use crate::baseline::TensorBaseline;

    #[test]
    fn same_distribution_is_stable_and_a_shift_is_not() {
        let base = TensorBaseline::from_samples("x", Some(-1), &samples(0.0), 10).unwrap();
        assert_eq!(base.proportions.len(), 2);
        let same = base.count(&samples(0.0)[3]).unwrap();
        assert!(psi(&same[0], &base.proportions[0]) < 0.1);
        let shifted = base.count(&samples(0.5)[3]).unwrap();
        assert!(
            psi(&shifted[0], &base.proportions[0]) > 0.25,
            "feature 0 moved"
        );
        assert!(
            psi(&shifted[1], &base.proportions[1]) < 0.1,
            "feature 1 did not"
        );
    }
}
