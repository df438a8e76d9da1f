//! The geometry of a 2-D convolution over one NCHW image, shared by the kernels.

/// The geometry of one 2-D convolution over an NCHW image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Input channels (for a depthwise convolution, also the output channels).
    pub channels: usize,
    /// Input height and width.
    pub input: [usize; 2],
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Strides (height, width), at least 1.
    pub strides: [usize; 2],
    /// Dilations (height, width), at least 1.
    pub dilations: [usize; 2],
    /// Padding before (top, left) and after (bottom, right).
    pub pads: [usize; 4],
}

impl Geometry {
    /// Output height and width (ONNX's floor rule); `None` when the kernel does not fit the
    /// padded input, or a stride is 0.
    pub fn output(&self) -> Option<[usize; 2]> {
        let out = |i: usize| -> Option<usize> {
            let padded = self.input[i]
                .checked_add(self.pads[i])?
                .checked_add(self.pads[i + 2])?;
            let span = (self.kernel[i].checked_sub(1)?)
                .checked_mul(self.dilations[i])?
                .checked_add(1)?;
            Some(padded.checked_sub(span)?.checked_div(self.strides[i])? + 1)
        };
        Some([out(0)?, out(1)?])
    }

    /// Elements of one input image (C × H × W).
    pub fn input_len(&self) -> usize {
        self.channels * self.input[0] * self.input[1]
    }

    /// Elements of one output image of a depthwise convolution (one output channel per
    /// input channel).
    pub fn output_len(&self) -> usize {
        self.output().map_or(0, |[h, w]| self.channels * h * w)
    }

    /// Whether the geometry is well formed: nothing empty, strides and dilations at least
    /// 1, the kernel no larger than the padded input.
    pub fn check(&self) -> Result<[usize; 2], crate::Unsupported> {
        let err = |m: String| Err(crate::Unsupported(m));
        if self.channels == 0 || self.input.contains(&0) || self.kernel.contains(&0) {
            return err(format!("empty geometry {self:?}"));
        }
        if self.strides.contains(&0) || self.dilations.contains(&0) {
            return err(format!("stride or dilation 0 in {self:?}"));
        }
        match self.output() {
            Some(out) => Ok(out),
            None => err(format!("kernel larger than the padded input in {self:?}")),
        }
    }

    /// The taps of output `(oy, ox)` that fall inside the input plane, in order (kernel
    /// row, then column): `(tap, input)`, the tap's index in a `kh · kw` filter and the
    /// input value's index in the plane. Padded taps are left out. (For scalar references.)
    pub fn taps_at(&self, oy: usize, ox: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let [kh, kw] = self.kernel;
        let [ih, iw] = self.input;
        (0..kh).flat_map(move |ky| {
            let iy = (oy * self.strides[0] + ky * self.dilations[0]).wrapping_sub(self.pads[0]);
            (0..kw).filter_map(move |kx| {
                let ix = (ox * self.strides[1] + kx * self.dilations[1]).wrapping_sub(self.pads[1]);
                (iy < ih && ix < iw).then(|| (ky * kw + kx, iy * iw + ix))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degenerate_geometries_have_no_output_rather_than_a_panic() {
        let g = Geometry {
            channels: 1,
            input: [4, 4],
            kernel: [3, 3],
            strides: [1, 1],
            dilations: [1, 1],
            pads: [0; 4],
        };
        assert_eq!(g.output(), Some([2, 2]));
        assert_eq!(
            Geometry {
                strides: [0, 1],
                ..g
            }
            .output(),
            None
        );
        assert_eq!(
            Geometry {
                kernel: [5, 3],
                ..g
            }
            .output(),
            None
        );
        assert_eq!(
            Geometry {
                kernel: [0, 3],
                ..g
            }
            .output(),
            None
        );
        assert_eq!(
            Geometry {
                dilations: [usize::MAX, 1],
                ..g
            }
            .output(),
            None
        );
        assert!(Geometry {
            strides: [0, 1],
            ..g
        }
        .check()
        .is_err());
        assert_eq!(
            Geometry {
                strides: [0, 1],
                ..g
            }
            .output_len(),
            0
        );
    }
}
