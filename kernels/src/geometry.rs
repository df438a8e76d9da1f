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
    /// Output height and width (ONNX's floor rule).
    pub fn output(&self) -> Option<[usize; 2]> {
        let out = |i: usize| -> Option<usize> {
            let padded = self.input[i] + self.pads[i] + self.pads[i + 2];
            let span = (self.kernel[i].checked_sub(1)?) * self.dilations[i] + 1;
            Some(padded.checked_sub(span)? / self.strides[i] + 1)
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
}
