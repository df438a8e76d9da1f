//! Max pooling over NCHW planes: `y[oy][ox]` is the largest input value under the window
//! of output `(oy, ox)`, padded taps left out (ONNX's MaxPool) — for `f32` and for the
//! `u8` values of a quantized tensor (dequantizing and quantizing commute with the
//! maximum).
//!
//! Safe code only: the window's valid rows and columns are computed once per output row
//! and column, and the interior loop reads plain slices, which the compiler vectorises for
//! stride 1.

use crate::{Geometry, Unsupported};

/// A value max pooling can take the maximum of.
pub trait PoolValue: Copy + Send + Sync {
    /// The larger of `self` and `other`; for floats, a NaN loses to a number (as
    /// `f32::max`).
    fn larger(self, other: Self) -> Self;
}

impl PoolValue for u8 {
    #[inline]
    fn larger(self, other: Self) -> Self {
        self.max(other)
    }
}

impl PoolValue for f32 {
    #[inline]
    fn larger(self, other: Self) -> Self {
        self.max(other)
    }
}

/// Whether [`max_pool_plane`] takes `g`: well formed, dilation 1, and each padding
/// smaller than the kernel along its axis, so that every window holds an input value.
pub fn supports(g: &Geometry) -> Result<[usize; 2], Unsupported> {
    let out = g.check()?;
    if g.dilations != [1, 1]
        || g.pads[0] >= g.kernel[0]
        || g.pads[2] >= g.kernel[0]
        || g.pads[1] >= g.kernel[1]
        || g.pads[3] >= g.kernel[1]
    {
        return Err(Unsupported(format!(
            "max pool with dilation or padding as large as the window: {g:?}"
        )));
    }
    Ok(out)
}

/// The valid taps `[first, last)` along one axis of the window of output `o`.
fn taps(o: usize, stride: usize, pad: usize, kernel: usize, input: usize) -> (usize, usize) {
    let start = o * stride;
    let first = pad.saturating_sub(start);
    let last = (input + pad).saturating_sub(start).min(kernel);
    (first, last)
}

/// Max-pools one plane (`g.channels` is ignored: `x` is one `H × W` plane, `y` one
/// `oh × ow` plane).
pub fn max_pool_plane<T: PoolValue>(g: &Geometry, x: &[T], y: &mut [T]) -> Result<(), Unsupported> {
    let [oh, ow] = supports(g)?;
    let [ih, iw] = g.input;
    if x.len() != ih * iw || y.len() != oh * ow {
        return Err(Unsupported(format!(
            "max pool of {} values into {} for {g:?}",
            x.len(),
            y.len()
        )));
    }
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.strides;
    let cols: Vec<(usize, usize)> = (0..ow).map(|ox| taps(ox, sw, g.pads[1], kw, iw)).collect();
    for (oy, out) in y.chunks_exact_mut(ow).enumerate() {
        let (ky0, ky1) = taps(oy, sh, g.pads[0], kh, ih);
        let top = oy * sh + ky0 - g.pads[0];
        for (ox, (v, &(kx0, kx1))) in out.iter_mut().zip(&cols).enumerate() {
            let left = ox * sw + kx0 - g.pads[1];
            let mut m = x[top * iw + left];
            for ky in 0..ky1 - ky0 {
                let row = &x[(top + ky) * iw + left..(top + ky) * iw + left + (kx1 - kx0)];
                for &value in row {
                    m = m.larger(value);
                }
            }
            *v = m;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition: the largest value over the window's valid taps.
    fn by_definition(g: &Geometry, x: &[f32]) -> Vec<f32> {
        let [oh, ow] = g.output().unwrap();
        let mut y = Vec::new();
        for oy in 0..oh {
            for ox in 0..ow {
                let m = g
                    .taps_at(oy, ox)
                    .map(|(_, i)| x[i])
                    .fold(f32::NEG_INFINITY, f32::max);
                y.push(m);
            }
        }
        y
    }

    #[test]
    fn matches_the_definition_on_random_geometries() {
        let mut state = 0x9e37_79b9_u32;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as usize % n
        };
        let mut checked = 0;
        while checked < 300 {
            let kernel = [1 + next(5), 1 + next(5)];
            let g = Geometry {
                channels: 1,
                input: [1 + next(20), 1 + next(20)],
                kernel,
                strides: [1 + next(3), 1 + next(3)],
                dilations: [1, 1],
                pads: [
                    next(kernel[0]),
                    next(kernel[1]),
                    next(kernel[0]),
                    next(kernel[1]),
                ],
            };
            let Ok([oh, ow]) = supports(&g) else { continue };
            let x: Vec<f32> = (0..g.input[0] * g.input[1])
                .map(|_| next(1000) as f32 - 500.0)
                .collect();
            let mut y = vec![0f32; oh * ow];
            max_pool_plane(&g, &x, &mut y).unwrap();
            assert_eq!(y, by_definition(&g, &x), "{g:?}");
            // The same plane as bytes (values shifted into 0..=255 keep their order).
            let xb: Vec<u8> = x.iter().map(|v| ((v + 500.0) / 4.0) as u8).collect();
            let mut yb = vec![0u8; oh * ow];
            max_pool_plane(&g, &xb, &mut yb).unwrap();
            let want: Vec<f32> =
                by_definition(&g, &xb.iter().map(|v| *v as f32).collect::<Vec<_>>());
            assert_eq!(
                yb.iter().map(|v| *v as f32).collect::<Vec<_>>(),
                want,
                "{g:?}"
            );
            checked += 1;
        }
    }

    #[test]
    fn unsupported_geometries_and_buffers_are_refused() {
        let g = Geometry {
            channels: 1,
            input: [4, 4],
            kernel: [2, 2],
            strides: [2, 2],
            dilations: [1, 1],
            pads: [0; 4],
        };
        assert!(max_pool_plane(&g, &[0f32; 16], &mut [0f32; 4]).is_ok());
        assert!(max_pool_plane(&g, &[0f32; 15], &mut [0f32; 4]).is_err());
        assert!(max_pool_plane(&g, &[0f32; 16], &mut [0f32; 3]).is_err());
        let dilated = Geometry {
            dilations: [2, 1],
            ..g
        };
        assert!(max_pool_plane(&dilated, &[0f32; 16], &mut [0f32; 2]).is_err());
        let padded = Geometry {
            pads: [2, 0, 0, 0],
            ..g
        };
        assert!(supports(&padded).is_err());
        let big = Geometry {
            kernel: [5, 5],
            ..g
        };
        assert!(supports(&big).is_err());
    }
}
