//! Max and average pooling (global pools arrive as windows over the whole plane).

use burn_backend::tensor::FloatTensor;
use burn_backend::{Backend, Scalar};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::cnn::{MaxPool, SumPool};

use super::window::{from_4d, lift_2d, window, Window};
use super::{single, Cx, Found, Lowered, Op};
use crate::backend::burn::context::unsupported;

/// ONNX ops that become pooling steps.
pub(crate) const ONNX: &[&str] = &[
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "MaxPool",
];

/// A pooling step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Pool {
    Max(Window),
    /// `normalize: false` is a sum pool.
    Avg {
        window: Window,
        count_include_pad: bool,
        normalize: bool,
    },
}

/// Lowers tract's `MaxPool` (without index outputs) and `SumPool` (symmetric padding, no
/// dilation: what burn's kernel computes).
pub(crate) fn lower<B: Backend>(cx: &mut Cx<B>, node: &TypedNode, _out: &[usize]) -> Found<B> {
    let op: &dyn TypedOp = node.op.as_ref();
    let pool = if let Some(pool) = op.downcast_ref::<MaxPool>() {
        if pool.with_index_outputs.is_some() {
            return Err(unsupported(node, "max pool with indices"));
        }
        Pool::Max(window(cx, node, &pool.pool_spec)?)
    } else if let Some(pool) = op.downcast_ref::<SumPool>() {
        let window = window(cx, node, &pool.pool_spec)?;
        if window.padding.iter().any(|(b, a)| b != a) {
            return Err(unsupported(node, "asymmetric average pool padding"));
        }
        if window.dilations.iter().any(|d| *d != 1) {
            return Err(unsupported(node, "dilated average pool"));
        }
        Pool::Avg {
            window,
            count_include_pad: pool.count_include_pad,
            normalize: pool.normalize,
        }
    } else {
        return Ok(None);
    };
    let x = cx.float(node.inputs[0])?;
    Ok(Some(Lowered::Step(Op::Pool(pool), vec![x])))
}

impl Pool {
    pub(crate) fn eval<B: Backend>(&self, args: Vec<FloatTensor<B>>) -> FloatTensor<B> {
        let x = single::<B>(args);
        match self {
            Pool::Max(window) => {
                let (x, padding) = lift_2d::<B>(x, window, f32::NEG_INFINITY);
                let y = B::max_pool2d(
                    x,
                    Window::lift::<1>(&window.kernel),
                    Window::lift::<1>(&window.strides),
                    padding,
                    Window::lift::<1>(&window.dilations),
                    false,
                );
                from_4d::<B>(y, window)
            }
            Pool::Avg {
                window,
                count_include_pad,
                normalize,
            } => {
                let (x, padding) = lift_2d::<B>(x, window, 0.0);
                let kernel = Window::lift::<1>(&window.kernel);
                let y = B::avg_pool2d(
                    x,
                    kernel,
                    Window::lift::<1>(&window.strides),
                    padding,
                    *count_include_pad,
                    false,
                );
                let y = if *normalize {
                    y
                } else {
                    B::float_mul_scalar(y, Scalar::from((kernel[0] * kernel[1]) as f32))
                };
                from_4d::<B>(y, window)
            }
        }
    }
}
