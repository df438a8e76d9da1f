//! Reductions, RMS normalisation and (log-)softmax: the ops that accumulate, and so run in
//! f32 inside an f16 program.

use burn_backend::tensor::FloatTensor;
use burn_backend::{Backend, Scalar, Shape, TensorMetadata};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::nn::{
    Reduce as TractReduce, Reducer, RmsNorm, Softmax, SoftmaxKind,
};

use super::{single, Cx, Found, Lowered, Op};
use crate::backend::burn::context::{compile_err, unsupported};

/// ONNX ops that become reduction, normalisation or softmax steps (LayerNormalization and
/// ReduceMean through tract's decomposition into these and element-wise steps).
pub(crate) const ONNX: &[&str] = &[
    "LayerNormalization",
    "LogSoftmax",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceSum",
    "Softmax",
];

/// A reduction-family step (axes sorted, kept as size 1).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reduce {
    Sum(Vec<usize>),
    Max(Vec<usize>),
    Min(Vec<usize>),
    Prod(Vec<usize>),
    MeanOfSquares(Vec<usize>),
    /// `x / sqrt(mean(x², axis) + eps)`.
    RmsNorm {
        axis: usize,
        eps: f32,
    },
    Softmax {
        axis: usize,
        log: bool,
    },
}

/// Lowers tract's `Reduce`, `RmsNorm` and single-axis float `Softmax`.
pub(crate) fn lower<B: Backend>(cx: &mut Cx<B>, node: &TypedNode, _out: &[usize]) -> Found<B> {
    let op: &dyn TypedOp = node.op.as_ref();
    let reduce = if let Some(reduce) = op.downcast_ref::<TractReduce>() {
        let axes = reduce.axes.to_vec();
        match reduce.reducer {
            Reducer::Sum => Reduce::Sum(axes),
            Reducer::Max => Reduce::Max(axes),
            Reducer::Min => Reduce::Min(axes),
            Reducer::Prod => Reduce::Prod(axes),
            Reducer::MeanOfSquares => Reduce::MeanOfSquares(axes),
            other => return Err(unsupported(node, format!("{other:?}"))),
        }
    } else if let Some(rms) = op.downcast_ref::<RmsNorm>() {
        let eps = rms.eps.cast_to_scalar::<f32>().map_err(compile_err)?;
        Reduce::RmsNorm {
            axis: rms.axis,
            eps,
        }
    } else if let Some(softmax) = op.downcast_ref::<Softmax>() {
        if softmax.axes.len() != 1 || softmax.quant_output_dt.is_some() {
            return Err(unsupported(node, "multi-axis or quantized softmax"));
        }
        Reduce::Softmax {
            axis: softmax.axes[0],
            log: matches!(softmax.kind, SoftmaxKind::LogSoftmax),
        }
    } else {
        return Ok(None);
    };
    let x = cx.float(node.inputs[0])?;
    Ok(Some(Lowered::Step(Op::Reduce(reduce), vec![x])))
}

impl Reduce {
    /// Sums and products accumulate past f16's range (65504) and precision.
    pub(crate) fn keeps_f32(&self) -> bool {
        !matches!(self, Reduce::Max(_) | Reduce::Min(_))
    }

    pub(crate) fn eval<B: Backend>(&self, args: Vec<FloatTensor<B>>) -> FloatTensor<B> {
        let x = single::<B>(args);
        match self {
            Reduce::Sum(axes) => reduce::<B>(x, axes, B::float_sum_dim),
            Reduce::Max(axes) => reduce::<B>(x, axes, B::float_max_dim),
            Reduce::Min(axes) => reduce::<B>(x, axes, B::float_min_dim),
            Reduce::Prod(axes) => reduce::<B>(x, axes, B::float_prod_dim),
            Reduce::MeanOfSquares(axes) => {
                let sq = B::float_mul(x.clone(), x);
                reduce::<B>(sq, axes, B::float_mean_dim)
            }
            Reduce::RmsNorm { axis, eps } => {
                let ms = B::float_mean_dim(B::float_mul(x.clone(), x.clone()), *axis);
                let rms = B::float_sqrt(B::float_add_scalar(ms, Scalar::from(*eps)));
                B::float_div(x.clone(), B::float_expand(rms, x.shape()))
            }
            Reduce::Softmax { axis, log: true } => B::log_softmax(x, *axis),
            Reduce::Softmax { axis, log: false } => B::softmax(x, *axis),
        }
    }
}

/// Reduces `axes` (sorted), keeping them as size 1. Consecutive axes are merged into one
/// and reduced in a single pass: fewer kernels, and chained per-axis reductions on wgpu gave
/// wrong sums for batch > 1 (seen on lavapipe with burn 0.22's `sum_dim`).
fn reduce<B: Backend>(
    x: FloatTensor<B>,
    axes: &[usize],
    f: fn(FloatTensor<B>, usize) -> FloatTensor<B>,
) -> FloatTensor<B> {
    let shape = x.shape().to_vec();
    let consecutive = axes.windows(2).all(|w| w[1] == w[0] + 1);
    match (axes.first(), axes.last()) {
        (Some(&first), Some(&last)) if consecutive && last > first => {
            let mut merged: Vec<usize> = shape[..first].to_vec();
            merged.push(shape[first..=last].iter().product());
            merged.extend_from_slice(&shape[last + 1..]);
            let y = f(B::float_reshape(x, Shape::from(merged)), first);
            let mut out = shape;
            for &a in axes {
                out[a] = 1;
            }
            B::float_reshape(y, Shape::from(out))
        }
        _ => axes.iter().fold(x, |x, &a| f(x, a)),
    }
}
