//! The epilogue of a product: what turns its accumulators (`i32` for an int8 layer, `f32`
//! for a float one) into the layer's output when that output is not simply requantized.
//!
//! A statically quantized model whose convolutions are followed by float ops before the
//! next quantization (tern-quantize's output, and any QDQ model that leaves
//! BatchNormalization unfolded), and a float convolution with its bias, BatchNormalization
//! and activation, run, per output value:
//!
//! ```text
//! v = acc · scale[row] + bias[row]          the dequantization, with every per-channel or
//!                                           scalar Mul/Add/Sub/Div after it folded in
//!                                           (a BatchNormalization is one Mul and one Add)
//! v = min(max(v, lo), hi)                   Relu, Relu6, Clip
//! v = v · min(max(v + a, lo'), hi') · m     HardSwish as exporters write it (x·relu6(x+3)/6)
//! y = v, or quantize(v, inv_scale, zero)    f32 out, or u8 for the next int8 layer
//! ```
//!
//! each step optional. Computed row by row (a row is one output channel of one image, a
//! few KiB), each step a tight loop over the row the compiler vectorises, the row staying
//! in L1 — instead of one pass over the whole tensor per op. The folded affine step
//! rounds once where the graph rounded per op: results move by a float rounding (the
//! parity tests against onnxruntime state the tolerance).

use crate::quant::quantize_u8;
use crate::{Isa, Unsupported};

/// `v · min(max(v + add, lo), hi) · mul`: HardSwish (`add = 3, lo = 0, hi = 6, mul = 1/6`)
/// as exporters spell it out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HardSwish {
    /// Added before the clamp.
    pub add: f32,
    /// Lower clamp bound.
    pub lo: f32,
    /// Upper clamp bound.
    pub hi: f32,
    /// The final factor.
    pub mul: f32,
}

/// An accumulator an epilogue reads: an int8 product's `i32` or a float product's `f32`.
pub trait Acc: Copy {
    /// The value as f32.
    fn to_f32(self) -> f32;
}

impl Acc for i32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}

impl Acc for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

/// What a product's epilogue computes (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Epilogue {
    /// One per row: the accumulators' scale, with the folded ops' factors.
    pub scale: Vec<f32>,
    /// One per row: added after the scale.
    pub bias: Vec<f32>,
    /// The clamp after the affine step (`-∞..∞` when there is none).
    pub clamp: (f32, f32),
    /// A HardSwish after the clamp.
    pub hard_swish: Option<HardSwish>,
    /// Quantize the result to `u8`: the reciprocal of the scale and the zero point (as
    /// [`quantize`] takes them).
    pub quantize: Option<(f32, u8)>,
}

impl Epilogue {
    /// `acc · scale[row] + bias[row]` alone, for `scale.len()` rows.
    pub fn affine(scale: Vec<f32>, bias: Vec<f32>) -> Epilogue {
        Epilogue {
            scale,
            bias,
            clamp: (f32::NEG_INFINITY, f32::INFINITY),
            hard_swish: None,
            quantize: None,
        }
    }

    /// What it writes: `u8` when it quantizes, else `f32`.
    pub fn output_type(&self) -> OutputType {
        match self.quantize {
            Some(_) => OutputType::U8,
            None => OutputType::F32,
        }
    }

    /// Rows it is for.
    pub fn rows(&self) -> usize {
        self.scale.len()
    }

    /// The float value for accumulator `acc` of row `row`, before any quantization: the
    /// definition.
    pub fn value(&self, acc: impl Acc, row: usize) -> f32 {
        let v = acc.to_f32() * self.scale[row] + self.bias[row];
        let v = clamp(v, self.clamp.0, self.clamp.1);
        match self.hard_swish {
            Some(h) => v * clamp(v + h.add, h.lo, h.hi) * h.mul,
            None => v,
        }
    }
}

/// The element type an epilogue writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputType {
    /// `f32`.
    F32,
    /// `u8` (quantized).
    U8,
}

/// Where an epilogue writes.
pub enum Out<'a> {
    /// The float values.
    F32(&'a mut [f32]),
    /// The values quantized (the epilogue must have [`Epilogue::quantize`]).
    U8(&'a mut [u8]),
}

/// Runs `e` over a row-major block of accumulators, `cols` to a row, whose first row is
/// row `first` of the epilogue, into `y` (same layout). `isa` vectorises the quantization.
pub fn epilogue_rows<A: Acc>(
    isa: Isa,
    acc: &[A],
    cols: usize,
    e: &Epilogue,
    first: usize,
    y: Out<'_>,
) -> Result<(), Unsupported> {
    let y_len = match &y {
        Out::F32(y) => y.len(),
        Out::U8(y) => y.len(),
    };
    let quantized = matches!(y, Out::U8(_));
    let rows = acc.len().checked_div(cols).unwrap_or(0);
    if e.bias.len() != e.rows()
        || acc.len() != y_len
        || rows * cols != acc.len()
        || first + rows > e.rows()
        || quantized != e.quantize.is_some()
    {
        return Err(Unsupported(format!(
            "epilogue of {} rows ({} biases, quantized: {}) from {} accumulators ({cols} a \
             row, from row {first}) into {y_len} {} outputs",
            e.rows(),
            e.bias.len(),
            e.quantize.is_some(),
            acc.len(),
            if quantized { "u8" } else { "f32" }
        )));
    }
    match y {
        Out::F32(y) => match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 and FMA are available (checked here).
            Isa::Avx2 | Isa::Avx512 if isa.is_available() => unsafe {
                float_rows_avx2(e, acc, cols, first, y)
            },
            _ => float_rows(e, acc, cols, first, y),
        },
        Out::U8(y) => {
            let (inv_scale, zero) = e.quantize.unwrap_or((1.0, 0));
            let mut v = vec![0f32; cols];
            for (r, (acc, y)) in acc.chunks(cols).zip(y.chunks_mut(cols)).enumerate() {
                float_rows(e, acc, cols, first + r, &mut v);
                quantize_u8(isa, &v, inv_scale, zero, y)?;
            }
        }
    }
    Ok(())
}

/// The float values of whole rows (`cols` to a row, the first being row `first`).
#[inline(always)]
fn float_rows<A: Acc>(e: &Epilogue, acc: &[A], cols: usize, first: usize, y: &mut [f32]) {
    for (r, (acc, y)) in acc.chunks(cols).zip(y.chunks_mut(cols)).enumerate() {
        float_row(e, first + r, acc, y);
    }
}

/// [`float_rows`] compiled with AVX2 and FMA: the same code, auto-vectorised 8 wide. (Rust
/// never fuses `a · b + c` into an FMA on its own, so it computes the scalar path's bits.)
///
/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn float_rows_avx2<A: Acc>(
    e: &Epilogue,
    acc: &[A],
    cols: usize,
    first: usize,
    y: &mut [f32],
) {
    float_rows(e, acc, cols, first, y)
}

/// Runs `e` (which must not quantize) over a row-major block of a float product's
/// outputs in place, `cols` to a row, whose first row is row `first` of the epilogue: for
/// a float layer whose product wrote straight into its output.
pub fn epilogue_rows_in_place(
    isa: Isa,
    y: &mut [f32],
    cols: usize,
    e: &Epilogue,
    first: usize,
) -> Result<(), Unsupported> {
    let rows = y.len().checked_div(cols).unwrap_or(0);
    if e.bias.len() != e.rows()
        || rows * cols != y.len()
        || first + rows > e.rows()
        || e.quantize.is_some()
    {
        return Err(Unsupported(format!(
            "in-place epilogue of {} rows ({} biases, quantized: {}) over {} outputs ({cols} a \
             row, from row {first})",
            e.rows(),
            e.bias.len(),
            e.quantize.is_some(),
            y.len()
        )));
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA are available (checked here).
        Isa::Avx2 | Isa::Avx512 if isa.is_available() => unsafe {
            in_place_avx2(e, y, cols, first)
        },
        _ => in_place(e, y, cols, first),
    }
    Ok(())
}

/// The in-place epilogue of whole rows (checked by the caller).
#[inline(always)]
fn in_place(e: &Epilogue, y: &mut [f32], cols: usize, first: usize) {
    for (r, y) in y.chunks_mut(cols).enumerate() {
        let (s, b) = (e.scale[first + r], e.bias[first + r]);
        if (s, b) != (1.0, 0.0) {
            for v in y.iter_mut() {
                *v = *v * s + b;
            }
        }
        activation(e, y);
    }
}

/// [`in_place`] compiled with AVX2 and FMA (see [`float_rows_avx2`]).
///
/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn in_place_avx2(e: &Epilogue, y: &mut [f32], cols: usize, first: usize) {
    in_place(e, y, cols, first)
}

/// Row `row`'s float values, each step a loop over the row.
#[inline(always)]
fn float_row<A: Acc>(e: &Epilogue, row: usize, acc: &[A], v: &mut [f32]) {
    let (s, b) = (e.scale[row], e.bias[row]);
    for (v, a) in v.iter_mut().zip(acc) {
        *v = a.to_f32() * s + b;
    }
    activation(e, v);
}

/// The steps after the affine one (clamp, HardSwish) over one row, in place.
#[inline(always)]
fn activation(e: &Epilogue, v: &mut [f32]) {
    let (lo, hi) = e.clamp;
    if lo > f32::NEG_INFINITY || hi < f32::INFINITY {
        for v in v.iter_mut() {
            *v = clamp(*v, lo, hi);
        }
    }
    if let Some(h) = e.hard_swish {
        for v in v.iter_mut() {
            *v = *v * clamp(*v + h.add, h.lo, h.hi) * h.mul;
        }
    }
}

/// `v` within `lo..=hi`, NaN kept: written as comparisons, which the compiler turns into
/// vector min/max (`f32::max`/`min`'s NaN rules keep it scalar).
#[inline(always)]
fn clamp(v: f32, lo: f32, hi: f32) -> f32 {
    let v = if v < lo { lo } else { v };
    if v > hi {
        hi
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize;
    use rand::{RngExt, SeedableRng};

    fn random(rng: &mut rand::rngs::StdRng, rows: usize) -> Epilogue {
        let mut e = Epilogue::affine(
            (0..rows).map(|_| rng.random_range(0.0001..0.01)).collect(),
            (0..rows).map(|_| rng.random_range(-3.0..3.0)).collect(),
        );
        if rng.random() {
            e.clamp = (0.0, if rng.random() { 6.0 } else { f32::INFINITY });
        }
        if rng.random() {
            e.hard_swish = Some(HardSwish {
                add: 3.0,
                lo: 0.0,
                hi: 6.0,
                mul: 1.0 / 6.0,
            });
        }
        e
    }

    /// Every path (f32 and u8 out, every instruction set, any first row) against
    /// [`Epilogue::value`] and [`quantize`].
    #[test]
    fn rows_match_the_definition() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..300 {
            let rows = rng.random_range(1..7);
            let cols = rng.random_range(1..50);
            let mut e = random(&mut rng, rows);
            let first = rng.random_range(0..rows);
            let here = rows - first;
            let acc: Vec<i32> = (0..here * cols)
                .map(|_| rng.random_range(-200_000..200_000))
                .collect();
            let want: Vec<f32> = acc
                .iter()
                .enumerate()
                .map(|(i, a)| e.value(*a, first + i / cols))
                .collect();
            // A float product's accumulators, through a buffer and in place.
            let acc_f32: Vec<f32> = acc.iter().map(|a| *a as f32 * 1e-3).collect();
            let want_f32: Vec<f32> = acc_f32
                .iter()
                .enumerate()
                .map(|(i, a)| e.value(*a, first + i / cols))
                .collect();
            for &isa in Isa::available() {
                let mut y = vec![0f32; acc.len()];
                epilogue_rows(isa, &acc, cols, &e, first, Out::F32(&mut y)).unwrap();
                assert_eq!(y, want, "{isa:?}");
                epilogue_rows(isa, &acc_f32, cols, &e, first, Out::F32(&mut y)).unwrap();
                assert_eq!(y, want_f32, "{isa:?}");
                let mut in_place = acc_f32.clone();
                epilogue_rows_in_place(isa, &mut in_place, cols, &e, first).unwrap();
                assert_eq!(in_place, want_f32, "{isa:?}");
            }
            let (inv, zero) = (rng.random_range(1.0..40.0), rng.random());
            e.quantize = Some((inv, zero));
            let want: Vec<u8> = want.iter().map(|v| quantize(*v, inv, zero)).collect();
            for &isa in Isa::available() {
                let mut y = vec![0u8; acc.len()];
                epilogue_rows(isa, &acc, cols, &e, first, Out::U8(&mut y)).unwrap();
                assert_eq!(y, want, "{isa:?}");
            }
        }
    }

    #[test]
    fn hard_swish_is_x_relu6_x_plus_3_over_6() {
        let mut e = Epilogue::affine(vec![1.0], vec![0.0]);
        e.hard_swish = Some(HardSwish {
            add: 3.0,
            lo: 0.0,
            hi: 6.0,
            mul: 1.0 / 6.0,
        });
        let mut y = [0f32; 4];
        epilogue_rows(Isa::Scalar, &[-4, -1, 1, 5], 4, &e, 0, Out::F32(&mut y)).unwrap();
        assert_eq!(y, [0.0, -2.0 / 6.0, 4.0 / 6.0, 5.0]);
    }

    #[test]
    fn mismatched_buffers_are_refused() {
        let e = Epilogue::affine(vec![1.0; 2], vec![0.0; 2]);
        let run = |acc: &[i32], cols, first, y: Out<'_>| {
            epilogue_rows(Isa::Scalar, acc, cols, &e, first, y)
        };
        assert!(run(&[1, 2, 3, 4], 2, 0, Out::F32(&mut [0.0; 4])).is_ok());
        assert!(
            run(&[1, 2, 3, 4], 2, 1, Out::F32(&mut [0.0; 4])).is_err(),
            "rows"
        );
        assert!(
            run(&[1, 2, 3], 2, 0, Out::F32(&mut [0.0; 3])).is_err(),
            "ragged"
        );
        assert!(
            run(&[1, 2], 2, 0, Out::F32(&mut [0.0; 3])).is_err(),
            "lengths"
        );
        assert!(
            run(&[1, 2], 2, 0, Out::U8(&mut [0; 2])).is_err(),
            "no quantization"
        );
        assert!(
            run(&[1, 2], 0, 0, Out::F32(&mut [0.0; 2])).is_err(),
            "no columns"
        );
        assert!(epilogue_rows_in_place(Isa::Scalar, &mut [0.0; 4], 2, &e, 0).is_ok());
        assert!(epilogue_rows_in_place(Isa::Scalar, &mut [0.0; 4], 2, &e, 1).is_err());
        assert!(epilogue_rows_in_place(Isa::Scalar, &mut [0.0; 3], 2, &e, 0).is_err());
        let mut quantizing = e.clone();
        quantizing.quantize = Some((1.0, 0));
        assert!(epilogue_rows_in_place(Isa::Scalar, &mut [0.0; 4], 2, &quantizing, 0).is_err());
    }
}
