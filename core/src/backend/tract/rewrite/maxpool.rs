//! `maxpool`: 2-D max pooling over NCHW `f32` or `u8` planes on `tern_kernels::pool`
//! (tract's own is a generic loop for every window shape but 2×2 stride 1: ppocr_cls's
//! 2×2 stride-2 pool took 0.16 ms in f32 and 0.10 ms on bytes).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::MaxPool;
use tract_onnx::tract_core::ops::nn::DataFormat;

use tern_kernels::pool::{max_pool_plane, supports, PoolValue};
use tern_kernels::Geometry;

use super::for_each_plane;

/// Replaces 2-D max pools over concrete NCHW (or CHW) `f32` or `u8` tensors, without an
/// index output, by [`MaxPoolOp`].
pub(super) fn pass(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(pool) = node.op_as::<MaxPool>() else {
            continue;
        };
        let Some(op) = op_for(model, node, pool) else {
            continue;
        };
        let name = node.name.clone();
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op)
            .with_context(|| format!("rewriting {name}"))?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// The op for `pool` at `node`, if tern's kernel takes it.
fn op_for(model: &TypedModel, node: &TypedNode, pool: &MaxPool) -> Option<MaxPoolOp> {
    let spec = &pool.pool_spec;
    if pool.with_index_outputs.is_some()
        || ![DataFormat::NCHW, DataFormat::CHW].contains(&spec.data_format)
        || spec.kernel_shape.len() != 2
    {
        return None;
    }
    let fact = model.outlet_fact(*node.inputs.first()?).ok()?;
    let dt = fact.datum_type;
    if ![f32::datum_type(), u8::datum_type()].contains(&dt.unquantized()) {
        return None;
    }
    let shape: TVec<usize> = fact.shape.as_concrete()?.into();
    let (c, h, w) = match *shape {
        [n, c, h, w] if spec.data_format == DataFormat::NCHW => (n * c, h, w),
        [c, h, w] if spec.data_format == DataFormat::CHW => (c, h, w),
        _ => return None,
    };
    let padding = spec.computed_padding(&[h, w]);
    let geometry = Geometry {
        channels: c,
        input: [h, w],
        kernel: [spec.kernel_shape[0], spec.kernel_shape[1]],
        strides: [spec.stride(0), spec.stride(1)],
        dilations: [spec.dilation(0), spec.dilation(1)],
        pads: [
            padding[0].pad_before,
            padding[1].pad_before,
            padding[0].pad_after,
            padding[1].pad_after,
        ],
    };
    // ceil_mode and tract's own rounding give the output size tract planned for.
    let out = supports(&geometry).ok()?;
    if out != [padding[0].convoluted, padding[1].convoluted] {
        return None;
    }
    let output_shape: TVec<usize> = node.outputs[0].fact.shape.as_concrete()?.into();
    if output_shape.iter().product::<usize>() != c * out[0] * out[1] {
        return None;
    }
    Some(MaxPoolOp {
        geometry,
        datum_type: dt,
        output_shape,
    })
}

/// A 2-D max pool over `geometry.channels` planes (batch × channels) of `f32` or `u8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MaxPoolOp {
    /// The planes (`channels`: every plane of the batch) and the window.
    geometry: Geometry,
    /// `f32`, or `u8` (with the input's quantization, which pooling keeps).
    datum_type: DatumType,
    output_shape: TVec<usize>,
}

impl MaxPoolOp {
    /// Pools every plane of `x` into `y`, planes split over the session's pool.
    fn pool<T: PoolValue + Datum>(&self, x: &Tensor, y: &mut Tensor) -> TractResult<()> {
        let g = Geometry {
            channels: 1,
            ..self.geometry
        };
        let plane_in = g.input_len();
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<T>()?;
        ensure!(
            xs.len() == plane_in * self.geometry.channels,
            "TernMaxPool planned for {} planes of {:?}, got {:?}",
            self.geometry.channels,
            g.input,
            x.shape()
        );
        let mut view = y.try_as_plain_ram_mut()?;
        let plane_out = g.output_len();
        for_each_plane(view.as_slice_mut::<T>()?, plane_out, |_: &mut (), i, y| {
            max_pool_plane(&g, &xs[i * plane_in..(i + 1) * plane_in], y)
        })
        .map_err(|e| anyhow::anyhow!(e))
    }
}

impl Op for MaxPoolOp {
    fn name(&self) -> StaticName {
        "TernMaxPool".into()
    }

    op_as_typed_op!();
}

impl EvalOp for MaxPoolOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs.first().context("TernMaxPool takes one input")?;
        ensure!(
            x.datum_type() == self.datum_type,
            "TernMaxPool planned for {:?}, got {:?}",
            self.datum_type,
            x.datum_type()
        );
        // SAFETY: numbers have no invalid values, and every plane of `y` is written by the
        // kernel before it is read (or `y` is dropped with the error).
        let mut y = unsafe { Tensor::uninitialized_dt(self.datum_type, &self.output_shape)? };
        if self.datum_type.unquantized() == u8::datum_type() {
            self.pool::<u8>(x, &mut y)?;
        } else {
            self.pool::<f32>(x, &mut y)?;
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for MaxPoolOp {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.datum_type.fact(self.output_shape.clone())))
    }

    as_op!();
}
