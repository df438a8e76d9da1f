//! Float depthwise convolution: ONNX `Conv` on f32 where `group == channels` and each
//! channel has one filter (MobileNet's depthwise layers).
//!
//! ```text
//! y[c, oy, ox] = Σ_taps x[c, iy, ix] · w[c, ky, kx]  + bias[c]
//! ```
//!
//! padded taps contributing nothing. tract runs such a layer with a generic kernel whose
//! border outputs take a slow path; here each channel's plane is copied once into
//! zero-padded f32 rows and the AVX2 path computes 8 outputs of a row at once, borders
//! included, one load and one FMA per tap — the same loop as the int8 kernel
//! ([`crate::depthwise`]), over float values. Taps are summed in order (kernel row, then
//! column) with fused multiply-adds, the order the scalar reference follows, so both paths
//! agree bit for bit. What comes after the bias (BatchNormalization, activation) is the
//! caller's epilogue ([`crate::epilogue::epilogue_rows_in_place`]).

use crate::depthwise::check_filters;
use crate::{Geometry, Isa, Unsupported};

/// A float depthwise convolution with its filters prepared once (at plan time), run per
/// channel plane.
#[derive(Debug, Clone)]
pub struct DepthwiseF32 {
    geometry: Geometry,
    out: [usize; 2],
    /// Per channel and tap.
    taps: Vec<f32>,
    /// One per channel.
    bias: Vec<f32>,
}

impl DepthwiseF32 {
    /// Prepares the kernel: `weights` is `[C, 1, kh, kw]` flattened, `bias` has C values
    /// (or none). Fails on inconsistent sizes or a geometry the kernel does not run.
    pub fn new(geometry: Geometry, weights: &[f32], bias: &[f32]) -> Result<Self, Unsupported> {
        let out = check_filters(&geometry, weights.len(), bias.len())?;
        Ok(DepthwiseF32 {
            geometry,
            out,
            taps: weights.to_vec(),
            bias: match bias.is_empty() {
                true => vec![0.0; geometry.channels],
                false => bias.to_vec(),
            },
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

    /// Elements of one channel's input plane.
    pub fn plane_in(&self) -> usize {
        self.geometry.input[0] * self.geometry.input[1]
    }

    /// Elements of one channel's output plane.
    pub fn plane_out(&self) -> usize {
        self.out[0] * self.out[1]
    }

    /// Runs channel `c` alone: `x` is its input plane, `y` its output plane (so that
    /// planes can be handed to different threads). Uses `isa` if this CPU has it, the
    /// scalar reference otherwise.
    pub fn run_plane(
        &self,
        isa: Isa,
        c: usize,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<(), Unsupported> {
        if c >= self.geometry.channels || x.len() != self.plane_in() || y.len() != self.plane_out()
        {
            return Err(Unsupported(format!(
                "plane {c} of {} with {} and {} values, for {} in, {} out",
                self.geometry.channels,
                x.len(),
                y.len(),
                self.plane_in(),
                self.plane_out()
            )));
        }
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 if self.geometry.strides[1] <= 2 && isa.is_available() => {
                // SAFETY: AVX2 and FMA are available (checked here); the slices have the
                // plane sizes the geometry says (checked above); the stride along the
                // width is 1 or 2.
                unsafe { self.channel_avx2(c, x, y) }
            }
            _ => {
                let ow = self.out[1];
                for (i, y) in y.iter_mut().enumerate() {
                    *y = self.value_scalar(c, x, i / ow, i % ow);
                }
            }
        }
        Ok(())
    }

    /// The reference: output `(oy, ox)` of channel `c` by the definition, taps in order
    /// with fused multiply-adds.
    fn value_scalar(&self, c: usize, x: &[f32], oy: usize, ox: usize) -> f32 {
        let [kh, kw] = self.geometry.kernel;
        let taps = &self.taps[c * kh * kw..(c + 1) * kh * kw];
        let sum = self
            .geometry
            .taps_at(oy, ox)
            .fold(0.0f32, |acc, (t, i)| x[i].mul_add(taps[t], acc));
        sum + self.bias[c]
    }

    /// Channel `c` on AVX2: [`crate::depthwise::avx2::plane_sums`] over the zero-padded
    /// plane, plus the bias.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `x` and `y` must be the channel's planes; the
    /// stride along the width must be 1 or 2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn channel_avx2(&self, c: usize, x: &[f32], y: &mut [f32]) {
        use crate::depthwise::avx2::{
            padded_plane, plane_sums, return_buffer, store_f32, take_buffer,
        };
        use std::arch::x86_64::*;
        let g = &self.geometry;
        let [kh, kw] = g.kernel;
        let out_w = self.out[1];
        let mut padded = take_buffer();
        let width = padded_plane(g, out_w, x, |v| v, &mut padded);
        let taps = &self.taps[c * kh * kw..(c + 1) * kh * kw];
        let bias = _mm256_set1_ps(self.bias[c]);
        // SAFETY: the plane comes from `padded_plane` for this geometry, the stride is 1
        // or 2 (the caller's promise) and `taps` holds kh · kw values.
        plane_sums(g, self.out, &padded, width, taps, |oy, ox, sums| {
            let row = &mut y[oy * out_w + ox..(oy + 1) * out_w];
            let n = row.len().min(8);
            // SAFETY: AVX2 is available; `row[..n]` holds n values.
            store_f32(_mm256_add_ps(sums, bias), &mut row[..n]);
        });
        return_buffer(padded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    /// Every instruction set against the scalar reference on random geometries (borders,
    /// strides 1–3, dilations, 1×1 to 5×5 kernels), bit for bit (up to the sign of zero).
    #[test]
    fn every_isa_matches_the_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let mut checked = 0;
        while checked < 300 {
            let k = [rng.random_range(1..=5), rng.random_range(1..=5)];
            let g = Geometry {
                channels: rng.random_range(1..=4),
                input: [rng.random_range(1..=20), rng.random_range(1..=40)],
                kernel: k,
                strides: [rng.random_range(1..=2), rng.random_range(1..=3)],
                dilations: [rng.random_range(1..=2), rng.random_range(1..=2)],
                pads: [0; 4].map(|_: usize| rng.random_range(0..=2)),
            };
            if g.output().is_none() {
                continue;
            }
            let weights: Vec<f32> = (0..g.channels * k[0] * k[1])
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let bias: Vec<f32> = (0..g.channels)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let bias = if rng.random() { bias } else { Vec::new() };
            let kernel = DepthwiseF32::new(g, &weights, &bias).unwrap();
            let x: Vec<f32> = (0..kernel.plane_in())
                .map(|_| rng.random_range(-10.0..10.0))
                .collect();
            for c in 0..g.channels {
                let mut want = vec![f32::NAN; kernel.plane_out()];
                kernel.run_plane(Isa::Scalar, c, &x, &mut want).unwrap();
                for &isa in Isa::available() {
                    let mut got = vec![f32::NAN; kernel.plane_out()];
                    kernel.run_plane(isa, c, &x, &mut got).unwrap();
                    assert_eq!(got, want, "{isa:?} {g:?} channel {c}");
                }
            }
            checked += 1;
        }
    }

    /// The reference against the plain definition (a sum of products, in f64).
    #[test]
    fn the_reference_is_the_definition() {
        let g = Geometry {
            channels: 2,
            input: [4, 5],
            kernel: [3, 3],
            strides: [2, 1],
            dilations: [1, 2],
            pads: [1, 2, 1, 0],
        };
        let weights: Vec<f32> = (0..18).map(|i| i as f32 * 0.25 - 2.0).collect();
        let kernel = DepthwiseF32::new(g, &weights, &[0.5, -1.5]).unwrap();
        let x: Vec<f32> = (0..20).map(|i| (i * 7 % 11) as f32 - 5.0).collect();
        let [oh, ow] = kernel.output_shape();
        for c in 0..2 {
            let mut y = vec![0.0; oh * ow];
            kernel.run_plane(Isa::Scalar, c, &x, &mut y).unwrap();
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut want: f64 = [0.5, -1.5][c];
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let iy = (oy * 2 + ky) as isize - 1;
                            let ix = (ox + kx * 2) as isize - 2;
                            if (0..4).contains(&iy) && (0..5).contains(&ix) {
                                want += f64::from(x[iy as usize * 5 + ix as usize])
                                    * f64::from(weights[c * 9 + ky * 3 + kx]);
                            }
                        }
                    }
                    let got = f64::from(y[oy * ow + ox]);
                    assert!((got - want).abs() < 1e-5, "{c} {oy} {ox}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn wrong_sizes_are_refused() {
        let g = Geometry {
            channels: 2,
            input: [3, 3],
            kernel: [3, 3],
            strides: [1, 1],
            dilations: [1, 1],
            pads: [1; 4],
        };
        assert!(DepthwiseF32::new(g, &[0.0; 17], &[]).is_err());
        assert!(DepthwiseF32::new(g, &[0.0; 18], &[0.0]).is_err());
        let k = DepthwiseF32::new(g, &[0.0; 18], &[]).unwrap();
        for isa in [Isa::Scalar, Isa::detect()] {
            assert!(k.run_plane(isa, 2, &[0.0; 9], &mut [0.0; 9]).is_err());
            assert!(k.run_plane(isa, 0, &[0.0; 8], &mut [0.0; 9]).is_err());
            assert!(k.run_plane(isa, 0, &[0.0; 9], &mut [0.0; 10]).is_err());
            assert!(k.run_plane(isa, 1, &[0.0; 9], &mut [0.0; 9]).is_ok());
        }
    }
}
