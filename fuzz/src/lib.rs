//! What the fuzz targets share: reading bounded values and a convolution geometry from the
//! fuzzer's bytes.

use tern_kernels::Geometry;

/// The fuzzer's bytes as bounded values: `next(max)` is the next byte modulo `max` (0 once
/// the bytes run out).
pub struct Bytes<'a>(std::slice::Iter<'a, u8>);

impl<'a> Bytes<'a> {
    /// Reads `data` from its start.
    pub fn new(data: &'a [u8]) -> Self {
        Bytes(data.iter())
    }

    /// The next value in `0..max` (`max` 0 counts as 1).
    pub fn next(&mut self, max: u8) -> u8 {
        self.0.next().map_or(0, |b| b % max.max(1))
    }

    /// A geometry up to 4 channels, an input up to `input` and a kernel up to `kernel` on a
    /// side, strides and pads below `stride` and `pad`, dilations below 3 — degenerate ones
    /// (stride or dilation 0) included, for the kernels to refuse.
    pub fn geometry(&mut self, input: [u8; 2], kernel: u8, stride: u8, pad: u8) -> Geometry {
        let mut side = |max: u8| 1 + self.next(max) as usize;
        let (channels, input, kernel) = (
            side(4),
            [side(input[0]), side(input[1])],
            [side(kernel), side(kernel)],
        );
        Geometry {
            channels,
            input,
            kernel,
            strides: [self.next(stride) as usize, self.next(stride) as usize],
            dilations: [self.next(3) as usize, self.next(3) as usize],
            pads: [0; 4].map(|_: usize| self.next(pad) as usize),
        }
    }
}
