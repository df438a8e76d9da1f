//! The GPU backend's op vocabulary, by family, as burn groups its backend ops: each family
//! module names the ONNX ops it runs (so [`supported_onnx_ops`] is derived, never a second
//! list), lowers the tract core ops of its kind — found by downcasting to tract's op types —
//! into its own op type with every attribute resolved, and evaluates those with burn's
//! rank-agnostic primitive ops.
//!
//! | family | tract ops lowered | device ops |
//! |---|---|---|
//! | [`elementwise`] | `TypedBinOp`, `ElementWiseOp`, f32 `Cast` | binary (with broadcast or a scalar), unary |
//! | [`linear`] | `EinSum`, `Conv`, `Deconv` | batched matmul, conv2d, conv_transpose2d |
//! | [`reduce`] | `Reduce`, `RmsNorm`, `Softmax` | sum/max/min/prod/mean-of-squares, RMS norm, (log-)softmax |
//! | [`layout`] | `AxisOp`, `TypedConcat`, `Slice`, `Gather`, `MultiBroadcastTo`, `Pad`, `NearestUpsample` | permute, reshape, cat, slice, select, expand, pad |
//! | [`pool`] | `MaxPool`, `SumPool` | max_pool2d, avg_pool2d |
//!
//! [`window`] holds the sliding-window geometry convolutions and pools share.

pub(crate) mod elementwise;
pub(crate) mod layout;
pub(crate) mod linear;
pub(crate) mod pool;
pub(crate) mod reduce;
pub(crate) mod window;

use std::sync::OnceLock;

use burn_backend::tensor::{Device, FloatTensor};
use burn_backend::Backend;
use tract_onnx::prelude::TypedNode;

use super::context::{unsupported, Lowering};
use crate::error::Result;

/// One device operation with its attributes resolved.
pub(crate) enum Op<B: Backend> {
    /// Element-wise arithmetic and activations.
    Elementwise(elementwise::Elementwise),
    /// Matrix products and convolutions.
    Linear(linear::Linear),
    /// Reductions, normalisation, softmax.
    Reduce(reduce::Reduce),
    /// Data movement: permutes, reshapes, slices, gathers, padding.
    Layout(layout::Layout<B>),
    /// Max and average pooling.
    Pool(pool::Pool),
}

/// What a family made of one node.
pub(crate) enum Lowered<B: Backend> {
    /// A device step reading these slots.
    Step(Op<B>, Vec<usize>),
    /// No device work: the node's output is the value already in this slot.
    Alias(usize),
}

/// The lowering context, as families take it.
type Cx<'m, B> = Lowering<'m, B>;
/// What a family's lowering found: `Ok(None)` when the node's op is not of its kind.
type Found<B> = Result<Option<Lowered<B>>>;
/// A family's lowering of a node with this output shape.
type LowerFn<B> = fn(&mut Cx<B>, &TypedNode, &[usize]) -> Found<B>;

/// Lowers one node through the first family that takes its op.
pub(crate) fn lower_node<B: Backend>(
    cx: &mut Lowering<B>,
    node: &TypedNode,
    out_shape: &[usize],
) -> Result<Lowered<B>> {
    let families: [LowerFn<B>; 5] = [
        elementwise::lower::<B>,
        linear::lower::<B>,
        reduce::lower::<B>,
        layout::lower::<B>,
        pool::lower::<B>,
    ];
    for lower in families {
        if let Some(lowered) = lower(cx, node, out_shape)? {
            return Ok(lowered);
        }
    }
    Err(unsupported(node, "no GPU kernel"))
}

/// ONNX op types the GPU backend runs (after tract's folding and decluttering), sorted: the
/// union of the families' lists, each op with passing cases in the ONNX node suite on wgpu
/// or exercised by a real model. A model with any other op is refused up front, so `Auto`
/// can pick the CPU without trying.
pub fn supported_onnx_ops() -> &'static [&'static str] {
    static OPS: OnceLock<Vec<&'static str>> = OnceLock::new();
    OPS.get_or_init(|| {
        let mut ops: Vec<&'static str> = [
            elementwise::ONNX,
            linear::ONNX,
            reduce::ONNX,
            layout::ONNX,
            pool::ONNX,
        ]
        .concat();
        ops.sort_unstable();
        ops.dedup();
        ops
    })
}

/// The one input of a single-input step (lowering gives every step its inputs; a missing
/// one is a bug, caught as a panic by the program and reported as an inference error).
fn single<B: Backend>(args: Vec<FloatTensor<B>>) -> FloatTensor<B> {
    args.into_iter()
        .next()
        .expect("lowering gave the step its input")
}

impl<B: Backend> Op<B> {
    /// Ops that run in f32 inside an f16 program: sums and products accumulate past f16's
    /// range (65504) and precision, and `exp` overflows it above 11.
    pub(crate) fn keeps_f32(&self) -> bool {
        match self {
            Op::Elementwise(op) => op.keeps_f32(),
            Op::Reduce(op) => op.keeps_f32(),
            Op::Linear(_) | Op::Layout(_) | Op::Pool(_) => false,
        }
    }

    /// A short description for errors and traces.
    pub(crate) fn name(&self) -> String {
        match self {
            Op::Elementwise(op) => format!("{op:?}"),
            Op::Linear(op) => format!("{op:?}"),
            Op::Reduce(op) => format!("{op:?}"),
            Op::Layout(op) => op.name(),
            Op::Pool(op) => format!("{op:?}"),
        }
    }

    /// Runs the op on `args` (its input slots' values, in order).
    pub(crate) fn eval(&self, device: &Device<B>, args: Vec<FloatTensor<B>>) -> FloatTensor<B> {
        match self {
            Op::Elementwise(op) => op.eval::<B>(device, args),
            Op::Linear(op) => op.eval::<B>(args),
            Op::Reduce(op) => op.eval::<B>(args),
            Op::Layout(op) => op.eval(args),
            Op::Pool(op) => op.eval::<B>(args),
        }
    }
}
