//! int8 depthwise convolution with requantization fused: ONNX `QLinearConv` where
//! `group == channels` and each channel has one filter.
//!
//! Activations are `u8` with a zero point, weights `i8` with a zero point per channel (or
//! one for all), the bias `i32`; the output is requantized to `u8` in the same pass:
//!
//! ```text
//! acc[c, oy, ox] = bias[c] + Σ_taps (x[c, iy, ix] - x_zero) · (w[c, ky, kx] - w_zero[c])
//! y[c, oy, ox]   = clamp(round_half_even(acc · scale[c]) + y_zero, 0, 255)
//! scale[c]       = x_scale · w_scale[c] / y_scale
//! ```
//!
//! where padded taps contribute nothing (they read `x_zero`). This is what onnxruntime's
//! CPU provider computes (MLAS rounds half to even after a float multiply).
//!
//! tract runs such a layer as C one-row matrix products over a materialised im2col, with
//! the zero points corrected by separate graph ops. Here each channel's plane is copied once
//! into f32 rows as `x - x_zero`, padded with zeros, and the AVX2 path computes 8 outputs of
//! a row at once, borders included, one load and one FMA per tap — exact, since every
//! partial sum is an integer below 2²⁴, which [`DepthwiseQ8::new`] checks. The output is
//! requantized to `u8` in the same pass, or left as `i32` accumulators
//! ([`DepthwiseQ8::run_plane_acc`]) for a float epilogue.
//!
//! On AVX-512 with VNNI (`avx512`), the plane stays in bytes, padded with `x_zero`, and
//! `vpdpbusd` sums four taps of 16 outputs per instruction: 1.8–4.6× the AVX2 path on
//! MobileNet-style layers (`cargo bench -p tern-kernels --bench depthwise`), most on the
//! small planes of a classifier's last stages.

use crate::quant::requantize;
use crate::Isa;

pub use crate::geometry::Geometry;
pub use crate::Unsupported;

/// The quantization of one depthwise convolution.
#[derive(Debug, Clone, PartialEq)]
pub struct Quant {
    /// Activation zero point.
    pub x_zero: u8,
    /// Weight zero points: one, or one per channel.
    pub w_zero: Vec<i8>,
    /// `x_scale · w_scale[c] / y_scale`: one, or one per channel.
    pub scale: Vec<f32>,
    /// Output zero point.
    pub y_zero: u8,
}

/// A depthwise convolution with its weights prepared once (at plan time), run per image.
#[derive(Debug, Clone)]
// The vector path's fields are read only where there is one (x86-64 for now).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub struct DepthwiseQ8 {
    geometry: Geometry,
    out: [usize; 2],
    /// `w - w_zero`, per channel and tap.
    taps: Vec<i32>,
    /// The same as f32, for the vector path.
    taps_f32: Vec<f32>,
    bias: Vec<i32>,
    scale: Vec<f32>,
    x_zero: u8,
    y_zero: u8,
    /// Output rows and columns (inclusive ranges) whose taps are all in bounds.
    /// Whether f32 accumulation is exact for these weights (see the module docs).
    exact_in_f32: bool,
    /// The AVX-512 VNNI path's weights: per channel and kernel row, the taps in groups of
    /// four `i8` (zeros past the kernel's width) packed in an `i32`; empty where that path
    /// cannot run this layer (see `avx512`).
    quads: Vec<i32>,
    /// Per channel, what that path starts each sum at: `bias − x_zero · Σ taps`.
    corr: Vec<i32>,
}

/// The largest padded input plane the vector path copies (f32 values): 64 Mi, 256 MiB.
const MAX_PADDED_PLANE: usize = 1 << 26;

/// Largest bias magnitude accepted: leaves room for the zero-point correction in i32.
const BIAS_LIMIT: i64 = 1 << 30;

/// Checks a depthwise convolution's geometry and filter sizes (`weights` values for
/// `[C, 1, kh, kw]`, `bias` values: none or C) for either kernel; returns the output shape.
pub(crate) fn check_filters(
    g: &Geometry,
    weights: usize,
    bias: usize,
) -> Result<[usize; 2], Unsupported> {
    let err = |m: String| Err(Unsupported(m));
    let out = g.check()?;
    // The vector path copies each input plane into rows as wide as the dilated kernel's
    // reach past the last output: a geometry whose rows would dwarf any real plane (a
    // huge dilation balanced by huge pads) is refused rather than allocated.
    let reach = (out[1] * g.strides[1])
        .saturating_add((g.kernel[1] - 1).saturating_mul(g.dilations[1]))
        .saturating_add(16)
        .max(g.pads[1].saturating_add(g.input[1]));
    if reach.saturating_mul(g.input[0]) > MAX_PADDED_PLANE {
        return err(format!(
            "a padded plane of {reach} x {} values (dilation {:?}, pads {:?})",
            g.input[0], g.dilations, g.pads
        ));
    }
    let per_channel = g.kernel[0] * g.kernel[1];
    if weights != g.channels * per_channel {
        return err(format!(
            "{weights} weights for {} channels of {per_channel} taps",
            g.channels
        ));
    }
    if !(bias == 0 || bias == g.channels) {
        return err(format!("{bias} bias values for {} channels", g.channels));
    }
    Ok(out)
}

impl DepthwiseQ8 {
    /// Prepares the kernel: `weights` is `[C, 1, kh, kw]` flattened, `bias` has C values
    /// (or none). Fails on inconsistent sizes or values outside what the kernel computes
    /// exactly.
    pub fn new(
        geometry: Geometry,
        weights: &[i8],
        bias: &[i32],
        quant: &Quant,
    ) -> Result<DepthwiseQ8, Unsupported> {
        let g = geometry;
        let err = |m: String| Err(Unsupported(m));
        let out = check_filters(&g, weights.len(), bias.len())?;
        let per_channel = g.kernel[0] * g.kernel[1];
        if bias.iter().any(|b| i64::from(*b).abs() > BIAS_LIMIT) {
            return err("bias beyond ±2^30".into());
        }
        let per = |len: usize, what: &str| {
            if len == 1 || len == g.channels {
                Ok(())
            } else {
                Err(Unsupported(format!(
                    "{len} {what} for {} channels",
                    g.channels
                )))
            }
        };
        per(quant.w_zero.len(), "weight zero points")?;
        per(quant.scale.len(), "scales")?;
        if quant.scale.iter().any(|s| !s.is_finite() || *s < 0.0) {
            return err("scales must be finite and non-negative".into());
        }
        let pick = |v: &[i8], c: usize| if v.len() == 1 { v[0] } else { v[c] };
        let taps: Vec<i32> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| i32::from(*w) - i32::from(pick(&quant.w_zero, i / per_channel)))
            .collect();
        let bias: Vec<i32> = match bias.is_empty() {
            true => vec![0; g.channels],
            false => bias.to_vec(),
        };
        let widest = taps.iter().map(|t| t.unsigned_abs()).max().unwrap_or(0);
        let exact_in_f32 = per_channel as u64 * 255 * u64::from(widest) < (1 << 24);
        let scale = (0..g.channels)
            .map(|c| match quant.scale.len() {
                1 => quant.scale[0],
                _ => quant.scale[c],
            })
            .collect();
        let (quads, corr) = vnni_weights(&g, &taps, &bias, quant.x_zero);
        Ok(DepthwiseQ8 {
            geometry: g,
            out,
            taps_f32: taps.iter().map(|t| *t as f32).collect(),
            taps,
            bias,
            scale,
            x_zero: quant.x_zero,
            y_zero: quant.y_zero,
            exact_in_f32,
            quads,
            corr,
        })
    }

    /// The convolution's geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Output height and width.
    pub fn output_shape(&self) -> [usize; 2] {
        self.out
    }

    /// Multiply-accumulates per image (for GOPS figures).
    pub fn macs(&self) -> usize {
        self.geometry.channels
            * self.out[0]
            * self.out[1]
            * self.geometry.kernel[0]
            * self.geometry.kernel[1]
    }

    /// Runs one image: `x` has [`Geometry::input_len`] values, `y` [`Geometry::output_len`].
    /// Uses `isa` if this CPU has it, the scalar reference otherwise.
    pub fn run(&self, isa: Isa, x: &[u8], y: &mut [u8]) -> Result<(), Unsupported> {
        self.run_channels(isa, x, y, 0..self.geometry.channels)
    }

    /// Runs the channels in `channels` of one image (for splitting an image across
    /// threads): `x` and `y` are whole images.
    pub fn run_channels(
        &self,
        isa: Isa,
        x: &[u8],
        y: &mut [u8],
        channels: std::ops::Range<usize>,
    ) -> Result<(), Unsupported> {
        let g = &self.geometry;
        if x.len() != g.input_len() || y.len() != g.output_len() {
            return Err(Unsupported(format!(
                "buffers of {} and {} values for an image of {} in, {} out",
                x.len(),
                y.len(),
                g.input_len(),
                g.output_len()
            )));
        }
        if channels.end > g.channels {
            return Err(Unsupported(format!(
                "channels {channels:?} of {}",
                g.channels
            )));
        }
        let (plane_in, plane_out) = (self.plane_in(), self.plane_out());
        for c in channels {
            let xin = &x[c * plane_in..(c + 1) * plane_in];
            let yout = &mut y[c * plane_out..(c + 1) * plane_out];
            self.run_plane(isa, c, xin, yout)?;
        }
        Ok(())
    }

    /// Elements of one channel's input plane.
    pub fn plane_in(&self) -> usize {
        self.geometry.input[0] * self.geometry.input[1]
    }

    /// Elements of one channel's output plane.
    pub fn plane_out(&self) -> usize {
        self.out[0] * self.out[1]
    }

    /// Runs channel `c` alone: `x` is its input plane, `y` its output plane (so that
    /// planes can be handed to different threads).
    pub fn run_plane(&self, isa: Isa, c: usize, x: &[u8], y: &mut [u8]) -> Result<(), Unsupported> {
        self.check_plane(c, x.len(), y.len())?;
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if !self.quads.is_empty() && isa.is_available() => {
                // SAFETY: AVX-512 with VBMI and VNNI is available (checked here), the layer
                // has its VNNI weights, and the slices have the plane sizes the geometry
                // says (checked above), which is all `avx512::channel` indexes by.
                unsafe { avx512::channel(self, c, x, Out::Q8(y)) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 if self.exact_in_f32 && isa.is_available() => {
                // SAFETY: AVX2 and FMA are available (checked here); the slices have the
                // plane sizes the geometry says (checked above), which is all
                // `avx2::channel` indexes by.
                unsafe { avx2::channel(self, c, x, Out::Q8(y)) }
            }
            _ => self.channel_scalar(c, x, y),
        }
        Ok(())
    }

    /// Runs channel `c` alone as [`DepthwiseQ8::run_plane`] does, but writes the `i32`
    /// accumulators (bias and zero points included, not requantized) into `acc`: for a
    /// layer whose output goes on in float (`tern_kernels::epilogue`).
    pub fn run_plane_acc(
        &self,
        isa: Isa,
        c: usize,
        x: &[u8],
        acc: &mut [i32],
    ) -> Result<(), Unsupported> {
        self.check_plane(c, x.len(), acc.len())?;
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if !self.quads.is_empty() && isa.is_available() => {
                // SAFETY: as in `run_plane`.
                unsafe { avx512::channel(self, c, x, Out::Acc(acc)) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 if self.exact_in_f32 && isa.is_available() => {
                // SAFETY: as in `run_plane`.
                unsafe { avx2::channel(self, c, x, Out::Acc(acc)) }
            }
            _ => {
                for oy in 0..self.out[0] {
                    for ox in 0..self.out[1] {
                        acc[oy * self.out[1] + ox] = self.acc_scalar(c, x, oy, ox);
                    }
                }
            }
        }
        Ok(())
    }

    /// Refuses a plane index or plane buffers (`x_len` in, `y_len` out) this kernel does
    /// not have.
    fn check_plane(&self, c: usize, x_len: usize, y_len: usize) -> Result<(), Unsupported> {
        if c >= self.geometry.channels || x_len != self.plane_in() || y_len != self.plane_out() {
            return Err(Unsupported(format!(
                "plane {c} of {} with {x_len} and {y_len} values, for {} in, {} out",
                self.geometry.channels,
                self.plane_in(),
                self.plane_out()
            )));
        }
        Ok(())
    }

    /// The reference: every output of channel `c` by the definition.
    fn channel_scalar(&self, c: usize, x: &[u8], y: &mut [u8]) {
        for oy in 0..self.out[0] {
            for ox in 0..self.out[1] {
                let acc = self.acc_scalar(c, x, oy, ox);
                y[oy * self.out[1] + ox] = requantize(acc, self.scale[c], self.y_zero);
            }
        }
    }

    /// One accumulator by the definition (padded taps skipped: they read `x_zero`).
    fn acc_scalar(&self, c: usize, x: &[u8], oy: usize, ox: usize) -> i32 {
        let [kh, kw] = self.geometry.kernel;
        let taps = &self.taps[c * kh * kw..(c + 1) * kh * kw];
        self.geometry
            .taps_at(oy, ox)
            .fold(self.bias[c], |acc, (t, i)| {
                acc + (i32::from(x[i]) - i32::from(self.x_zero)) * taps[t]
            })
    }
}

/// Where a vector path writes one channel: requantized outputs, or the raw accumulators.
#[cfg(target_arch = "x86_64")]
enum Out<'a> {
    Q8(&'a mut [u8]),
    Acc(&'a mut [i32]),
}

/// The AVX-512 VNNI path's packed weights and per-channel starting sums (see `avx512`), or
/// two empty vectors where it cannot run the layer: a tap outside `i8`, a stride and
/// dilation whose 16 lanes' bytes span more than one 64-byte load, or sums that could leave `i32`.
fn vnni_weights(g: &Geometry, taps: &[i32], bias: &[i32], x_zero: u8) -> (Vec<i32>, Vec<i32>) {
    let [kh, kw] = g.kernel;
    let per_channel = kh * kw;
    let fits_i8 = taps.iter().all(|t| i8::try_from(*t).is_ok());
    let widest = taps
        .iter()
        .map(|t| i64::from(t.unsigned_abs()))
        .max()
        .unwrap_or(0);
    let reach = (per_channel as i64) * 255 * widest * 2 + (1 << 30);
    if !(fits_i8 && 15 * g.strides[1] + 3 * g.dilations[1] < 64 && reach < i64::from(i32::MAX)) {
        return (Vec::new(), Vec::new());
    }
    let nq = kw.div_ceil(4);
    let mut quads = Vec::with_capacity(g.channels * kh * nq);
    for row in taps.chunks_exact(kw) {
        for q in 0..nq {
            let mut b = [0u8; 4];
            for (i, b) in b.iter_mut().enumerate() {
                if let Some(t) = row.get(4 * q + i) {
                    *b = *t as i8 as u8;
                }
            }
            quads.push(i32::from_le_bytes(b));
        }
    }
    let corr = taps
        .chunks_exact(per_channel)
        .zip(bias)
        .map(|(t, b)| b - i32::from(x_zero) * t.iter().sum::<i32>())
        .collect();
    (quads, corr)
}

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{DepthwiseQ8, Geometry, Out};
    use std::arch::x86_64::*;

    /// Output chunks of 8 computed together.
    const GROUP: usize = 4;

    /// The sums over the taps of `N` consecutive chunks of 8 outputs, the first at column
    /// offset `at` (in the padded row): kernel rows `ky` (those inside the input), the
    /// first at offset `base` in `padded`, each next one `step` further.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; every load (`row + at + (N - 1) · 8 · sw + kx · dw`
    /// plus 8, or 16 for stride 2, for each row's offset `row`) must stay inside `padded`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn sums<const N: usize>(
        padded: &[f32],
        ky: std::ops::Range<usize>,
        base: usize,
        step: usize,
        taps: &[f32],
        kw: usize,
        dw: usize,
        sw: usize,
        at: usize,
    ) -> [__m256; N] {
        let mut acc = [_mm256_setzero_ps(); N];
        let p = padded.as_ptr();
        for (i, ky) in ky.enumerate() {
            let row = base + i * step;
            for kx in 0..kw {
                let t = _mm256_set1_ps(taps[ky * kw + kx]);
                for (j, acc) in acc.iter_mut().enumerate() {
                    let at = row + at + j * 8 * sw + kx * dw;
                    let v = if sw == 1 {
                        // SAFETY: inside `padded` (the caller's promise).
                        _mm256_loadu_ps(p.add(at))
                    } else {
                        // SAFETY: as above, with 16: the even ones of 16 values.
                        let a = _mm256_loadu_ps(p.add(at));
                        let b = _mm256_loadu_ps(p.add(at + 8));
                        // [a0 a2 b0 b2 | a4 a6 b4 b6] → [a0 a2 a4 a6 b0 b2 b4 b6]
                        let v = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
                        _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(
                            v,
                        )))
                    };
                    *acc = _mm256_fmadd_ps(v, t, *acc);
                }
            }
        }
        acc
    }

    /// One channel's input plane as f32 rows (each input value through `to`), padded
    /// with zeros on the left and right so that every 8-wide chunk's loads in
    /// [`plane_sums`] stay inside a row, written into `buf`; returns the row width. Rows of
    /// padding above and below are not stored ([`plane_sums`] skips them).
    pub(crate) fn padded_plane<S: Copy>(
        g: &Geometry,
        out_w: usize,
        x: &[S],
        to: impl Fn(S) -> f32,
        buf: &mut Vec<f32>,
    ) -> usize {
        let kw = g.kernel[1];
        let [in_h, in_w] = g.input;
        let (sw, dw, left) = (g.strides[1], g.dilations[1], g.pads[1]);
        let chunks = out_w.div_ceil(8);
        // 8 values per chunk, or 16 to keep the even ones for stride 2.
        let load = if sw == 1 { 8 } else { 16 };
        let width = ((chunks - 1) * 8 * sw + (kw - 1) * dw + load).max(left + in_w);
        buf.clear();
        buf.resize(width * in_h, 0.0);
        for (row, src) in buf.chunks_exact_mut(width).zip(x.chunks_exact(in_w)) {
            for (v, x) in row[left..left + in_w].iter_mut().zip(src) {
                *v = to(*x);
            }
        }
        width
    }

    thread_local! {
        /// This thread's buffer for padded planes, reused from plane to plane: a fresh
        /// allocation per plane cost as much as the taps of a small plane (ppocr_cls's
        /// depthwise planes are 2–3 rows of 96).
        static PADDED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    }

    /// The largest padded-plane buffer a thread keeps between planes (f32 values: 256 KiB).
    const KEEP: usize = 64 * 1024;

    /// This thread's padded-plane buffer (empty the first time), to hand back with
    /// [`return_buffer`].
    pub(crate) fn take_buffer() -> Vec<f32> {
        PADDED.take()
    }

    /// Keeps `buf` for this thread's next plane, unless it grew past [`KEEP`].
    pub(crate) fn return_buffer(buf: Vec<f32>) {
        if buf.capacity() <= KEEP {
            PADDED.set(buf);
        }
    }

    /// The sums over the taps of every output of one channel, 8 outputs of a row at a time
    /// (stride 1 or 2 along the width): `sink(oy, ox, sums)` gets the 8 sums of outputs
    /// `ox..ox + 8` of row `oy` (lanes past the row's end are garbage). Taps are added in
    /// order (kernel row, then column) with one FMA each, rows of padding skipped — the
    /// order a scalar reference with `mul_add` follows.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `padded` and `width` must come from
    /// [`padded_plane`] for this geometry and `out` its output shape, with stride 1 or 2
    /// along the width; `taps` must hold `kh · kw` values.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn plane_sums(
        g: &Geometry,
        [out_h, out_w]: [usize; 2],
        padded: &[f32],
        width: usize,
        taps: &[f32],
        mut sink: impl FnMut(usize, usize, __m256),
    ) {
        let (sh, sw) = (g.strides[0], g.strides[1]);
        let (dh, dw) = (g.dilations[0], g.dilations[1]);
        let [kh, kw] = g.kernel;
        let in_h = g.input[0];
        let chunks = out_w.div_ceil(8);
        for oy in 0..out_h {
            // Kernel rows inside the input for this output row, `pad ≤ top + ky·dh < pad +
            // in_h` (rows of padding are skipped: they would add zeros).
            let (top, pad) = (oy * sh, g.pads[0]);
            let lo = pad.saturating_sub(top).div_ceil(dh).min(kh);
            let hi = (pad + in_h).saturating_sub(top).div_ceil(dh).clamp(lo, kh);
            let ky = lo..hi;
            let (base, step) = ((top + lo * dh).saturating_sub(pad) * width, dh * width);
            // Four chunks at a time: four independent FMA chains hide the FMA latency.
            for first in (0..chunks).step_by(GROUP) {
                let n = GROUP.min(chunks - first);
                let sums = match n {
                    GROUP => {
                        let at = first * 8 * sw;
                        sums::<GROUP>(padded, ky.clone(), base, step, taps, kw, dw, sw, at)
                    }
                    _ => {
                        let mut s = [_mm256_setzero_ps(); GROUP];
                        for (j, s) in s.iter_mut().enumerate().take(n) {
                            let at = (first + j) * 8 * sw;
                            *s = sums::<1>(padded, ky.clone(), base, step, taps, kw, dw, sw, at)[0];
                        }
                        s
                    }
                };
                for (j, sum) in sums.into_iter().enumerate().take(n) {
                    sink(oy, (first + j) * 8, sum);
                }
            }
        }
    }

    /// Stores the first `n` lanes of `v` (all 8 when `n >= 8`) at `dst`.
    ///
    /// # Safety
    /// AVX must be available; `dst` must hold `min(n, 8)` values.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn store_f32(v: __m256, dst: &mut [f32]) {
        if dst.len() >= 8 {
            // SAFETY: 8 values fit (checked).
            _mm256_storeu_ps(dst.as_mut_ptr(), v);
        } else {
            let mut last = [0f32; 8];
            _mm256_storeu_ps(last.as_mut_ptr(), v);
            let n = dst.len();
            dst.copy_from_slice(&last[..n]);
        }
    }

    /// Channel `c` of one image over a copy of the plane with the zero point taken away
    /// (padding is then 0.0 and contributes what the definition says: nothing, once the
    /// zero point is folded into the bias), so no output needs the scalar path.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `x` must hold the channel's input plane and `y`
    /// its output plane.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn channel(k: &DepthwiseQ8, c: usize, x: &[u8], mut y: Out<'_>) {
        let g = &k.geometry;
        let [_, out_w] = k.out;
        if g.strides[1] > 2 {
            match y {
                Out::Q8(y) => k.channel_scalar(c, x, y),
                Out::Acc(acc) => {
                    for (i, a) in acc.iter_mut().enumerate() {
                        *a = k.acc_scalar(c, x, i / out_w, i % out_w);
                    }
                }
            }
            return;
        }
        let x_zero = i32::from(k.x_zero);
        let mut padded = take_buffer();
        let width = padded_plane(g, out_w, x, |x| (i32::from(x) - x_zero) as f32, &mut padded);
        let [kh, kw] = g.kernel;
        let taps = &k.taps_f32[c * kh * kw..(c + 1) * kh * kw];
        let scale = _mm256_set1_ps(k.scale[c]);
        let zero = _mm256_set1_epi32(i32::from(k.y_zero));
        let (lo_lim, hi_lim) = (
            _mm256_set1_ps(-crate::quant::ROUND_LIMIT),
            _mm256_set1_ps(crate::quant::ROUND_LIMIT),
        );
        let bias = _mm256_set1_epi32(k.bias[c]);
        plane_sums(g, k.out, &padded, width, taps, |oy, ox, acc| {
            // Exact integers (checked at construction): back to i32, bias, requantize.
            let acc = _mm256_add_epi32(_mm256_cvtps_epi32(acc), bias);
            let out = oy * out_w + ox;
            let y = match &mut y {
                Out::Q8(y) => y,
                Out::Acc(a) => {
                    if ox + 8 <= out_w {
                        // SAFETY: out + 8 <= (oy + 1) · out_w <= a.len().
                        _mm256_storeu_si256(a.as_mut_ptr().add(out) as *mut __m256i, acc);
                    } else {
                        let mut last = [0i32; 8];
                        _mm256_storeu_si256(last.as_mut_ptr() as *mut __m256i, acc);
                        a[out..oy * out_w + out_w].copy_from_slice(&last[..out_w - ox]);
                    }
                    return;
                }
            };
            let v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), scale);
            let v = _mm256_min_ps(_mm256_max_ps(v, lo_lim), hi_lim);
            // cvtps rounds half to even under the default rounding mode.
            let q = _mm256_add_epi32(_mm256_cvtps_epi32(v), zero);
            let q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
            let q8 = _mm_packus_epi16(q16, q16);
            if ox + 8 <= out_w {
                // SAFETY: out + 8 <= (oy + 1) · out_w <= y.len().
                _mm_storel_epi64(y.as_mut_ptr().add(out) as *mut __m128i, q8);
            } else {
                let mut last = [0u8; 8];
                _mm_storel_epi64(last.as_mut_ptr() as *mut __m128i, q8);
                y[out..oy * out_w + out_w].copy_from_slice(&last[..out_w - ox]);
            }
        });
        return_buffer(padded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    fn random_case(rng: &mut rand::rngs::StdRng) -> (DepthwiseQ8, Vec<u8>) {
        let k = [rng.random_range(1..=5), rng.random_range(1..=5)];
        let strides = [rng.random_range(1..=2), rng.random_range(1..=3)];
        let dilations = [rng.random_range(1..=2), rng.random_range(1..=2)];
        let pads = [0, 0, 0, 0].map(|_: usize| rng.random_range(0..=2));
        let reach = |i: usize| (k[i] - 1) * dilations[i] + 1;
        let input = [
            rng.random_range(reach(0).max(1)..=reach(0) + 30),
            rng.random_range(reach(1).max(1)..=reach(1) + 70),
        ];
        let g = Geometry {
            channels: rng.random_range(1..=6),
            input,
            kernel: k,
            strides,
            dilations,
            pads,
        };
        let weights: Vec<i8> = (0..g.channels * k[0] * k[1])
            .map(|_| rng.random())
            .collect();
        let bias: Vec<i32> = match rng.random_bool(0.8) {
            true => (0..g.channels)
                .map(|_| rng.random_range(-20000..20000))
                .collect(),
            false => vec![],
        };
        let per_channel = rng.random_bool(0.5);
        let n = if per_channel { g.channels } else { 1 };
        let quant = Quant {
            x_zero: rng.random(),
            w_zero: (0..n)
                .map(|_| {
                    if rng.random_bool(0.7) {
                        0
                    } else {
                        rng.random_range(-3..3)
                    }
                })
                .collect(),
            scale: (0..n).map(|_| rng.random_range(1e-5f32..4e-3)).collect(),
            y_zero: rng.random(),
        };
        let kernel = DepthwiseQ8::new(g, &weights, &bias, &quant).unwrap();
        let x = (0..g.input_len()).map(|_| rng.random()).collect();
        (kernel, x)
    }

    /// The reference, written again the plainest way: padded input, then the sum, then
    /// the requantization.
    fn by_definition(k: &DepthwiseQ8, x: &[u8]) -> Vec<u8> {
        let plane = k.plane_out();
        accumulators_by_definition(k, x)
            .iter()
            .enumerate()
            .map(|(i, acc)| {
                let c = i / plane;
                let v = (*acc as f32 * k.scale[c]).round_ties_even() as i64 + i64::from(k.y_zero);
                v.clamp(0, 255) as u8
            })
            .collect()
    }

    /// The accumulators by definition, image-wide (`[C, oh, ow]`).
    fn accumulators_by_definition(k: &DepthwiseQ8, x: &[u8]) -> Vec<i64> {
        let g = k.geometry;
        let [oh, ow] = k.out;
        let mut y = vec![0i64; g.output_len()];
        for c in 0..g.channels {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = k.bias[c] as i64;
                    for ky in 0..g.kernel[0] {
                        for kx in 0..g.kernel[1] {
                            let iy =
                                (oy * g.strides[0] + ky * g.dilations[0]) as i64 - g.pads[0] as i64;
                            let ix =
                                (ox * g.strides[1] + kx * g.dilations[1]) as i64 - g.pads[1] as i64;
                            let inside = (0..g.input[0] as i64).contains(&iy)
                                && (0..g.input[1] as i64).contains(&ix);
                            let v = if inside {
                                x[c * g.input[0] * g.input[1]
                                    + iy as usize * g.input[1]
                                    + ix as usize]
                            } else {
                                k.x_zero
                            };
                            let t = k.taps[c * g.kernel[0] * g.kernel[1] + ky * g.kernel[1] + kx];
                            acc += (i64::from(v) - i64::from(k.x_zero)) * i64::from(t);
                        }
                    }
                    y[(c * oh + oy) * ow + ox] = acc;
                }
            }
        }
        y
    }

    /// A dilation of 2^24 balanced by pads of 2^24 has a small output but would need a
    /// padded row of 16M bytes per input row: refused, not allocated.
    #[test]
    fn geometries_whose_padded_plane_is_huge_are_refused() {
        let g = Geometry {
            channels: 1,
            input: [64, 4],
            kernel: [1, 2],
            strides: [1, 1],
            dilations: [1, 1 << 24],
            pads: [0, 1 << 24, 0, 0],
        };
        assert!(g.check().is_ok());
        let quant = Quant {
            x_zero: 0,
            w_zero: vec![0],
            scale: vec![0.1],
            y_zero: 0,
        };
        let err = DepthwiseQ8::new(g, &[1, 1], &[], &quant).err();
        assert!(err.is_some_and(|e| e.0.contains("padded plane")));
    }

    #[test]
    fn every_isa_matches_the_definition_on_random_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for case in 0..400 {
            let (kernel, x) = random_case(&mut rng);
            let want = by_definition(&kernel, &x);
            for &isa in Isa::available() {
                let mut y = vec![0u8; kernel.geometry().output_len()];
                kernel.run(isa, &x, &mut y).unwrap();
                assert_eq!(y, want, "case {case} {isa:?} {:?}", kernel.geometry());
            }
        }
    }

    /// The raw accumulators (for a float epilogue) on every path, against the definition.
    #[test]
    fn accumulators_match_the_definition_on_every_isa() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(43);
        for case in 0..200 {
            let (kernel, x) = random_case(&mut rng);
            let want = accumulators_by_definition(&kernel, &x);
            let (plane_in, plane_out) = (kernel.plane_in(), kernel.plane_out());
            for &isa in Isa::available() {
                let mut got = vec![0i64; want.len()];
                for c in 0..kernel.geometry().channels {
                    let mut acc = vec![0i32; plane_out];
                    let x = &x[c * plane_in..(c + 1) * plane_in];
                    kernel.run_plane_acc(isa, c, x, &mut acc).unwrap();
                    for (g, a) in got[c * plane_out..].iter_mut().zip(&acc) {
                        *g = i64::from(*a);
                    }
                }
                assert_eq!(got, want, "case {case} {isa:?} {:?}", kernel.geometry());
            }
        }
        let (kernel, x) = random_case(&mut rng);
        let mut short = vec![0; kernel.plane_out() + 1];
        let x = &x[..kernel.plane_in()];
        assert!(kernel.run_plane_acc(Isa::Scalar, 0, x, &mut short).is_err());
    }

    #[test]
    fn the_vector_path_covers_real_layer_shapes() {
        // MobileNet-style layers: 3x3 stride 1 and 2, 5x5, wide enough
        // for the 8-wide path.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // ppocr's: stride 2 down the height alone, maps 1 to 3 rows high (no output row
        // has all its taps inside the input).
        for (k, s, hw) in [
            (3, [1, 1], [24, 96]),
            (3, [2, 2], [24, 96]),
            (5, [1, 1], [12, 48]),
            (5, [2, 2], [12, 48]),
            (3, [2, 1], [6, 96]),
            (5, [1, 1], [3, 96]),
            (3, [1, 1], [1, 96]),
        ] {
            let g = Geometry {
                channels: 16,
                input: hw,
                kernel: [k, k],
                strides: s,
                dilations: [1, 1],
                pads: [k / 2; 4],
            };
            let weights: Vec<i8> = (0..16 * k * k).map(|_| rng.random()).collect();
            let bias: Vec<i32> = (0..16).map(|_| rng.random_range(-5000..5000)).collect();
            let quant = Quant {
                x_zero: 131,
                w_zero: vec![0],
                scale: (0..16).map(|_| rng.random_range(1e-4f32..1e-3)).collect(),
                y_zero: 120,
            };
            let kernel = DepthwiseQ8::new(g, &weights, &bias, &quant).unwrap();
            assert!(kernel.exact_in_f32);
            // Symmetric int8 weights: the AVX-512 VNNI path takes every one of these.
            assert!(!kernel.quads.is_empty(), "k{k} s{s:?}");
            let x: Vec<u8> = (0..g.input_len()).map(|_| rng.random()).collect();
            let want = by_definition(&kernel, &x);
            for &isa in Isa::available() {
                let mut y = vec![0u8; g.output_len()];
                kernel.run(isa, &x, &mut y).unwrap();
                assert_eq!(y, want, "{isa:?} k{k} s{s:?} {hw:?}");
            }
        }
    }

    #[test]
    fn bad_parameters_and_buffers_are_refused_not_run() {
        let g = Geometry {
            channels: 2,
            input: [4, 4],
            kernel: [3, 3],
            strides: [1, 1],
            dilations: [1, 1],
            pads: [1; 4],
        };
        let q = Quant {
            x_zero: 0,
            w_zero: vec![0],
            scale: vec![0.1],
            y_zero: 0,
        };
        let w = vec![1i8; 18];
        assert!(DepthwiseQ8::new(g, &w[..17], &[], &q).is_err());
        assert!(DepthwiseQ8::new(g, &w, &[1, 2, 3], &q).is_err());
        assert!(DepthwiseQ8::new(
            Geometry {
                strides: [0, 1],
                ..g
            },
            &w,
            &[],
            &q
        )
        .is_err());
        assert!(DepthwiseQ8::new(
            Geometry {
                kernel: [9, 9],
                pads: [0; 4],
                ..g
            },
            &w,
            &[],
            &q
        )
        .is_err());
        assert!(DepthwiseQ8::new(
            g,
            &w,
            &[],
            &Quant {
                scale: vec![f32::NAN],
                ..q.clone()
            }
        )
        .is_err());
        assert!(DepthwiseQ8::new(g, &w, &[i32::MAX, 0], &q).is_err());
        let k = DepthwiseQ8::new(g, &w, &[], &q).unwrap();
        let mut y = vec![0u8; 32];
        for &isa in Isa::available() {
            assert!(k.run(isa, &[0u8; 31], &mut y).is_err());
            assert!(k.run(isa, &[0u8; 32], &mut y[..31]).is_err());
            assert!(k.run_channels(isa, &[0u8; 32], &mut y, 0..3).is_err());
            assert!(k.run_plane(isa, 2, &[0u8; 16], &mut y[..16]).is_err());
            assert!(k.run_plane(isa, 0, &[0u8; 15], &mut y[..16]).is_err());
            assert!(k.run_plane(isa, 0, &[0u8; 16], &mut y[..16]).is_ok());
        }
    }
}
