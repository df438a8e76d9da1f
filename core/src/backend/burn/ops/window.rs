//! The geometry of 1-D and 2-D sliding-window ops (convolutions and pools): lowered from
//! tract's `PoolSpec` with padding resolved for the input size, and the reshapes that run a
//! 1-D or unbatched op through burn's 2-D NCHW kernels.

use burn_backend::ops::PadMode;
use burn_backend::tensor::FloatTensor;
use burn_backend::{Backend, Shape, TensorMetadata};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::cnn::PoolSpec;
use tract_onnx::tract_core::ops::nn::DataFormat;

use crate::backend::burn::context::{concrete, unsupported, Lowering};
use crate::error::Result;

/// The geometry of a 1-D or 2-D sliding-window op, padding resolved for the input size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Window {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    /// `(before, after)` per spatial axis.
    pub padding: Vec<(usize, usize)>,
    /// The input has a batch axis (NCHW); without one (CHW) it is added for the op.
    pub batched: bool,
}

impl Window {
    /// A 1-D parameter lifted to 2-D with `F` for the new (height) axis.
    pub(crate) fn lift<const F: usize>(v: &[usize]) -> [usize; 2] {
        match v {
            [a] => [F, *a],
            [a, b] => [*a, *b],
            _ => [F, F],
        }
    }
}

/// Kernel, strides, dilations and explicit padding of a 1-D or 2-D NCHW/CHW window op.
pub(crate) fn window<B: Backend>(
    cx: &Lowering<B>,
    node: &TypedNode,
    spec: &PoolSpec,
) -> Result<Window> {
    let batched = match spec.data_format {
        DataFormat::NCHW => true,
        DataFormat::CHW => false,
        other => return Err(unsupported(node, format!("{other:?} layout"))),
    };
    let rank = spec.kernel_shape.len();
    if !(1..=2).contains(&rank) {
        return Err(unsupported(node, format!("{rank}-D window")));
    }
    let input = cx.shape(node.inputs[0])?;
    let spatial = &input[if batched { 2 } else { 1 }..];
    let padding = spec
        .computed_padding(spatial)
        .iter()
        .map(|p| (p.pad_before, p.pad_after))
        .collect::<Vec<_>>();
    let window = Window {
        kernel: spec.kernel_shape.to_vec(),
        strides: spec.strides().to_vec(),
        dilations: spec.dilations().to_vec(),
        padding,
        batched,
    };
    // burn's kernels floor the output size; ceil-mode pooling needs more than padding.
    let out = concrete(&node.outputs[0].fact.shape)?;
    let out_spatial = &out[out.len() - rank..];
    let floored: Vec<usize> = (0..rank)
        .map(|i| {
            let (before, after) = window.padding[i];
            let span = window.dilations[i] * (window.kernel[i] - 1) + 1;
            (spatial[i] + before + after).saturating_sub(span) / window.strides[i] + 1
        })
        .collect();
    if floored != out_spatial {
        return Err(unsupported(node, "ceil-mode output size"));
    }
    Ok(window)
}

/// A 3-D shape `[a, b, l]` as `[a, b, 1, l]` (a 1-D op's operand lifted to 2-D).
pub(crate) fn lift_height(shape: &Shape) -> Vec<usize> {
    let mut dims = shape.to_vec();
    dims.insert(2, 1);
    dims
}

/// A window op's input as `[N, C, H, W]`: a batch axis of 1 added to a CHW input, a height
/// of 1 to a 1-D input.
pub(crate) fn to_4d<B: Backend>(x: FloatTensor<B>, w: &Window) -> FloatTensor<B> {
    let s = x.shape().to_vec();
    let mut dims = if w.batched {
        s
    } else {
        [&[1], s.as_slice()].concat()
    };
    if w.kernel.len() == 1 {
        dims.insert(2, 1);
    }
    B::float_reshape(x, Shape::from(dims))
}

/// The inverse of [`to_4d`] on the op's output.
pub(crate) fn from_4d<B: Backend>(y: FloatTensor<B>, w: &Window) -> FloatTensor<B> {
    let mut dims = y.shape().to_vec();
    if w.kernel.len() == 1 {
        dims.remove(2);
    }
    if !w.batched {
        dims.remove(0);
    }
    B::float_reshape(y, Shape::from(dims))
}

/// A window op's input as `[N, C, H, W]` ([`to_4d`]), with asymmetric padding applied
/// explicitly (burn's pools pad symmetrically). Returns the input and the symmetric padding
/// left to the op.
pub(crate) fn lift_2d<B: Backend>(
    x: FloatTensor<B>,
    w: &Window,
    fill: f32,
) -> (FloatTensor<B>, [usize; 2]) {
    let x = to_4d::<B>(x, w);
    let pads: Vec<(usize, usize)> = match w.padding.as_slice() {
        [p] => vec![(0, 0), *p],
        other => other.to_vec(),
    };
    if pads.iter().all(|(b, a)| b == a) {
        return (x, [pads[0].0, pads[1].0]);
    }
    let mut full = vec![(0, 0), (0, 0)];
    full.extend(pads);
    (B::float_pad(x, &full, PadMode::Constant(fill)), [0, 0])
}
