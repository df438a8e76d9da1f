//! tern's own ops in tract plans: rewrites that hand layers to `tern-kernels`.
//!
//! Each rewrite runs on the decluttered typed model, before tract's optimizer would lower
//! the layer to its generic kernels, and replaces a node only when every parameter the
//! kernel needs is a constant of the expected type and every shape it needs is concrete;
//! anything else stays with tract. The passes are listed in [`PASSES`], run in that order
//! by the CPU backend's compiler.
//!
//! - `depthwise-q8`: a quantized convolution with one `u8` input channel per group
//!   (ONNX `QLinearConv` with `group == channels`, as in MobileNet's depthwise layers)
//!   becomes [`DepthwiseQ8Op`]. tract would run it as C one-row matrix products over a
//!   materialised im2col plus separate zero-point correction ops.

use std::sync::Arc;

use rayon::prelude::*;
use tract_linalg::multithread::{current_tract_executor, Executor};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;

use tern_kernels::depthwise::{DepthwiseQ8, Geometry, Quant};
use tern_kernels::Isa;

/// A rewrite of the typed model: returns how many nodes it replaced.
type Pass = fn(&mut TypedModel) -> TractResult<usize>;

/// The rewrites, by name, in the order they run (between declutter and optimize).
pub(crate) const PASSES: &[(&str, Pass)] = &[("depthwise-q8", depthwise_q8)];

/// Runs every pass; returns `(name, nodes replaced)` for those that replaced any.
pub(crate) fn run_passes(model: &mut TypedModel) -> TractResult<Vec<(&'static str, usize)>> {
    let mut done = Vec::new();
    for (name, pass) in PASSES {
        let n = pass(model)?;
        if n > 0 {
            done.push((*name, n));
        }
    }
    Ok(done)
}

/// An int8 depthwise convolution run by `tern-kernels` (NCHW, `u8` in and out).
#[derive(Debug, Clone)]
pub(crate) struct DepthwiseQ8Op {
    kernel: Arc<DepthwiseQ8>,
    isa: Isa,
    /// The output's datum type (`u8`, or `QU8` with the layer's output quantization).
    output_type: DatumType,
}

impl PartialEq for DepthwiseQ8Op {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.kernel, &other.kernel) && self.output_type == other.output_type
    }
}

impl Eq for DepthwiseQ8Op {}

impl Op for DepthwiseQ8Op {
    fn name(&self) -> StaticName {
        "TernDepthwiseQ8".into()
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwiseQ8Op {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs.first().context("TernDepthwiseQ8 takes one input")?;
        let g = self.kernel.geometry();
        let [oh, ow] = self.kernel.output_shape();
        let shape = x.shape();
        ensure!(
            shape.len() == 4 && shape[1..] == [g.channels, g.input[0], g.input[1]],
            "TernDepthwiseQ8 planned for [N, {}, {}, {}], got {shape:?}",
            g.channels,
            g.input[0],
            g.input[1]
        );
        ensure!(
            x.datum_type().unquantized() == u8::datum_type(),
            "TernDepthwiseQ8 reads u8"
        );
        let batch = shape[0];
        // SAFETY: `u8` has no invalid values, and the kernel writes every output of every
        // image before `y` is read (or `y` is dropped with the error).
        let mut y =
            unsafe { Tensor::uninitialized_dt(self.output_type, &[batch, g.channels, oh, ow])? };
        let xs = x.try_as_plain_ram()?.as_bytes();
        let (plane_in, plane_out) = (self.kernel.plane_in(), self.kernel.plane_out());
        {
            let mut y_view = y.try_as_plain_ram_mut()?;
            let ys = y_view.as_bytes_mut();
            // One task per (image, channel) plane; on the session's pool when this run has
            // one (the plan's thread race decides), else on the calling thread.
            let plane = |(i, y): (usize, &mut [u8])| {
                let x = &xs[i * plane_in..(i + 1) * plane_in];
                self.kernel.run_plane(self.isa, i % g.channels, x, y)
            };
            match current_tract_executor() {
                Executor::MultiThread(pool) => {
                    pool.install(|| ys.par_chunks_mut(plane_out).enumerate().try_for_each(plane))
                }
                _ => ys.chunks_mut(plane_out).enumerate().try_for_each(plane),
            }
            .map_err(|e| anyhow::anyhow!(e))?;
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for DepthwiseQ8Op {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let g = self.kernel.geometry();
        let [oh, ow] = self.kernel.output_shape();
        let batch = inputs[0].shape[0].clone();
        Ok(tvec!(self.output_type.fact(tvec![
            batch,
            g.channels.to_dim(),
            oh.to_dim(),
            ow.to_dim()
        ])))
    }

    as_op!();
}

/// A constant input of `node`, if it is one.
fn konst(model: &TypedModel, node: &TypedNode, slot: usize) -> Option<Arc<Tensor>> {
    model
        .outlet_fact(*node.inputs.get(slot)?)
        .ok()?
        .konst
        .clone()
}

/// The values of a constant scalar or vector input of type `T`.
fn values<T: Datum + Copy>(model: &TypedModel, node: &TypedNode, slot: usize) -> Option<Vec<T>> {
    let t = konst(model, node, slot)?;
    if t.datum_type() != T::datum_type() || t.rank() > 1 {
        return None;
    }
    Some(t.try_as_plain_ram().ok()?.as_slice::<T>().ok()?.to_vec())
}

/// The kernel for a quantized depthwise `Conv` node, or why not (a debug note).
fn depthwise_kernel(model: &TypedModel, node: &TypedNode, conv: &Conv) -> Option<DepthwiseQ8> {
    let out_type = conv.q_params?;
    let x = model.outlet_fact(node.inputs[0]).ok()?;
    let channels = conv.input_channels();
    if out_type.unquantized() != u8::datum_type()
        || x.datum_type.unquantized() != u8::datum_type()
        || conv.group != channels
        || conv.output_channels() != channels
        || conv.kernel_fmt != KernelFormat::OIHW
        || conv.pool_spec.data_format != DataFormat::NCHW
        || conv.pool_spec.kernel_shape.len() != 2
        || node.inputs.len() != 9
    {
        return None;
    }
    let shape = x.shape.as_concrete()?;
    let [_, c, h, w] = shape else {
        return None;
    };
    if *c != channels {
        return None;
    }
    let weights = konst(model, node, 1)?;
    if weights.datum_type().unquantized() != i8::datum_type()
        || weights.shape()
            != [
                channels,
                1,
                conv.pool_spec.kernel_shape[0],
                conv.pool_spec.kernel_shape[1],
            ]
    {
        return None;
    }
    let weights = weights.try_as_plain_ram().ok()?;
    let weights = weights.as_slice::<i8>().ok()?;
    let bias = values::<i32>(model, node, 2)?;
    let bias = match bias.len() {
        1 => vec![bias[0]; channels],
        _ => bias,
    };
    let x_zero = u8::try_from(*values::<i32>(model, node, 3)?.first()?).ok()?;
    let x_scale = *values::<f32>(model, node, 4)?.first()?;
    let w_zero = values::<i32>(model, node, 5)?
        .into_iter()
        .map(i8::try_from)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let w_scale = values::<f32>(model, node, 6)?;
    let y_zero = u8::try_from(*values::<i32>(model, node, 7)?.first()?).ok()?;
    let y_scale = *values::<f32>(model, node, 8)?.first()?;
    if y_scale.is_nan() || y_scale <= 0.0 {
        return None;
    }
    let padding = conv.pool_spec.computed_padding(&[*h, *w]);
    let geometry = Geometry {
        channels,
        input: [*h, *w],
        kernel: [
            conv.pool_spec.kernel_shape[0],
            conv.pool_spec.kernel_shape[1],
        ],
        strides: [conv.pool_spec.stride(0), conv.pool_spec.stride(1)],
        dilations: [conv.pool_spec.dilation(0), conv.pool_spec.dilation(1)],
        pads: [
            padding[0].pad_before,
            padding[1].pad_before,
            padding[0].pad_after,
            padding[1].pad_after,
        ],
    };
    let quant = Quant {
        x_zero,
        w_zero,
        scale: w_scale.iter().map(|ws| x_scale * ws / y_scale).collect(),
        y_zero,
    };
    match DepthwiseQ8::new(geometry, weights, &bias, &quant) {
        Ok(k) if k.output_shape() == [padding[0].convoluted, padding[1].convoluted] => Some(k),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!("{}: left to tract: {e}", node.name);
            None
        }
    }
}

/// Replaces quantized depthwise convolutions by [`DepthwiseQ8Op`].
fn depthwise_q8(model: &mut TypedModel) -> TractResult<usize> {
    let isa = Isa::detect();
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else {
            continue;
        };
        let Some(kernel) = depthwise_kernel(model, node, conv) else {
            continue;
        };
        let output_type = node.outputs[0].fact.datum_type;
        let op = DepthwiseQ8Op {
            kernel: Arc::new(kernel),
            isa,
            output_type,
        };
        let name = node.name.clone();
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs[..1], op)
            .with_context(|| format!("rewriting {name}"))?;
        patch.apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        // The old convolutions' constant inputs are read by nothing now.
        model.compact()?;
    }
    Ok(replaced)
}
