//! im2col: one NCHW image to the `[C·kh·kw, oh·ow]` matrix a matrix-product kernel
//! multiplies the weights `[M, C·kh·kw]` by — `u8` shifted to `i8` for an int8 convolution
//! ([`im2col_q8`], [`im2col_q8_k4`]), `f32` as it is for a float one ([`im2col_f32`]).
//!
//! Integer matrix-product kernels (tract-linalg's VNNI and AVX2 ones, ARM's `sdot`)
//! multiply `i8` by `i8`; a `u8` activation `x` with zero point `z` is the `i8` value
//! `x - 128` with zero point `z - 128`, so each byte is flipped (`x ^ 0x80`) on the way
//! and padded taps are written as the shifted zero point, which contributes nothing once
//! the caller folds `-(z - 128) · Σ w` into its bias.

use crate::{Geometry, Unsupported};

/// The `u8` → `i8` shift: `x - 128`, bit for bit.
#[inline]
fn shift(x: u8) -> i8 {
    (x ^ 0x80) as i8
}

/// Writes the im2col matrix of one image: `x` has [`Geometry::input_len`] values, `out`
/// `C·kh·kw · oh·ow`, row `(c·kh + ky)·kw + kx`, column `oy·ow + ox`.
pub fn im2col_q8(g: &Geometry, x: &[u8], x_zero: u8, out: &mut [i8]) -> Result<(), Unsupported> {
    im2col(g, x, shift(x_zero), shift, out)
}

/// Writes the im2col matrix of one float image, as [`im2col_q8`] does (padded taps are
/// 0.0): `x` has [`Geometry::input_len`] values, `out` `C·kh·kw · oh·ow`.
pub fn im2col_f32(g: &Geometry, x: &[f32], out: &mut [f32]) -> Result<(), Unsupported> {
    im2col(g, x, 0.0, |v| v, out)
}

/// The im2col matrix of one image, each value through `to`, `pad` for padded taps.
fn im2col<S: Copy, D: Copy>(
    g: &Geometry,
    x: &[S],
    pad: D,
    to: impl Fn(S) -> D + Copy,
    out: &mut [D],
) -> Result<(), Unsupported> {
    let [oh, ow] = g.check()?;
    let rows = g.channels * g.kernel[0] * g.kernel[1];
    let cols = oh * ow;
    if x.len() != g.input_len() || out.len() != rows * cols {
        return Err(Unsupported(format!(
            "im2col of {} values into {} for {g:?}",
            x.len(),
            out.len()
        )));
    }
    for (k, row) in out.chunks_exact_mut(cols).enumerate() {
        fill_row(g, [oh, ow], x, pad, to, k, row);
    }
    Ok(())
}

/// Elements of the im2col matrix of one image in the `K4` packed layout with panels of `r`
/// columns (see [`im2col_q8_k4`]).
pub fn k4_len(g: &Geometry, r: usize) -> usize {
    let rows = g.channels * g.kernel[0] * g.kernel[1];
    let cols = g.output().map_or(0, |[h, w]| h * w);
    cols.div_ceil(r.max(1)) * rows.div_ceil(4) * 4 * r
}

/// Writes the im2col matrix of one image straight into the layout int8 matrix-product
/// kernels with a 4-deep dot product (x86 VNNI, ARM `sdot`) read their right-hand side
/// from, saving a separate packing pass: panels of `r` columns, each holding, per group of
/// 4 rows, the 4 values of each column side by side —
/// `out[(n / r)·P + (k / 4)·4r + (n % r)·4 + k % 4] = m[k][n]` with `P = ⌈K/4⌉·4·r` — and
/// zeros where `k` or `n` runs past the matrix. `out` has [`k4_len`] bytes, each the bits
/// of one `i8` value (a packed buffer is raw memory to the kernel reading it).
pub fn im2col_q8_k4(
    g: &Geometry,
    x: &[u8],
    x_zero: u8,
    r: usize,
    out: &mut [u8],
) -> Result<(), Unsupported> {
    let [oh, ow] = g.check()?;
    let rows = g.channels * g.kernel[0] * g.kernel[1];
    let cols = oh * ow;
    if r == 0 || x.len() != g.input_len() || out.len() != k4_len(g, r) {
        return Err(Unsupported(format!(
            "packed im2col of {} values into {} (panels of {r}) for {g:?}",
            x.len(),
            out.len()
        )));
    }
    let panel = rows.div_ceil(4) * 4 * r;
    // Raw bytes, flipped to i8 as they are interleaved; rows past the matrix are 0x80,
    // which the flip makes 0.
    let mut group = vec![0u8; 4 * cols];
    for kb in 0..rows.div_ceil(4) {
        for (i, row) in group.chunks_exact_mut(cols).enumerate() {
            match kb * 4 + i {
                k if k < rows => fill_row(g, [oh, ow], x, x_zero, |v| v, k, row),
                _ => row.fill(0x80),
            }
        }
        let (r0, rest) = group.split_at(cols);
        let (r1, rest) = rest.split_at(cols);
        let (r2, r3) = rest.split_at(cols);
        pack_group(kb, [r0, r1, r2, r3], cols, r, panel, out);
    }
    Ok(())
}

/// The bytes [`pack_rows_k4`] writes for `rows` rows of `k` values in panels of `r`.
pub fn rows_k4_len(rows: usize, k: usize, r: usize) -> usize {
    rows.div_ceil(r.max(1)) * k.div_ceil(4) * 4 * r
}

/// Packs the rows of a row-major `[rows, k]` matrix of `u8` values as the columns of a
/// matrix product's right-hand side, in the `K4` layout [`im2col_q8_k4`] writes (each row
/// is one column; values flipped to the `i8` values `x - 128`): the activations of a
/// `MatMulInteger`, whose rows (tokens) are the product's columns. Zeros where `k` or the
/// row runs past the matrix. `out` has [`rows_k4_len`] bytes.
pub fn pack_rows_k4(x: &[u8], k: usize, r: usize, out: &mut [u8]) -> Result<(), Unsupported> {
    let rows = x.len().checked_div(k).unwrap_or(0);
    if k == 0 || r == 0 || x.len() != rows * k || out.len() != rows_k4_len(rows, k, r) {
        return Err(Unsupported(format!(
            "packing {} values as rows of {k} into {} bytes (panels of {r})",
            x.len(),
            out.len()
        )));
    }
    let groups = k.div_ceil(4);
    let panel = groups * 4 * r;
    out.fill(0);
    for (m, row) in x.chunks_exact(k).enumerate() {
        let base = m / r * panel + m % r * 4;
        for (g, quad) in row.chunks(4).enumerate() {
            let at = base + g * 4 * r;
            for (o, v) in out[at..at + quad.len()].iter_mut().zip(quad) {
                *o = v ^ 0x80;
            }
        }
    }
    Ok(())
}

/// The layout of [`im2col_q8_k4_wide`]: the im2col matrix over the input padded once and
/// split into `sh · sw` phase planes (plane `(py, px)` holds the padded values at rows
/// `py, py + sh, …` and columns `px, px + sw, …`; with stride 1 the one plane is the
/// padded input). There the taps of consecutive output pixels are consecutive bytes, so
/// each matrix row is one contiguous run of a phase plane, interleaved into the packed
/// layout with no intermediate matrix. Output row `oy` starts at column `oy · stride` (the
/// phase planes' width); the `stride - ow` columns between two output rows are computed
/// and dropped ([`Wide::compact`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wide {
    /// Columns of the wide matrix: `(oh - 1) · stride + ow`.
    pub cols: usize,
    /// Distance between the first columns of two output rows: the phase planes' width.
    pub stride: usize,
    /// Height of the phase planes.
    pub rows: usize,
    /// Output height and width.
    pub out: [usize; 2],
}

impl Wide {
    /// The wide layout of `g`; `None` when `g` is malformed.
    pub fn of(g: &Geometry) -> Option<Wide> {
        let [oh, ow] = g.check().ok()?;
        let [sh, sw] = g.strides;
        let stride = (g.input[1] + g.pads[1] + g.pads[3]).div_ceil(sw);
        Some(Wide {
            cols: (oh - 1) * stride + ow,
            stride,
            rows: (g.input[0] + g.pads[0] + g.pads[2]).div_ceil(sh),
            out: [oh, ow],
        })
    }

    /// Bytes of the wide matrix of `g` packed in panels of `r` columns (as [`k4_len`]).
    pub fn k4_len(&self, g: &Geometry, r: usize) -> usize {
        let rows = g.channels * g.kernel[0] * g.kernel[1];
        self.cols.div_ceil(r.max(1)) * rows.div_ceil(4) * 4 * r
    }

    /// Moves each of `rows` rows of a product over the wide matrix (`rows × cols` values
    /// at the front of `data`) to the plain `rows × oh·ow` layout, in place, dropping the
    /// columns between output rows. Nothing moves when there are none.
    pub fn compact<T: Copy>(&self, data: &mut [T], rows: usize) -> Result<(), Unsupported> {
        let [oh, ow] = self.out;
        if data.len() < rows * self.cols {
            return Err(Unsupported(format!(
                "{} values for {rows} wide rows of {}",
                data.len(),
                self.cols
            )));
        }
        if self.stride == ow {
            return Ok(());
        }
        // Each destination starts at or before its source: forward copies are safe.
        for o in 0..rows {
            for oy in 0..oh {
                let from = o * self.cols + oy * self.stride;
                data.copy_within(from..from + ow, (o * oh + oy) * ow);
            }
        }
        Ok(())
    }
}

/// Writes the wide im2col matrix ([`Wide`]) of one image in the `K4` layout of
/// [`im2col_q8_k4`] with panels of `r` columns: the input is copied once into `scratch` as
/// its phase planes, with its padding (the zero point) around it — unless the stride is 1
/// and there is no padding: then the input is the plane — and every group of 4 matrix rows
/// is interleaved straight from them. `out` has [`Wide::k4_len`] bytes.
pub fn im2col_q8_k4_wide(
    g: &Geometry,
    x: &[u8],
    x_zero: u8,
    r: usize,
    scratch: &mut Vec<u8>,
    out: &mut [u8],
) -> Result<Wide, Unsupported> {
    let wide = Wide::of(g).ok_or_else(|| Unsupported(format!("no wide im2col for {g:?}")))?;
    let rows = g.channels * g.kernel[0] * g.kernel[1];
    if r == 0 || x.len() != g.input_len() || out.len() != wide.k4_len(g, r) {
        return Err(Unsupported(format!(
            "wide packed im2col of {} values into {} (panels of {r}) for {g:?}",
            x.len(),
            out.len()
        )));
    }
    let [ih, iw] = g.input;
    let [sh, sw] = g.strides;
    let (ws, plane) = (wide.stride, wide.rows * wide.stride);
    let src: &[u8] = if g.pads == [0; 4] && g.strides == [1, 1] {
        x
    } else {
        scratch.clear();
        scratch.resize(g.channels * sh * sw * plane, x_zero);
        for (c, image) in x.chunks_exact(ih * iw).enumerate() {
            for (iy, line) in image.chunks_exact(iw).enumerate() {
                let y = iy + g.pads[0];
                let row = ((c * sh + y % sh) * sw) * plane + y / sh * ws;
                if sw == 1 {
                    let at = row + g.pads[1];
                    scratch[at..at + iw].copy_from_slice(line);
                } else {
                    // Phase px holds the input columns ix with (ix + left) % sw == px.
                    let left = g.pads[1];
                    for px in 0..sw {
                        let ix = (px + sw - left % sw) % sw;
                        let at = row + px * plane + (ix + left) / sw;
                        let dst = &mut scratch[at..at + ws - (ix + left) / sw];
                        for (d, v) in dst.iter_mut().zip(line.iter().skip(ix).step_by(sw)) {
                            *d = *v;
                        }
                    }
                }
            }
        }
        scratch
    };
    let [kh, kw] = g.kernel;
    let [dh, dw] = g.dilations;
    // Rows past the matrix read 0x80, which the flip makes 0.
    let blank = if rows.is_multiple_of(4) {
        Vec::new()
    } else {
        vec![0x80u8; wide.cols]
    };
    let panel = rows.div_ceil(4) * 4 * r;
    for kb in 0..rows.div_ceil(4) {
        let row = |i: usize| -> &[u8] {
            let k = kb * 4 + i;
            if k >= rows {
                return &blank;
            }
            let (c, ky, kx) = (k / (kh * kw), k / kw % kh, k % kw);
            let (ty, tx) = (ky * dh, kx * dw);
            // Tap (ty, tx) of output (oy, ox) is padded input (oy·sh + ty, ox·sw + tx):
            // row oy + ty / sh, column ox + tx / sw of phase plane (ty % sh, tx % sw). The
            // last tap of the last output lies inside that plane.
            let start = ((c * sh + ty % sh) * sw + tx % sw) * plane + ty / sh * ws + tx / sw;
            &src[start..start + wide.cols]
        };
        pack_group(
            kb,
            [row(0), row(1), row(2), row(3)],
            wide.cols,
            r,
            panel,
            out,
        );
    }
    Ok(wide)
}

/// Interleaves group `kb` of four matrix rows (raw bytes of `cols` values, flipped to `i8`
/// on the way) into every panel of `out`; columns past the matrix are zero.
fn pack_group(kb: usize, rows: [&[u8]; 4], cols: usize, r: usize, panel: usize, out: &mut [u8]) {
    for (p, panel_out) in out.chunks_exact_mut(panel).enumerate() {
        let dst = &mut panel_out[kb * 4 * r..(kb + 1) * 4 * r];
        let n0 = p * r;
        let width = r.min(cols - n0);
        let (filled, rest) = dst.split_at_mut(4 * width);
        interleave4(rows.map(|row| &row[n0..n0 + width]), filled);
        if !rest.is_empty() {
            rest.fill(0);
        }
    }
}

/// `dst[4m + i] = rows[i][m] ^ 0x80` for every column `m` of `dst.len() / 4`: four rows of
/// `u8` values side by side as the `i8` values `x - 128`, as a K4 panel holds them.
fn interleave4(rows: [&[u8]; 4], dst: &mut [u8]) {
    let width = dst.len() / 4;
    assert!(rows.iter().all(|row| row.len() >= width));
    #[allow(unused_mut)]
    let mut m = 0;
    #[cfg(target_arch = "x86_64")]
    while m + 16 <= width {
        // SAFETY: SSE2 is part of x86-64; each row has at least `width` >= m + 16 values
        // (asserted above) and `dst` has 4 · width >= 4m + 64 bytes.
        unsafe { sse2::interleave16(rows, m, dst) };
        m += 16;
    }
    for m in m..width {
        dst[4 * m..4 * m + 4].copy_from_slice(&rows.map(|row| row[m] ^ 0x80));
    }
}

#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::*;

    /// Columns `m..m + 16` of four rows into `dst[4m..4m + 64]`, byte-interleaved and
    /// flipped to `i8` (`^ 0x80`).
    ///
    /// # Safety
    /// Every row must have `m + 16` values and `dst` `4m + 64` bytes.
    #[inline]
    pub(super) unsafe fn interleave16(rows: [&[u8]; 4], m: usize, dst: &mut [u8]) {
        let flip = _mm_set1_epi8(i8::MIN);
        let load = |row: &[u8]| {
            _mm_xor_si128(_mm_loadu_si128(row.as_ptr().add(m) as *const __m128i), flip)
        };
        let (a, b, c, d) = (load(rows[0]), load(rows[1]), load(rows[2]), load(rows[3]));
        // a0 b0 a1 b1 …, c0 d0 c1 d1 …, then 16-bit pairs of those: a0 b0 c0 d0 a1 …
        let (ab_lo, ab_hi) = (_mm_unpacklo_epi8(a, b), _mm_unpackhi_epi8(a, b));
        let (cd_lo, cd_hi) = (_mm_unpacklo_epi8(c, d), _mm_unpackhi_epi8(c, d));
        let out = dst.as_mut_ptr().add(4 * m) as *mut __m128i;
        _mm_storeu_si128(out, _mm_unpacklo_epi16(ab_lo, cd_lo));
        _mm_storeu_si128(out.add(1), _mm_unpackhi_epi16(ab_lo, cd_lo));
        _mm_storeu_si128(out.add(2), _mm_unpacklo_epi16(ab_hi, cd_hi));
        _mm_storeu_si128(out.add(3), _mm_unpackhi_epi16(ab_hi, cd_hi));
    }
}

/// Row `k` (channel `k / (kh·kw)`, tap `k % (kh·kw)`) of one image's im2col matrix: each
/// input value through `to`, `pad` where a tap falls outside the image.
fn fill_row<S: Copy, D: Copy>(
    g: &Geometry,
    [oh, ow]: [usize; 2],
    x: &[S],
    pad: D,
    to: impl Fn(S) -> D,
    k: usize,
    row: &mut [D],
) {
    let [kh, kw] = g.kernel;
    let [ih, iw] = g.input;
    let (c, ky, kx) = (k / (kh * kw), k / kw % kh, k % kw);
    let plane = &x[c * ih * iw..(c + 1) * ih * iw];
    // 1×1, stride 1, no padding: the row is the channel's plane.
    if kh == 1 && kw == 1 && g.strides == [1, 1] && g.pads == [0; 4] {
        for (o, x) in row.iter_mut().zip(plane) {
            *o = to(*x);
        }
        return;
    }
    let (sh, sw) = (g.strides[0], g.strides[1]);
    let (dh, dw) = (g.dilations[0], g.dilations[1]);
    // Output columns whose input column is inside the image: ox·sw + kx·dw - left in 0..iw.
    let shift_x = kx * dw;
    let lo = g.pads[1].saturating_sub(shift_x).div_ceil(sw).min(ow);
    let hi = (iw + g.pads[1])
        .checked_sub(shift_x)
        .map_or(0, |v| v.div_ceil(sw))
        .min(ow)
        .max(lo);
    for (oy, row) in row.chunks_exact_mut(ow).take(oh).enumerate() {
        let iy = (oy * sh + ky * dh).wrapping_sub(g.pads[0]);
        if iy >= ih {
            row.fill(pad);
            continue;
        }
        let line = &plane[iy * iw..(iy + 1) * iw];
        row[..lo].fill(pad);
        row[hi..].fill(pad);
        if lo == hi {
            continue;
        }
        let first = lo * sw + shift_x - g.pads[1];
        if sw == 1 {
            for (o, x) in row[lo..hi].iter_mut().zip(&line[first..]) {
                *o = to(*x);
            }
        } else {
            for (o, x) in row[lo..hi].iter_mut().zip(line[first..].iter().step_by(sw)) {
                *o = to(*x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    /// The definition, one value at a time.
    fn by_definition(g: &Geometry, x: &[u8], zero: u8) -> Vec<i8> {
        let [oh, ow] = g.output().unwrap();
        let [kh, kw] = g.kernel;
        let mut out = Vec::new();
        for c in 0..g.channels {
            for ky in 0..kh {
                for kx in 0..kw {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let iy = (oy * g.strides[0] + ky * g.dilations[0]) as isize
                                - g.pads[0] as isize;
                            let ix = (ox * g.strides[1] + kx * g.dilations[1]) as isize
                                - g.pads[1] as isize;
                            let inside = (0..g.input[0] as isize).contains(&iy)
                                && (0..g.input[1] as isize).contains(&ix);
                            let v = match inside {
                                true => {
                                    x[(c * g.input[0] + iy as usize) * g.input[1] + ix as usize]
                                }
                                false => zero,
                            };
                            out.push(v as i16 as i8 ^ i8::MIN);
                        }
                    }
                }
            }
        }
        out
    }

    /// A random well-formed layer (strides, dilations, padding, kernels up to 3×3), its
    /// output shape, an image and an input zero point; `None` when the kernel does not fit.
    #[allow(clippy::type_complexity)]
    fn random_case(rng: &mut rand::rngs::StdRng) -> Option<(Geometry, [usize; 2], Vec<u8>, u8)> {
        let g = Geometry {
            channels: rng.random_range(1..5),
            input: [rng.random_range(1..9), rng.random_range(1..12)],
            kernel: [rng.random_range(1..4), rng.random_range(1..4)],
            strides: [rng.random_range(1..4), rng.random_range(1..4)],
            dilations: [rng.random_range(1..3), rng.random_range(1..3)],
            pads: [0; 4].map(|_| rng.random_range(0..3)),
        };
        let out = g.output()?;
        let x = (0..g.input_len()).map(|_| rng.random()).collect();
        Some((g, out, x, rng.random()))
    }

    #[test]
    fn matches_the_definition_on_random_geometries() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut checked = 0;
        while checked < 300 {
            let Some((g, [oh, ow], x, zero)) = random_case(&mut rng) else {
                continue;
            };
            let mut out = vec![0; g.channels * g.kernel[0] * g.kernel[1] * oh * ow];
            im2col_q8(&g, &x, zero, &mut out).unwrap();
            let want = by_definition(&g, &x, zero);
            assert_eq!(out, want, "{g:?}");
            // The float matrix of the same image is the same matrix: with the zero point
            // taken away, padded taps are 0.
            let xf: Vec<f32> = x.iter().map(|v| f32::from(*v) - f32::from(zero)).collect();
            let mut outf = vec![f32::NAN; out.len()];
            im2col_f32(&g, &xf, &mut outf).unwrap();
            let wantf: Vec<f32> = want
                .iter()
                .map(|v| f32::from(*v) - (f32::from(zero) - 128.0))
                .collect();
            assert_eq!(outf, wantf, "{g:?}");
            checked += 1;
        }
    }

    /// Asserts that `packed` holds the `[k, cols]` matrix `value(k, n)` in the K4 layout
    /// with panels of `r`, zeros past it.
    fn assert_k4(
        packed: &[u8],
        [k, cols]: [usize; 2],
        r: usize,
        value: impl Fn(usize, usize) -> i8,
        what: &str,
    ) {
        let kp = k.div_ceil(4) * 4;
        for p in 0..cols.div_ceil(r) {
            for kk in 0..kp {
                for m in 0..r {
                    let (n, at) = (p * r + m, p * kp * r + kk / 4 * 4 * r + m * 4 + kk % 4);
                    let want = if kk < k && n < cols { value(kk, n) } else { 0 };
                    assert_eq!(packed[at] as i8, want, "{what} k{kk} n{n}");
                }
            }
        }
    }

    #[test]
    fn the_packed_layout_holds_the_same_matrix() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let mut checked = 0;
        while checked < 200 {
            let Some((g, [oh, ow], x, zero)) = random_case(&mut rng) else {
                continue;
            };
            let (rows, cols) = (g.channels * g.kernel[0] * g.kernel[1], oh * ow);
            let plain = by_definition(&g, &x, zero);
            for r in [8, 16] {
                let mut packed = vec![1u8; k4_len(&g, r)];
                im2col_q8_k4(&g, &x, zero, r, &mut packed).unwrap();
                let what = format!("{g:?} r{r}");
                assert_k4(&packed, [rows, cols], r, |k, n| plain[k * cols + n], &what);
            }
            checked += 1;
        }
    }

    #[test]
    fn packed_rows_are_the_columns_of_the_same_matrix() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        for _ in 0..100 {
            let (rows, k) = (rng.random_range(0..40), rng.random_range(1..30));
            let x: Vec<u8> = (0..rows * k).map(|_| rng.random()).collect();
            for r in [8, 16] {
                let mut packed = vec![1u8; rows_k4_len(rows, k, r)];
                pack_rows_k4(&x, k, r, &mut packed).unwrap();
                let value = |kk: usize, n: usize| x[n * k + kk].wrapping_sub(128) as i8;
                assert_k4(&packed, [k, rows], r, value, &format!("{rows}×{k} r{r}"));
            }
        }
        assert!(pack_rows_k4(&[1, 2, 3], 2, 8, &mut [0; 32]).is_err());
        assert!(pack_rows_k4(&[1, 2], 2, 8, &mut [0; 31]).is_err());
        assert!(pack_rows_k4(&[1, 2], 0, 8, &mut []).is_err());
    }

    #[test]
    fn the_wide_packed_layout_holds_the_same_matrix_at_every_output_pixel() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let mut checked = 0;
        let mut scratch = Vec::new();
        while checked < 300 {
            let Some((g, [oh, ow], x, zero)) = random_case(&mut rng) else {
                continue;
            };
            let (rows, cols) = (g.channels * g.kernel[0] * g.kernel[1], oh * ow);
            let plain = by_definition(&g, &x, zero);
            for r in [8, 16] {
                let wide = Wide::of(&g).unwrap();
                let mut packed = vec![1u8; wide.k4_len(&g, r)];
                let got = im2col_q8_k4_wide(&g, &x, zero, r, &mut scratch, &mut packed).unwrap();
                assert_eq!(got, wide);
                let kp = rows.div_ceil(4) * 4;
                let at = |k: usize, n: usize| (n / r) * kp * r + k / 4 * 4 * r + n % r * 4 + k % 4;
                for k in 0..kp {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let want = if k < rows {
                                plain[k * cols + oy * ow + ox]
                            } else {
                                0
                            };
                            let n = oy * wide.stride + ox;
                            assert_eq!(
                                packed[at(k, n)] as i8,
                                want,
                                "{g:?} r{r} k{k} ({oy}, {ox})"
                            );
                        }
                    }
                    // Past the wide matrix, panels hold zeros.
                    for n in wide.cols..wide.cols.div_ceil(r) * r {
                        assert_eq!(packed[at(k, n)], 0, "{g:?} r{r} k{k} n{n}");
                    }
                }
                // A product over the wide columns, compacted, is the plain one.
                let mut data: Vec<usize> = (0..2 * wide.cols).collect();
                wide.compact(&mut data, 2).unwrap();
                for o in 0..2 {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let want = o * wide.cols + oy * wide.stride + ox;
                            assert_eq!(data[o * cols + oy * ow + ox], want, "{g:?}");
                        }
                    }
                }
            }
            checked += 1;
        }
    }

    #[test]
    fn wrong_buffers_are_refused() {
        let g = Geometry {
            channels: 2,
            input: [3, 3],
            kernel: [3, 3],
            strides: [1, 1],
            dilations: [1, 1],
            pads: [1; 4],
        };
        assert!(im2col_q8(&g, &[0; 17], 0, &mut [0; 162]).is_err());
        assert!(im2col_q8(&g, &[0; 18], 0, &mut [0; 161]).is_err());
        assert!(im2col_q8(&g, &[0; 18], 0, &mut [0; 162]).is_ok());
        assert!(im2col_f32(&g, &[0.0; 17], &mut [0.0; 162]).is_err());
        assert!(im2col_f32(&g, &[0.0; 18], &mut [0.0; 161]).is_err());
        assert!(im2col_f32(&g, &[0.0; 18], &mut [0.0; 162]).is_ok());
        let len = k4_len(&g, 8);
        assert!(im2col_q8_k4(&g, &[0; 18], 0, 8, &mut vec![0; len - 1]).is_err());
        assert!(im2col_q8_k4(&g, &[0; 18], 0, 0, &mut vec![0; len]).is_err());
        assert!(im2col_q8_k4(&g, &[0; 18], 0, 8, &mut vec![0; len]).is_ok());
        let (wide, mut scratch) = (Wide::of(&g).unwrap(), Vec::new());
        let len = wide.k4_len(&g, 8);
        let mut run = |x: &[u8], r, len| {
            im2col_q8_k4_wide(&g, x, 0, r, &mut scratch, &mut vec![0; len]).is_ok()
        };
        assert!(!run(&[0; 17], 8, len));
        assert!(!run(&[0; 18], 8, len - 1));
        assert!(!run(&[0; 18], 0, len));
        assert!(run(&[0; 18], 8, len));
        assert!(wide.compact(&mut [0i32; 10], 2).is_err());
    }
}
