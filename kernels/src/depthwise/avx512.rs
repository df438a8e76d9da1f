//! The int8 depthwise convolution on AVX-512 VNNI: bytes in, `vpdpbusd` (four `u8 · i8`
//! products summed into each `i32` lane), 16 outputs of a row per instruction.
//!
//! Each channel's plane is copied once into a byte plane padded with the activation zero
//! point (so a padded tap reads `x_zero`, as the definition says), rows and columns of
//! padding stored. For the 16 outputs `ox..ox + 16` of a row and a kernel row, taps
//! `4q..4q + 4` of that row read bytes `ox·sw + (4q + i)·dw + j·sw` (lane `j`, byte `i`):
//! one 64-byte load at the group's first tap and one `vpermb` put them in place, and one
//! `vpdpbusd` multiplies them by the four weights (zero past the kernel's width). With
//! `acc = Σ x·t` over raw bytes, the zero point comes back as one constant per channel:
//! `bias − x_zero · Σ t` ([`DepthwiseQ8::new`] computes it). A 3×3 layer is 3 products per
//! 16 outputs where the AVX2 path takes 9 FMAs per 8.
//!
//! Taken when every tap `w − w_zero` fits an `i8` and the 16 lanes' bytes span one 64-byte
//! load (`15·sw + 3·dw < 64`); other layers take the AVX2 path.

use std::arch::x86_64::*;

use super::{DepthwiseQ8, Out};
use crate::quant::ROUND_LIMIT;

/// Output chunks of 16 computed together: independent `vpdpbusd` chains hide their latency.
const GROUP: usize = 4;

thread_local! {
    /// This thread's padded byte plane, reused from plane to plane.
    static PADDED: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The largest padded byte plane a thread keeps between planes (256 KiB).
const KEEP: usize = 256 * 1024;

/// One channel's input plane `x` copied into `buf` with `x_zero` around it: as many rows as
/// the outputs' taps reach, the input at row `top`, column `left`, and 64 bytes of slack
/// after the last row (every load reads 64 bytes); returns the row width.
fn padded_plane(k: &DepthwiseQ8, x: &[u8], buf: &mut Vec<u8>) -> usize {
    let g = &k.geometry;
    let [in_h, in_w] = g.input;
    let [out_h, out_w] = k.out;
    let (top, left) = (g.pads[0], g.pads[1]);
    let rows =
        ((out_h - 1) * g.strides[0] + (g.kernel[0] - 1) * g.dilations[0] + 1).max(top + in_h);
    let width =
        ((out_w - 1) * g.strides[1] + (g.kernel[1] - 1) * g.dilations[1] + 1).max(left + in_w);
    buf.clear();
    buf.resize(rows * width + 64, k.x_zero);
    for (row, src) in buf[top * width..]
        .chunks_exact_mut(width)
        .zip(x.chunks_exact(in_w))
    {
        row[left..left + in_w].copy_from_slice(src);
    }
    width
}

/// Channel `c` of one image.
///
/// # Safety
/// AVX-512 F, BW, VL, VBMI and VNNI must be available; `k` must have its VNNI weights
/// (`k.quads` not empty) and a geometry whose lanes' bytes fit one load (`super::vnni_weights` checks both); `x` must hold the channel's input
/// plane and `y` its output plane.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
pub(super) unsafe fn channel(k: &DepthwiseQ8, c: usize, x: &[u8], mut y: Out<'_>) {
    let g = &k.geometry;
    let [out_h, out_w] = k.out;
    let [kh, kw] = g.kernel;
    let (sh, sw) = (g.strides[0], g.strides[1]);
    let (dh, dw) = (g.dilations[0], g.dilations[1]);
    let nq = kw.div_ceil(4);
    let mut buf = PADDED.take();
    let width = padded_plane(k, x, &mut buf);
    // Lane j, byte i: the tap i of the group for output j, `j·sw + i·dw` past the load.
    let mut index = [0u8; 64];
    for (n, v) in index.iter_mut().enumerate() {
        *v = ((n / 4) * sw + (n % 4) * dw) as u8;
    }
    // SAFETY: 64 bytes.
    let index = unsafe { _mm512_loadu_si512(index.as_ptr() as *const __m512i) };
    let quads = &k.quads[c * kh * nq..(c + 1) * kh * nq];
    let start = _mm512_set1_epi32(k.corr[c]);
    let scale = _mm512_set1_ps(k.scale[c]);
    let (lo, hi) = (_mm512_set1_ps(-ROUND_LIMIT), _mm512_set1_ps(ROUND_LIMIT));
    let zero = _mm512_set1_epi32(i32::from(k.y_zero));
    let (floor, ceil) = (_mm512_setzero_si512(), _mm512_set1_epi32(255));
    let chunks = out_w.div_ceil(16);
    let p = buf.as_ptr();
    // The plane's chunks of 16 outputs, row after row, GROUP at a time (across rows, so
    // that planes a chunk or two wide still have independent chains).
    let items = out_h * chunks;
    for first in (0..items).step_by(GROUP) {
        let n = GROUP.min(items - first);
        let mut at = [0usize; GROUP];
        for (j, at) in at.iter_mut().enumerate().take(n) {
            let (oy, ch) = ((first + j) / chunks, (first + j) % chunks);
            *at = oy * sh * width + ch * 16 * sw;
        }
        let mut acc = [start; GROUP];
        for ky in 0..kh {
            for q in 0..nq {
                let w = _mm512_set1_epi32(quads[ky * nq + q]);
                let offset = ky * dh * width + 4 * q * dw;
                for (at, acc) in at.iter().zip(acc.iter_mut()).take(n) {
                    // SAFETY: the load starts at one of the chunk's first output's taps,
                    // inside the padded plane, and 64 bytes of slack follow its last row.
                    let v = unsafe { _mm512_loadu_si512(p.add(at + offset) as *const __m512i) };
                    let v = _mm512_permutexvar_epi8(index, v);
                    *acc = _mm512_dpbusd_epi32(*acc, v, w);
                }
            }
        }
        for (j, acc) in acc.into_iter().enumerate().take(n) {
            let (oy, ox) = ((first + j) / chunks, (first + j) % chunks * 16);
            let lanes = (out_w - ox).min(16);
            let mask: __mmask16 = ((1u32 << lanes) - 1) as u16;
            let out = oy * out_w + ox;
            match &mut y {
                // SAFETY: `lanes` values from `out` stay inside row `oy` of the plane.
                Out::Acc(a) => unsafe {
                    _mm512_mask_storeu_epi32(a.as_mut_ptr().add(out), mask, acc)
                },
                Out::Q8(y) => {
                    let v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), scale);
                    let v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
                    // cvtps rounds half to even under the default rounding mode.
                    let q = _mm512_add_epi32(_mm512_cvtps_epi32(v), zero);
                    let q = _mm512_min_epi32(_mm512_max_epi32(q, floor), ceil);
                    let bytes = _mm512_cvtepi32_epi8(q);
                    // SAFETY: as above.
                    unsafe { _mm_mask_storeu_epi8(y.as_mut_ptr().add(out) as *mut i8, mask, bytes) }
                }
            }
        }
    }
    if buf.capacity() <= KEEP {
        PADDED.set(buf);
    }
}
