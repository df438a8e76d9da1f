//! Requantization: i32 accumulators to `u8` with a float scale per output channel, as
//! onnxruntime's CPU provider computes it (MLAS multiplies in f32, then rounds half to
//! even):
//!
//! ```text
//! y = clamp(round_half_even(acc · scale) + zero, 0, 255)
//! ```
//!
//! [`requantize_rows`] runs it over a row-major `[rows, cols]` block with one scale per row
//! (the output channels of a convolution or matrix product), vectorised where the CPU can.
//!
//! The element-wise passes between quantized layers are here too, as tract defines them
//! (its `QuantizeLinearU8` multiplies by the reciprocal of the scale):
//!
//! ```text
//! quantize:   y = clamp(round_half_even(x · inv_scale) + zero, 0, 255)   (NaN → 0)
//! dequantize: y = (x - zero) · scale
//! ```
//!
//! And ONNX's `DynamicQuantizeLinear`, which picks the scale and zero point from the
//! tensor's own range (widened to hold 0) and divides by the scale, as the operator's
//! definition and onnxruntime do:
//!
//! ```text
//! scale = (max == min ? 1 : max - min) / 255,   zero = clamp(round_half_even(-min / scale), 0, 255)
//! y     = clamp(round_half_even(x / scale) + zero, 0, 255)                 (NaN → 0)
//! ```
//!
//! [`dynamic_range`] finds `(min, max)` (NaN values skipped), [`DynamicQuant::of`] the
//! parameters, [`quantize_dynamic_u8`] the bytes.

use crate::{Isa, Unsupported};

/// Values converted to integers are kept within this range in every path, so the scalar
/// and vector conversions saturate alike.
pub(crate) const ROUND_LIMIT: f32 = 1.0e9;

/// `clamp(round_half_even(acc · scale) + zero, 0, 255)`: the definition.
pub fn requantize(acc: i32, scale: f32, zero: u8) -> u8 {
    let v = (acc as f32 * scale).clamp(-ROUND_LIMIT, ROUND_LIMIT);
    (round_half_even(v) as i32 + i32::from(zero)).clamp(0, 255) as u8
}

/// `v.round_ties_even()`, without the libm call it is on x86-64 without SSE4.1: below
/// 2²², adding and taking away 1.5 · 2²³ rounds to an integer in the FPU's default
/// round-to-nearest-even mode, exactly; above, every f32 is already one or a half.
pub(crate) fn round_half_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    if v.abs() < 4_194_304.0 {
        (v + MAGIC) - MAGIC
    } else {
        v.round_ties_even()
    }
}

/// Requantizes a row-major `[rows, cols]` block of accumulators, row `r` with `scale[r]`,
/// into `y` (same layout). `scale` has one value per row.
pub fn requantize_rows(
    isa: Isa,
    acc: &[i32],
    scale: &[f32],
    zero: u8,
    y: &mut [u8],
) -> Result<(), Unsupported> {
    let rows = scale.len();
    if rows == 0 || acc.len() != y.len() || !acc.len().is_multiple_of(rows) {
        return Err(Unsupported(format!(
            "requantize {} accumulators into {} outputs over {rows} rows",
            acc.len(),
            y.len()
        )));
    }
    let cols = acc.len() / rows;
    if cols == 0 {
        return Ok(());
    }
    for ((acc, y), scale) in acc.chunks(cols).zip(y.chunks_mut(cols)).zip(scale) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 if isa.is_available() => {
                // SAFETY: AVX2 is available (checked here); `acc` and `y` have the same
                // length (checked above), which is all `avx2::row` indexes by.
                unsafe { avx2::row(acc, *scale, zero, y) }
            }
            _ => {
                for (a, y) in acc.iter().zip(y.iter_mut()) {
                    *y = requantize(*a, *scale, zero);
                }
            }
        }
    }
    Ok(())
}

/// `clamp(round_half_even(x · inv_scale) + zero, 0, 255)`, NaN to 0: the definition.
pub fn quantize(x: f32, inv_scale: f32, zero: u8) -> u8 {
    to_u8(x * inv_scale, zero)
}

/// `clamp(round_half_even(v) + zero, 0, 255)`, NaN to 0: the bytes of both quantizations.
fn to_u8(v: f32, zero: u8) -> u8 {
    // As the vector path's max/min do: NaN takes the lower limit.
    let v = if v.is_nan() {
        -ROUND_LIMIT
    } else {
        v.clamp(-ROUND_LIMIT, ROUND_LIMIT)
    };
    (round_half_even(v) as i32 + i32::from(zero)).clamp(0, 255) as u8
}

/// Refuses an element-wise pass whose input and output lengths differ.
fn same_len<X, Y>(x: &[X], y: &[Y], what: &str) -> Result<(), Unsupported> {
    match x.len() == y.len() {
        true => Ok(()),
        false => Err(Unsupported(format!(
            "{what} {} values into {}",
            x.len(),
            y.len()
        ))),
    }
}

/// Quantizes `x` into `y` (same length) with one scale and zero point.
pub fn quantize_u8(
    isa: Isa,
    x: &[f32],
    inv_scale: f32,
    zero: u8,
    y: &mut [u8],
) -> Result<(), Unsupported> {
    quantize_slice::<false>(isa, x, inv_scale, zero, y)
}

/// [`quantize_div`] of each value of `x` (`DIV`, by `s`), or [`quantize`] (times `s`),
/// into `y` (same length).
fn quantize_slice<const DIV: bool>(
    isa: Isa,
    x: &[f32],
    s: f32,
    zero: u8,
    y: &mut [u8],
) -> Result<(), Unsupported> {
    same_len(x, y, "quantize")?;
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 is available (checked here); the slices have the same length.
        Isa::Avx2 | Isa::Avx512 if isa.is_available() => unsafe {
            avx2::quantize_by::<DIV>(x, s, zero, y)
        },
        _ => {
            for (x, y) in x.iter().zip(y.iter_mut()) {
                *y = match DIV {
                    true => quantize_div(*x, s, zero),
                    false => quantize(*x, s, zero),
                };
            }
        }
    }
    Ok(())
}

/// Dequantizes `x` into `y` (same length): `(x - zero) · scale`.
pub fn dequantize_u8(
    isa: Isa,
    x: &[u8],
    scale: f32,
    zero: u8,
    y: &mut [f32],
) -> Result<(), Unsupported> {
    same_len(x, y, "dequantize")?;
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 is available (checked here); the slices have the same length.
        Isa::Avx2 | Isa::Avx512 if isa.is_available() => unsafe {
            avx2::dequantize(x, scale, zero, y)
        },
        _ => {
            for (x, y) in x.iter().zip(y.iter_mut()) {
                *y = (i32::from(*x) - i32::from(zero)) as f32 * scale;
            }
        }
    }
    Ok(())
}

/// The parameters `DynamicQuantizeLinear` computes from a tensor's range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DynamicQuant {
    /// `(max - min) / 255`, or `1 / 255` when the range is one value.
    pub scale: f32,
    /// The byte that 0.0 maps to.
    pub zero: u8,
}

impl DynamicQuant {
    /// The parameters for values spanning `min..=max` (as [`dynamic_range`] returns them:
    /// `min ≤ 0 ≤ max`).
    pub fn of((min, max): (f32, f32)) -> DynamicQuant {
        let (min, max) = (min.min(0.0), max.max(0.0));
        let scale = if max == min { 1.0 } else { max - min } / 255.0;
        // NaN (an infinite range) takes the lower limit, as in `quantize`.
        let zero = -min / scale;
        let zero = if zero.is_nan() {
            0.0
        } else {
            zero.clamp(0.0, 255.0)
        };
        DynamicQuant {
            scale,
            zero: round_half_even(zero) as u8,
        }
    }
}

/// The smallest and largest of `x` and 0 (NaN values skipped): the range
/// `DynamicQuantizeLinear` maps onto `0..=255`.
pub fn dynamic_range(isa: Isa, x: &[f32]) -> (f32, f32) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 is available (checked here).
        Isa::Avx2 | Isa::Avx512 if isa.is_available() => unsafe { avx2::range(x) },
        _ => range_of(x, (0.0, 0.0)),
    }
}

/// `(min, max)` of `x` and `start`, NaN values skipped: the definition.
fn range_of(x: &[f32], start: (f32, f32)) -> (f32, f32) {
    x.iter().fold(start, |(lo, hi), &v| {
        // A NaN compares false both ways and changes nothing.
        (if v < lo { v } else { lo }, if v > hi { v } else { hi })
    })
}

/// `clamp(round_half_even(x / scale) + zero, 0, 255)`, NaN to 0: the definition of
/// `DynamicQuantizeLinear`'s bytes (a division, where [`quantize`] multiplies by a
/// reciprocal: they differ on some values).
pub fn quantize_div(x: f32, scale: f32, zero: u8) -> u8 {
    to_u8(x / scale, zero)
}

/// Quantizes `x` into `y` (same length) with [`quantize_div`]'s definition.
pub fn quantize_dynamic_u8(
    isa: Isa,
    x: &[f32],
    q: DynamicQuant,
    y: &mut [u8],
) -> Result<(), Unsupported> {
    quantize_slice::<true>(isa, x, q.scale, q.zero, y)
}

/// `acc · scale[c] + bias[c]`, the definition of [`dequantize_cols_in_place`] (two
/// roundings, as onnxruntime's `MatMulIntegerToFloat` computes it).
pub fn dequantize_acc(acc: i32, scale: f32, bias: f32) -> f32 {
    acc as f32 * scale + bias
}

/// Turns a row-major `[rows, cols]` block of `i32` accumulators into `f32` values in
/// place: `data[r, c]` becomes the bits of [`dequantize_acc`]`(data[r, c], scale[c],
/// bias[c])` (the buffer is then read as `f32`). `scale` and `bias` have one value per
/// column: the output channels of a `MatMulInteger` whose rows are tokens.
pub fn dequantize_cols_in_place(
    isa: Isa,
    data: &mut [i32],
    scale: &[f32],
    bias: &[f32],
) -> Result<(), Unsupported> {
    let cols = scale.len();
    if cols == 0 || bias.len() != cols || !data.len().is_multiple_of(cols) {
        return Err(Unsupported(format!(
            "dequantize {} accumulators by {cols} scales and {} biases a row",
            data.len(),
            bias.len()
        )));
    }
    for row in data.chunks_exact_mut(cols) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 is available (checked here); `row`, `scale` and `bias` have
            // the same length.
            Isa::Avx2 | Isa::Avx512 if isa.is_available() => unsafe {
                avx2::dequantize_cols(row, scale, bias)
            },
            _ => {
                for ((v, s), b) in row.iter_mut().zip(scale).zip(bias) {
                    *v = dequantize_acc(*v, *s, *b).to_bits() as i32;
                }
            }
        }
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// 8 lanes of f32 → clamp(round(v) + zero) as 8 bytes at `y`.
    ///
    /// # Safety
    /// AVX2 must be available; `y` must have 8 writable bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store_u8(v: __m256, zero: __m256i, y: *mut u8) {
        let (lo, hi) = (
            _mm256_set1_ps(-super::ROUND_LIMIT),
            _mm256_set1_ps(super::ROUND_LIMIT),
        );
        // max/min return their second operand for NaN: NaN becomes the lower limit.
        let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        // cvtps rounds half to even under the default rounding mode; the packs
        // saturate to 0..=255 as the definition clamps.
        let q = _mm256_add_epi32(_mm256_cvtps_epi32(v), zero);
        let q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
        _mm_storel_epi64(y as *mut __m128i, _mm_packus_epi16(q16, q16));
    }

    /// Each value divided by `s` (`DIV`) or times it, to bytes.
    ///
    /// # Safety
    /// AVX2 must be available; `x` and `y` must have the same length.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_by<const DIV: bool>(x: &[f32], s: f32, zero: u8, y: &mut [u8]) {
        let n = x.len().min(y.len());
        let sv = _mm256_set1_ps(s);
        let z = _mm256_set1_epi32(i32::from(zero));
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, the length of both slices.
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            let v = if DIV {
                _mm256_div_ps(v, sv)
            } else {
                _mm256_mul_ps(v, sv)
            };
            store_u8(v, z, y.as_mut_ptr().add(i));
            i += 8;
        }
        for j in i..n {
            y[j] = match DIV {
                true => super::quantize_div(x[j], s, zero),
                false => super::quantize(x[j], s, zero),
            };
        }
    }

    /// One row of [`super::dequantize_cols_in_place`].
    ///
    /// # Safety
    /// AVX2 must be available; `row`, `scale` and `bias` must have the same length.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequantize_cols(row: &mut [i32], scale: &[f32], bias: &[f32]) {
        let n = row.len().min(scale.len()).min(bias.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, the length of all three slices.
            let a = _mm256_cvtepi32_ps(_mm256_loadu_si256(row.as_ptr().add(i) as *const __m256i));
            let v = _mm256_add_ps(
                _mm256_mul_ps(a, _mm256_loadu_ps(scale.as_ptr().add(i))),
                _mm256_loadu_ps(bias.as_ptr().add(i)),
            );
            _mm256_storeu_si256(
                row.as_mut_ptr().add(i) as *mut __m256i,
                _mm256_castps_si256(v),
            );
            i += 8;
        }
        for j in i..n {
            row[j] = super::dequantize_acc(row[j], scale[j], bias[j]).to_bits() as i32;
        }
    }

    /// `(min, max)` of `x` and 0, NaN skipped.
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn range(x: &[f32]) -> (f32, f32) {
        let n = x.len();
        // Two accumulators each way, so consecutive min/max do not wait on each other.
        let (mut lo, mut hi) = ([_mm256_setzero_ps(); 2], [_mm256_setzero_ps(); 2]);
        let mut i = 0;
        while i + 16 <= n {
            for (j, (lo, hi)) in lo.iter_mut().zip(hi.iter_mut()).enumerate() {
                // SAFETY: i + 16 <= n.
                let v = _mm256_loadu_ps(x.as_ptr().add(i + 8 * j));
                // min/max return their second operand when either is NaN: the
                // accumulator, which is never NaN, so NaN values are skipped.
                *lo = _mm256_min_ps(v, *lo);
                *hi = _mm256_max_ps(v, *hi);
            }
            i += 16;
        }
        let mut lanes = [0f32; 8];
        let mut start = (0f32, 0f32);
        for (acc, pick_lo) in [
            (_mm256_min_ps(lo[0], lo[1]), true),
            (_mm256_max_ps(hi[0], hi[1]), false),
        ] {
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            let (l, h) = super::range_of(&lanes, (0.0, 0.0));
            if pick_lo {
                start.0 = l;
            } else {
                start.1 = h;
            }
        }
        super::range_of(&x[i..], start)
    }

    /// # Safety
    /// AVX2 must be available; `x` and `y` must have the same length.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequantize(x: &[u8], scale: f32, zero: u8, y: &mut [f32]) {
        let n = x.len().min(y.len());
        let s = _mm256_set1_ps(scale);
        let z = _mm256_set1_epi32(i32::from(zero));
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, the length of both slices.
            let b = _mm_loadl_epi64(x.as_ptr().add(i) as *const __m128i);
            let v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(b), z);
            _mm256_storeu_ps(
                y.as_mut_ptr().add(i),
                _mm256_mul_ps(_mm256_cvtepi32_ps(v), s),
            );
            i += 8;
        }
        for j in i..n {
            y[j] = (i32::from(x[j]) - i32::from(zero)) as f32 * scale;
        }
    }

    /// One row: 8 values at a time, the tail by the definition.
    ///
    /// # Safety
    /// AVX2 must be available; `acc` and `y` must have the same length.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn row(acc: &[i32], scale: f32, zero: u8, y: &mut [u8]) {
        let n = acc.len().min(y.len());
        let s = _mm256_set1_ps(scale);
        let z = _mm256_set1_epi32(i32::from(zero));
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, the length of both slices.
            let a = _mm256_loadu_si256(acc.as_ptr().add(i) as *const __m256i);
            store_u8(
                _mm256_mul_ps(_mm256_cvtepi32_ps(a), s),
                z,
                y.as_mut_ptr().add(i),
            );
            i += 8;
        }
        for j in i..n {
            y[j] = super::requantize(acc[j], scale, zero);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    #[test]
    fn every_isa_matches_the_definition() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let rows = rng.random_range(1..6);
            let cols = rng.random_range(0..40);
            let acc: Vec<i32> = (0..rows * cols)
                .map(|_| match rng.random_range(0..10) {
                    0 => rng.random(),
                    _ => rng.random_range(-100_000..100_000),
                })
                .collect();
            let scale: Vec<f32> = (0..rows).map(|_| rng.random_range(0.0..0.01)).collect();
            let zero = rng.random();
            let want: Vec<u8> = acc
                .chunks(cols.max(1))
                .zip(&scale)
                .flat_map(|(r, s)| r.iter().map(move |a| requantize(*a, *s, zero)))
                .collect();
            for &isa in Isa::available() {
                let mut y = vec![0; acc.len()];
                requantize_rows(isa, &acc, &scale, zero, &mut y).unwrap();
                assert_eq!(y, want, "{isa:?}");
            }
        }
    }

    #[test]
    fn quantize_and_dequantize_match_their_definitions_on_every_isa() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..100 {
            let n = rng.random_range(0..70);
            let mut x: Vec<f32> = (0..n).map(|_| rng.random_range(-300.0..300.0)).collect();
            // Ties, extremes and NaN.
            for (i, v) in [0.5, 1.5, -2.5, 1e30, -1e30, f32::NAN, f32::INFINITY]
                .iter()
                .enumerate()
            {
                if i < n {
                    x[i] = *v;
                }
            }
            let (inv, zero) = (rng.random_range(0.1..3.0), rng.random());
            let want: Vec<u8> = x.iter().map(|v| quantize(*v, inv, zero)).collect();
            let q: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            let scale = rng.random_range(0.001..1.0);
            let want_f: Vec<f32> = q
                .iter()
                .map(|v| (i32::from(*v) - i32::from(zero)) as f32 * scale)
                .collect();
            for &isa in Isa::available() {
                let mut y = vec![0; n];
                quantize_u8(isa, &x, inv, zero, &mut y).unwrap();
                assert_eq!(y, want, "{isa:?}");
                let mut f = vec![0.0; n];
                dequantize_u8(isa, &q, scale, zero, &mut f).unwrap();
                assert_eq!(f, want_f, "{isa:?}");
            }
        }
        assert!(quantize_u8(Isa::Scalar, &[1.0], 1.0, 0, &mut []).is_err());
        assert!(dequantize_u8(Isa::Scalar, &[1], 1.0, 0, &mut []).is_err());
    }

    #[test]
    fn dynamic_quantization_matches_its_definition_on_every_isa() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..200 {
            let n = rng.random_range(0..90);
            let shift = rng.random_range(-50.0..50.0);
            let mut x: Vec<f32> = (0..n)
                .map(|_| rng.random_range(-100.0..100.0) + shift)
                .collect();
            for v in [f32::NAN, -0.0, 0.5] {
                if n > 0 {
                    let at = rng.random_range(0..n);
                    x[at] = v;
                }
            }
            let want_range = range_of(&x, (0.0, 0.0));
            let q = DynamicQuant::of(want_range);
            let want: Vec<u8> = x
                .iter()
                .map(|v| quantize_div(*v, q.scale, q.zero))
                .collect();
            for &isa in Isa::available() {
                assert_eq!(dynamic_range(isa, &x), want_range, "{isa:?}");
                let mut y = vec![0; n];
                quantize_dynamic_u8(isa, &x, q, &mut y).unwrap();
                assert_eq!(y, want, "{isa:?}");
            }
        }
        assert!(
            quantize_dynamic_u8(Isa::Scalar, &[1.0], DynamicQuant::of((0.0, 1.0)), &mut [])
                .is_err()
        );
    }

    #[test]
    fn dynamic_quantization_gives_the_onnx_examples() {
        // The three examples of the ONNX operator's documentation and reference tests.
        let cases: [(&[f32], f32, u8, &[u8]); 3] = [
            (
                &[0., 2., -3., -2.5, 1.34, 0.5],
                0.019_607_844,
                153,
                &[153, 255, 0, 26, 221, 179],
            ),
            (
                &[-1., -2.1, -1.3, -2.5, -3.34, -4.],
                0.015_686_275,
                255,
                &[191, 121, 172, 96, 42, 0],
            ),
            (
                &[1., 2.1, 1.3, 2.5, 3.34, 4., 1.5, 2.6, 3.9, 4., 3., 2.345],
                0.015_686_275,
                0,
                &[64, 134, 83, 159, 213, 255, 96, 166, 249, 255, 191, 149],
            ),
        ];
        for (x, scale, zero, want) in cases {
            for &isa in Isa::available() {
                let q = DynamicQuant::of(dynamic_range(isa, x));
                assert!((q.scale - scale).abs() < 1e-8, "{isa:?} {q:?}");
                assert_eq!(q.zero, zero, "{isa:?}");
                let mut y = vec![0; x.len()];
                quantize_dynamic_u8(isa, x, q, &mut y).unwrap();
                assert_eq!(y, want, "{isa:?}");
            }
        }
        // One value (all zeros): the definition's scale of 1/255, not a division by 0.
        let q = DynamicQuant::of(dynamic_range(Isa::detect(), &[0.0; 5]));
        assert_eq!((q.scale, q.zero), (1.0 / 255.0, 0));
    }

    #[test]
    fn column_dequantization_matches_its_definition_on_every_isa() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..100 {
            let (rows, cols) = (rng.random_range(0..5), rng.random_range(1..40));
            let acc: Vec<i32> = (0..rows * cols)
                .map(|_| match rng.random_range(0..8) {
                    0 => rng.random(),
                    _ => rng.random_range(-300_000..300_000),
                })
                .collect();
            let scale: Vec<f32> = (0..cols).map(|_| rng.random_range(0.0..1e-3)).collect();
            let bias: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want: Vec<u32> = acc
                .chunks(cols)
                .flat_map(|r| {
                    r.iter()
                        .zip(&scale)
                        .zip(&bias)
                        .map(|((a, s), b)| dequantize_acc(*a, *s, *b).to_bits())
                })
                .collect();
            for &isa in Isa::available() {
                let mut data = acc.clone();
                dequantize_cols_in_place(isa, &mut data, &scale, &bias).unwrap();
                let got: Vec<u32> = data.iter().map(|v| *v as u32).collect();
                assert_eq!(got, want, "{isa:?}");
            }
        }
        assert!(
            dequantize_cols_in_place(Isa::Scalar, &mut [1, 2, 3], &[1.0, 1.0], &[0.0; 2]).is_err()
        );
        assert!(dequantize_cols_in_place(Isa::Scalar, &mut [1, 2], &[1.0, 1.0], &[0.0]).is_err());
    }

    #[test]
    fn halves_round_to_even_and_ends_saturate() {
        assert_eq!(requantize(5, 0.5, 0), 2);
        assert_eq!(requantize(7, 0.5, 0), 4);
        assert_eq!(requantize(-7, 0.5, 10), 6);
        assert_eq!(requantize(i32::MAX, 1.0, 0), 255);
        assert_eq!(requantize(i32::MIN, 1.0, 255), 0);
    }

    #[test]
    fn mismatched_buffers_are_refused() {
        let mut y = [0u8; 3];
        assert!(requantize_rows(Isa::Scalar, &[1, 2, 3, 4], &[1.0], 0, &mut y).is_err());
        assert!(requantize_rows(Isa::Scalar, &[1, 2, 3], &[1.0, 1.0], 0, &mut y).is_err());
        assert!(requantize_rows(Isa::Scalar, &[1, 2, 3], &[], 0, &mut y).is_err());
    }
}
