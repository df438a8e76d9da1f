//! Matrix products and convolutions: every `MatMul`/`Gemm` (an `EinSum` after tract's
//! declutter) as one batched matmul, `Conv` as conv2d and `ConvTranspose` as
//! conv_transpose2d (1-D ops lifted to 2-D).

use burn_backend::ops::{ConvOptions, ConvTransposeOptions};
use burn_backend::tensor::FloatTensor;
use burn_backend::{Backend, Shape, Slice, TensorMetadata};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::axes::AxesMapping;
use tract_onnx::tract_core::ops::cnn::{Conv, Deconv, KernelFormat};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::window::{from_4d, lift_height, to_4d, window, Window};
use super::{Cx, Found, Lowered, Op};
use crate::backend::burn::context::{compile_err, unsupported, values};
use crate::error::Result;

/// ONNX ops that become matmul or convolution steps.
pub(crate) const ONNX: &[&str] = &["Conv", "ConvTranspose", "Gemm", "MatMul"];

/// A matmul or convolution step.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    /// 1-D or 2-D convolution; optional bias as a third input.
    Conv {
        window: Window,
        groups: usize,
        out_channels: usize,
    },
    /// 2-D transposed convolution (NCHW); optional bias as a third input.
    ConvTranspose {
        options: ConvTransposeOptions<2>,
        out_channels: usize,
        /// `Some(groups)`: the kernel input is in tract's `[O, I/g, kh, kw]` layout and is
        /// rearranged to burn's `[I, O/g, kh, kw]` on the device.
        regroup: Option<usize>,
        /// `(before, after)` cropped from each (2-D lifted) spatial axis of the output:
        /// asymmetric padding, which burn's kernel cannot apply.
        crop: Option<[(usize, usize); 2]>,
    },
    MatMul(Box<MatMulPlan>),
}

/// Lowers two-input float einsums, convolutions and transposed convolutions.
pub(crate) fn lower<B: Backend>(cx: &mut Cx<B>, node: &TypedNode, out: &[usize]) -> Found<B> {
    let op: &dyn TypedOp = node.op.as_ref();
    let (linear, inputs) = if let Some(einsum) = op.downcast_ref::<EinSum>() {
        if einsum.q_params.is_some() || node.inputs.len() != 2 {
            return Err(unsupported(node, "quantized or n-ary einsum"));
        }
        let plan = MatMulPlan::new(
            &einsum.axes,
            &cx.shape(node.inputs[0])?,
            &cx.shape(node.inputs[1])?,
            out,
        )
        .map_err(|e| unsupported(node, e))?;
        (Linear::MatMul(Box::new(plan)), cx.floats(&node.inputs)?)
    } else if let Some(conv) = op.downcast_ref::<Conv>() {
        lower_conv(cx, node, conv)?
    } else if let Some(deconv) = op.downcast_ref::<Deconv>() {
        lower_deconv(cx, node, deconv, out)?
    } else {
        return Ok(None);
    };
    Ok(Some(Lowered::Step(Op::Linear(linear), inputs)))
}

fn lower_conv<B: Backend>(
    cx: &mut Cx<B>,
    node: &TypedNode,
    conv: &Conv,
) -> Result<(Linear, Vec<usize>)> {
    if conv.q_params.is_some() {
        return Err(unsupported(node, "quantized convolution"));
    }
    if conv.kernel_fmt != KernelFormat::OIHW {
        return Err(unsupported(node, "kernel layout other than OIHW"));
    }
    let window = window(cx, node, &conv.pool_spec)?;
    let mut inputs = cx.floats(&node.inputs[..2])?;
    let out_channels = conv.pool_spec.output_channels;
    if let Some(bias) = bias(cx, node, node.inputs.get(2), out_channels)? {
        inputs.push(bias);
    }
    let conv = Linear::Conv {
        window,
        groups: conv.group,
        out_channels,
    };
    Ok((conv, inputs))
}

/// ConvTranspose: 2-D, NCHW, symmetric padding (burn's kernel pads both sides alike).
fn lower_deconv<B: Backend>(
    cx: &mut Cx<B>,
    node: &TypedNode,
    deconv: &Deconv,
    out_shape: &[usize],
) -> Result<(Linear, Vec<usize>)> {
    let spec = &deconv.pool_spec;
    let rank = spec.kernel_shape.len();
    if spec.data_format != DataFormat::NCHW || !(1..=2).contains(&rank) {
        return Err(unsupported(
            node,
            "ConvTranspose other than 1-D or 2-D NCHW",
        ));
    }
    if deconv.kernel_format != KernelFormat::OIHW {
        return Err(unsupported(node, "kernel layout other than OIHW"));
    }
    let input = cx.shape(node.inputs[0])?;
    let padded = spec
        .padding
        .compute_for_deconv(
            &input[2..],
            &spec.kernel_shape,
            &spec.dilations(),
            &spec.strides(),
            &deconv.adjustments,
        )
        .map_err(compile_err)?;
    // burn pads both sides alike; asymmetric padding (SAME_*) runs unpadded and the
    // output is cropped.
    let symmetric = padded.iter().all(|p| p.pad_before == p.pad_after);
    // A 1-D op runs as 2-D with a height of 1.
    let two = |v: &[usize], fill: usize| match v {
        [a] => [fill, *a],
        _ => [v[0], v[1]],
    };
    let before: Vec<usize> = padded.iter().map(|p| p.pad_before).collect();
    let after: Vec<usize> = padded.iter().map(|p| p.pad_after).collect();
    let options = ConvTransposeOptions {
        stride: two(&spec.strides(), 1),
        padding: if symmetric { two(&before, 0) } else { [0, 0] },
        padding_out: two(&deconv.adjustments, 0),
        dilation: two(&spec.dilations(), 1),
        groups: deconv.group,
    };
    let (kernel2, in2, out2) = (
        two(&spec.kernel_shape, 1),
        two(&input[2..], 1),
        two(&out_shape[2..], 1),
    );
    // burn's output size; tract's (the model's) must be the same.
    let size = |ax: usize| {
        ((in2[ax] - 1) * options.stride[ax]
            + options.dilation[ax] * (kernel2[ax] - 1)
            + 1
            + options.padding_out[ax])
            .checked_sub(2 * options.padding[ax])
    };
    let crop = (!symmetric).then(|| {
        let (b, a) = (two(&before, 0), two(&after, 0));
        [(b[0], a[0]), (b[1], a[1])]
    });
    let cropped = |ax: usize| match crop {
        Some(c) => size(ax).and_then(|s| s.checked_sub(c[ax].0 + c[ax].1)),
        None => size(ax),
    };
    if [cropped(0), cropped(1)] != [Some(out2[0]), Some(out2[1])] {
        return Err(unsupported(node, "ConvTranspose output size"));
    }
    // tract holds the kernel as [O, I/g, k…]; burn takes [I, O/g, k…]: a constant kernel
    // is rearranged once here, one computed at run time in every run.
    let group = deconv.group;
    let (kernel, regroup) = match cx.konst(node.inputs[1]) {
        Some(k) => {
            let slot = cx.upload(&k)?;
            if let Some((_, t)) = cx.consts.last_mut() {
                *t = regroup_deconv_kernel::<B>(t.clone(), group);
            }
            (slot, None)
        }
        None => (cx.float(node.inputs[1])?, Some(group)),
    };
    let out_channels = spec.output_channels;
    let mut inputs = vec![cx.float(node.inputs[0])?, kernel];
    if let Some(bias) = bias(cx, node, node.inputs.get(2), out_channels)? {
        inputs.push(bias);
    }
    let deconv = Linear::ConvTranspose {
        options,
        out_channels,
        regroup,
        crop,
    };
    Ok((deconv, inputs))
}

/// The slot of a convolution's bias, `None` when it is absent or all zeros; its
/// elements must be one per output channel.
fn bias<B: Backend>(
    cx: &mut Cx<B>,
    node: &TypedNode,
    bias: Option<&OutletId>,
    out_channels: usize,
) -> Result<Option<usize>> {
    let Some(&bias) = bias else {
        return Ok(None);
    };
    let is_zero = cx
        .konst(bias)
        .and_then(|k| values::<f32>(&k).ok())
        .is_some_and(|v| v.iter().all(|x| *x == 0.0));
    if is_zero {
        return Ok(None);
    }
    let bias_shape = cx.shape(bias)?;
    if bias_shape.iter().product::<usize>() != out_channels {
        return Err(unsupported(node, format!("bias of shape {bias_shape:?}")));
    }
    cx.float(bias).map(Some)
}

impl Linear {
    pub(crate) fn eval<B: Backend>(&self, args: Vec<FloatTensor<B>>) -> FloatTensor<B> {
        let mut args = args.into_iter();
        let mut arg = || args.next().expect("lowering gave the step its inputs");
        match self {
            Linear::Conv {
                window,
                groups,
                out_channels,
            } => {
                let x = arg();
                let w = arg();
                let bias = args
                    .next()
                    .map(|b| B::float_reshape(b, Shape::from(vec![*out_channels])));
                let options = conv_options(window, *groups);
                let w = if window.kernel.len() == 1 {
                    let ws = w.shape().to_vec();
                    B::float_reshape(w, Shape::from(vec![ws[0], ws[1], 1, ws[2]]))
                } else {
                    w
                };
                let y = B::conv2d(to_4d::<B>(x, window), w, bias, options);
                from_4d::<B>(y, window)
            }
            Linear::ConvTranspose {
                options,
                out_channels,
                regroup,
                crop,
            } => {
                let (mut x, mut w) = (arg(), arg());
                if let Some(g) = *regroup {
                    w = regroup_deconv_kernel::<B>(w, g);
                }
                let one_d = x.shape().num_dims() == 3;
                if one_d {
                    let (xs, ws) = (lift_height(&x.shape()), lift_height(&w.shape()));
                    x = B::float_reshape(x, Shape::from(xs));
                    w = B::float_reshape(w, Shape::from(ws));
                }
                let bias = args
                    .next()
                    .map(|b| B::float_reshape(b, Shape::from(vec![*out_channels])));
                let mut y = B::conv_transpose2d(x, w, bias, options.clone());
                if let Some(c) = crop {
                    let dims = y.shape().to_vec();
                    let slices = [
                        Slice::new(0, None, 1),
                        Slice::new(0, None, 1),
                        Slice::new(c[0].0 as isize, Some((dims[2] - c[0].1) as isize), 1),
                        Slice::new(c[1].0 as isize, Some((dims[3] - c[1].1) as isize), 1),
                    ];
                    y = B::float_slice(y, &slices);
                }
                if one_d {
                    let mut dims = y.shape().to_vec();
                    dims.remove(2);
                    B::float_reshape(y, Shape::from(dims))
                } else {
                    y
                }
            }
            Linear::MatMul(plan) => {
                let a = arg();
                plan.run::<B>(a, arg())
            }
        }
    }
}

/// 2-D convolution options from a window (1-D windows are lifted to 2-D by the caller).
fn conv_options(w: &Window, groups: usize) -> ConvOptions<2> {
    let padding = match w.padding.as_slice() {
        [p] => [(0, 0), *p],
        [p, q] => [*p, *q],
        _ => [(0, 0), (0, 0)],
    };
    ConvOptions {
        stride: Window::lift::<1>(&w.strides),
        padding,
        dilation: Window::lift::<1>(&w.dilations),
        groups,
    }
}

/// How an einsum with two inputs runs as one batched matmul `[bt, m, k] × [bt, k, n]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MatMulPlan {
    a: OperandLayout,
    b: OperandLayout,
    /// The matmul result's dims unflattened: batch…, m…, n…, output-only (size 1)…
    c_dims: Vec<usize>,
    /// Permutation from that order to the output's axis order (`None` when identity).
    c_perm: Option<Vec<usize>>,
}

/// Permute → broadcast batch dims → reshape to 3-D, for one matmul operand.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OperandLayout {
    perm: Option<Vec<usize>>,
    expand: Option<Vec<usize>>,
    shape3: [usize; 3],
}

impl OperandLayout {
    fn new(
        perm: Vec<usize>,
        shape: &[usize],
        target: Vec<usize>,
        shape3: [usize; 3],
    ) -> OperandLayout {
        let permuted: Vec<usize> = perm.iter().map(|&i| shape[i]).collect();
        OperandLayout {
            perm: (!perm.iter().enumerate().all(|(i, &p)| i == p)).then_some(perm),
            expand: (permuted != target).then_some(target),
            shape3,
        }
    }

    fn apply<B: Backend>(&self, mut x: FloatTensor<B>) -> FloatTensor<B> {
        if let Some(perm) = &self.perm {
            x = B::float_permute(x, perm);
        }
        if let Some(shape) = &self.expand {
            x = B::float_expand(x, Shape::from(shape.clone()));
        }
        B::float_reshape(x, Shape::from(self.shape3.to_vec()))
    }
}

impl MatMulPlan {
    /// Classifies the einsum's axes (batch: in A, B and C; m: A and C; n: B and C; k: A
    /// and B) and derives the layouts. Fails for what one matmul cannot express.
    pub(crate) fn new(
        axes: &AxesMapping,
        a: &[usize],
        b: &[usize],
        c: &[usize],
    ) -> std::result::Result<MatMulPlan, String> {
        let one = |v: &[usize]| -> std::result::Result<Option<usize>, String> {
            match v {
                [] => Ok(None),
                [p] => Ok(Some(*p)),
                _ => Err("an axis repeated within one operand".into()),
            }
        };
        // (position in A, in B, in C) per axis, by category.
        let (mut batch, mut m, mut n, mut k, mut c_only) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut a_only, mut b_only) = (vec![], vec![]);
        for axis in axes.iter_all_axes() {
            let pa = one(&axis.inputs[0])?;
            let pb = one(&axis.inputs[1])?;
            let pc = one(&axis.outputs[0])?;
            match (pa, pb, pc) {
                (Some(x), Some(y), Some(z)) => batch.push((x, y, z)),
                (Some(x), None, Some(z)) => m.push((x, z)),
                (None, Some(y), Some(z)) => n.push((y, z)),
                (Some(x), Some(y), None) => {
                    if a[x] != b[y] {
                        return Err(format!("contracted sizes differ: {} vs {}", a[x], b[y]));
                    }
                    k.push((x, y))
                }
                (None, None, Some(z)) if c[z] == 1 => c_only.push(z),
                (Some(x), None, None) if a[x] == 1 => a_only.push(x),
                (None, Some(y), None) if b[y] == 1 => b_only.push(y),
                _ => return Err(format!("axis {} cannot be a matmul axis", axis.repr)),
            }
        }
        let prod = |v: &mut dyn Iterator<Item = usize>| v.product::<usize>();
        let bt = prod(&mut batch.iter().map(|&(_, _, z)| c[z]));
        let mm = prod(&mut m.iter().map(|&(x, _)| a[x]));
        let nn = prod(&mut n.iter().map(|&(y, _)| b[y]));
        let kk = prod(&mut k.iter().map(|&(x, _)| a[x]));
        let batch_c: Vec<usize> = batch.iter().map(|&(_, _, z)| c[z]).collect();

        let a_perm: Vec<usize> = batch
            .iter()
            .map(|t| t.0)
            .chain(m.iter().map(|t| t.0))
            .chain(k.iter().map(|t| t.0))
            .chain(a_only.iter().copied())
            .collect();
        let a_target: Vec<usize> = batch_c
            .iter()
            .copied()
            .chain(m.iter().map(|&(x, _)| a[x]))
            .chain(k.iter().map(|&(x, _)| a[x]))
            .chain(a_only.iter().map(|_| 1))
            .collect();
        let b_perm: Vec<usize> = batch
            .iter()
            .map(|t| t.1)
            .chain(k.iter().map(|t| t.1))
            .chain(n.iter().map(|t| t.0))
            .chain(b_only.iter().copied())
            .collect();
        let b_target: Vec<usize> = batch_c
            .iter()
            .copied()
            .chain(k.iter().map(|&(_, y)| b[y]))
            .chain(n.iter().map(|&(y, _)| b[y]))
            .chain(b_only.iter().map(|_| 1))
            .collect();
        // Output axes in the order the matmul produces them.
        let c_order: Vec<usize> = batch
            .iter()
            .map(|t| t.2)
            .chain(m.iter().map(|t| t.1))
            .chain(n.iter().map(|t| t.1))
            .chain(c_only.iter().copied())
            .collect();
        let c_dims: Vec<usize> = c_order.iter().map(|&z| c[z]).collect();
        let mut c_perm = vec![0; c.len()];
        for (ix, &z) in c_order.iter().enumerate() {
            c_perm[z] = ix;
        }
        Ok(MatMulPlan {
            a: OperandLayout::new(a_perm, a, a_target, [bt, mm, kk]),
            b: OperandLayout::new(b_perm, b, b_target, [bt, kk, nn]),
            c_dims,
            c_perm: (!c_perm.iter().enumerate().all(|(i, &p)| i == p)).then_some(c_perm),
        })
    }

    pub(crate) fn run<B: Backend>(&self, a: FloatTensor<B>, b: FloatTensor<B>) -> FloatTensor<B> {
        let c = B::float_matmul(self.a.apply::<B>(a), self.b.apply::<B>(b));
        let c = B::float_reshape(c, Shape::from(self.c_dims.clone()));
        match &self.c_perm {
            Some(perm) => B::float_permute(c, perm),
            None => c,
        }
    }
}

/// A transposed convolution's kernel from tract's layout `[O, I/g, k…]` to burn's
/// `[I, O/g, k…]`: `[g, O/g, I/g, k…]`, its axes 1 and 2 swapped, merged back.
fn regroup_deconv_kernel<B: Backend>(w: FloatTensor<B>, groups: usize) -> FloatTensor<B> {
    let s = w.shape().to_vec();
    let (o, i) = (s[0] / groups, s[1]);
    let mut split = vec![groups, o, i];
    split.extend_from_slice(&s[2..]);
    let mut perm: Vec<usize> = (0..split.len()).collect();
    perm.swap(1, 2);
    let w = B::float_permute(B::float_reshape(w, Shape::from(split)), &perm);
    let mut merged = vec![groups * i, o];
    merged.extend_from_slice(&s[2..]);
    B::float_reshape(w, Shape::from(merged))
}
