//! Softmax over the rows of a row-major `[rows, len]` block, in place:
//!
//! ```text
//! y[i] = exp(x[i] - max) / Σ_j exp(x[j] - max)
//! ```
//!
//! with [`exp`] a polynomial (Cephes' `expf`: range reduction by `ln 2` in two parts, a
//! degree-5 polynomial; within 2 ulp of the true value over the range softmax uses, and
//! held at `e^-87.34 ≈ 1.2e-38`, the smallest normal value, below that), the sum taken in 8 lanes (value `i` into lane `i mod 8`, the lanes then
//! added pairwise: [`lane_sum`]) and the division a multiplication by the sum's
//! reciprocal. That order is the definition: the scalar reference and the AVX2 path give
//! the same bits. A NaN in a row makes the whole row NaN, as onnxruntime's does.
//!
//! tract's softmax calls three generic row kernels per row (max, exp-sum, scale), whose
//! per-call cost dominates on short rows: an attention's softmax over 16 keys ran at
//! ~20 ns a value.

use crate::{Isa, Unsupported};

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` in two parts: the first exact in few bits, so `n · LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this, `exp` stays at its value here (the result's exponent would be subnormal).
const LOWEST: f32 = -87.336_54;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` by the polynomial: the definition the vector paths match (NaN stays NaN).
pub fn exp(x: f32) -> f32 {
    // As the vector path's `max(LOWEST, x)`: NaN passes through.
    let x = if LOWEST > x { LOWEST } else { x };
    let n = crate::quant::round_half_even(x * LOG2E);
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let mut p = P[0];
    for c in &P[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    // 2^n from its exponent bits (n is in -126..=0 for softmax's inputs, at most 128).
    let pow = f32::from_bits(((n as i32 + 127) as u32) << 23);
    y * pow
}

/// Eight lane sums added as the vector path reduces them.
pub fn lane_sum(s: [f32; 8]) -> f32 {
    let q = [s[0] + s[4], s[1] + s[5], s[2] + s[6], s[3] + s[7]];
    let h = [q[0] + q[2], q[1] + q[3]];
    h[0] + h[1]
}

/// Softmax of each `len`-long row of `data`, in place.
pub fn softmax_rows(isa: Isa, data: &mut [f32], len: usize) -> Result<(), Unsupported> {
    if len == 0 || !data.len().is_multiple_of(len) {
        return Err(Unsupported(format!(
            "softmax over rows of {len} in {} values",
            data.len()
        )));
    }
    for row in data.chunks_exact_mut(len) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 and FMA are available (checked here).
            Isa::Avx2 | Isa::Avx512 if isa.is_available() => unsafe { avx2::row(row) },
            _ => row_by_definition(row),
        }
    }
    Ok(())
}

/// One row by the definition.
fn row_by_definition(row: &mut [f32]) {
    // NaN skipped here; it makes its own exp, and so the sum, NaN.
    let max = row
        .iter()
        .fold(f32::NEG_INFINITY, |m, v| if *v > m { *v } else { m });
    let mut lanes = [0f32; 8];
    for (i, v) in row.iter_mut().enumerate() {
        *v = exp(*v - max);
        lanes[i % 8] += *v;
    }
    let inv = 1.0 / lane_sum(lanes);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::exp`] on 8 lanes.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(_mm256_set1_ps(super::LOWEST), x);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(super::LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_LO), r);
        let mut p = _mm256_set1_ps(super::P[0]);
        for c in &super::P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
        _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e)))
    }

    /// A mask loading or storing the first `n` (< 8) lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn tail_mask(n: usize) -> __m256i {
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx)
    }

    /// One row, as [`super::row_by_definition`].
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row(row: &mut [f32]) {
        let len = row.len();
        let full = len / 8 * 8;
        let ptr = row.as_mut_ptr();
        let mask = tail_mask(len - full);
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        // The tail's missing lanes read as -inf: no effect on the max.
        let load_tail = || {
            // SAFETY: the mask covers the `len - full` values from `full` on.
            let v = _mm256_maskload_ps(ptr.add(full), mask);
            _mm256_blendv_ps(ninf, v, _mm256_castsi256_ps(mask))
        };
        let mut m = ninf;
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 <= full <= len.
            m = _mm256_max_ps(_mm256_loadu_ps(ptr.add(i)), m);
            i += 8;
        }
        if full < len {
            m = _mm256_max_ps(load_tail(), m);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let max = lanes
            .iter()
            .fold(f32::NEG_INFINITY, |a, v| if *v > a { *v } else { a });
        let mx = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 <= full <= len.
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(ptr.add(i)), mx));
            _mm256_storeu_ps(ptr.add(i), e);
            sum = _mm256_add_ps(sum, e);
            i += 8;
        }
        let mut tail = _mm256_setzero_ps();
        if full < len {
            let e = exp8(_mm256_sub_ps(load_tail(), mx));
            // The missing lanes add nothing (their exp is the floor, not 0).
            tail = _mm256_blendv_ps(_mm256_setzero_ps(), e, _mm256_castsi256_ps(mask));
            sum = _mm256_add_ps(sum, tail);
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        let inv = _mm256_set1_ps(1.0 / super::lane_sum(lanes));
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 <= full <= len.
            _mm256_storeu_ps(ptr.add(i), _mm256_mul_ps(_mm256_loadu_ps(ptr.add(i)), inv));
            i += 8;
        }
        if full < len {
            // SAFETY: the mask covers the `len - full` values from `full` on.
            _mm256_maskstore_ps(ptr.add(full), mask, _mm256_mul_ps(tail, inv));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    #[test]
    fn exp_is_within_two_ulp_of_the_true_value() {
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            let ulp = f64::from(f32::EPSILON) * want;
            assert!(
                (got - want).abs() <= 2.0 * ulp,
                "exp({x}) = {got}, not {want}"
            );
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), exp(LOWEST));
        assert_eq!(exp(f32::NEG_INFINITY), exp(LOWEST));
        assert!(exp(LOWEST) < 1.2e-38);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn every_isa_matches_the_definition() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for _ in 0..300 {
            let len = rng.random_range(1..40);
            let rows = rng.random_range(1..4);
            let scale = [1.0, 10.0, 100.0][rng.random_range(0..3)];
            let mut x: Vec<f32> = (0..len * rows)
                .map(|_| rng.random_range(-1.0..1.0) * scale)
                .collect();
            if rng.random_range(0..10) == 0 {
                let at = rng.random_range(0..x.len());
                x[at] = [f32::NAN, f32::NEG_INFINITY, -1e30][rng.random_range(0..3)];
            }
            let mut want = x.clone();
            softmax_rows(Isa::Scalar, &mut want, len).unwrap();
            for (row, w) in x.chunks(len).zip(want.chunks(len)) {
                if row.iter().any(|v| v.is_nan()) {
                    assert!(w.iter().all(|v| v.is_nan()));
                } else {
                    let total: f32 = w.iter().sum();
                    assert!((total - 1.0).abs() < 1e-5, "{total}");
                }
            }
            for &isa in Isa::available() {
                let mut got = x.clone();
                softmax_rows(isa, &mut got, len).unwrap();
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{isa:?}"
                    );
                }
            }
        }
        assert!(softmax_rows(Isa::Scalar, &mut [1.0; 5], 2).is_err());
        assert!(softmax_rows(Isa::Scalar, &mut [1.0; 4], 0).is_err());
    }

    #[test]
    fn matches_softmax_in_f64() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.77).sin() * 12.0).collect();
        let max = x.iter().fold(f64::MIN, |m, v| m.max(f64::from(*v)));
        let e: Vec<f64> = x.iter().map(|v| (f64::from(*v) - max).exp()).collect();
        let total: f64 = e.iter().sum();
        let mut y = x.clone();
        softmax_rows(Isa::detect(), &mut y, x.len()).unwrap();
        for (got, e) in y.iter().zip(&e) {
            let want = e / total;
            assert!(
                (f64::from(*got) - want).abs() <= 1e-6 * want.max(1e-30),
                "{got} vs {want}"
            );
        }
    }
}
