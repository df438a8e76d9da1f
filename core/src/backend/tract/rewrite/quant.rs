//! `quant-u8`: the element-wise quantize and dequantize passes between quantized layers,
//! vectorised (`tern_kernels::quant`). tract runs them as scalar loops; in a QDQ model
//! there is a pair per activation, and they cost more than the layers between them.
//!
//! `quant-dynamic`: ONNX `DynamicQuantizeLinear` (before each `MatMulInteger` of a
//! dynamically quantized model), vectorised. tract's runs a branchy scalar fold for the
//! range and a libm `roundevenf` call per value: on MiniLM's int8 model it was 40 % of a
//! run.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::quant::{DequantizeLinearF32, QuantizeLinearU8};

use tern_kernels::quant::{
    dequantize_u8, dynamic_range, quantize_dynamic_u8, quantize_u8, DynamicQuant,
};
use tern_kernels::Isa;

use super::{for_each_chunk, replace_each, TASK};

/// Replaces tract's `f32 → u8` quantize and `u8 → f32` dequantize ops by [`QuantU8Op`].
pub(super) fn pass(model: &mut TypedModel) -> TractResult<usize> {
    let isa = Isa::detect();
    replace_each(model, |model, node| {
        let (Some(input), Some(output)) = (node.inputs.first(), node.outputs.first()) else {
            return Ok(None);
        };
        let (input, output) = (
            model.outlet_fact(*input)?.datum_type,
            output.fact.datum_type,
        );
        let direction = if let Some(q) = node
            .op_as::<ElementWiseOp>()
            .and_then(|op| op.0.downcast_ref::<QuantizeLinearU8>())
        {
            (input == f32::datum_type() && output == u8::datum_type())
                .then_some(Direction::Quantize(q.scale, q.zero_point))
        } else if let Some(dq) = node.op_as::<DequantizeLinearF32>() {
            (input == u8::datum_type() && output == f32::datum_type())
                .then(|| u8::try_from(dq.zero_point).ok())
                .flatten()
                .map(|zero| Direction::Dequantize(dq.scale, zero))
        } else {
            None
        };
        Ok(direction.map(|direction| QuantU8Op { direction, isa }))
    })
}

/// Replaces tract's `DynamicQuantizeLinearU8` (an `f32` input; the bytes, the scale and the
/// zero point out) by [`DynamicQuantOp`].
pub(super) fn dynamic_pass(model: &mut TypedModel) -> TractResult<usize> {
    let isa = Isa::detect();
    replace_each(model, |model, node| {
        if node.op.name() != "DynamicQuantizeLinearU8" || node.inputs.len() != 1 {
            return Ok(None);
        }
        let types: Vec<DatumType> = node.outputs.iter().map(|o| o.fact.datum_type).collect();
        Ok(
            (model.outlet_fact(node.inputs[0])?.datum_type == f32::datum_type()
                && types == [u8::datum_type(), f32::datum_type(), u8::datum_type()])
            .then_some(DynamicQuantOp { isa }),
        )
    })
}

/// ONNX `DynamicQuantizeLinear`: `f32` in; the bytes, the scale (`f32` scalar) and the
/// zero point (`u8` scalar) out, as `tern_kernels::quant` defines them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DynamicQuantOp {
    isa: Isa,
}

impl Op for DynamicQuantOp {
    fn name(&self) -> StaticName {
        "TernDynamicQuantizeU8".into()
    }

    op_as_typed_op!();
}

impl EvalOp for DynamicQuantOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs
            .first()
            .context("a dynamic quantization takes one input")?;
        let xs = x.try_as_plain_ram()?;
        let q = DynamicQuant::of(dynamic_range(self.isa, xs.as_slice::<f32>()?));
        let isa = self.isa;
        let y = map(x, |x: &[f32], y: &mut [u8]| {
            quantize_dynamic_u8(isa, x, q, y)
        })?;
        Ok(tvec!(
            y.into_tvalue(),
            tensor0(q.scale).into_tvalue(),
            tensor0(q.zero).into_tvalue()
        ))
    }
}

impl TypedOp for DynamicQuantOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(
            u8::datum_type().fact(inputs[0].shape.clone()),
            f32::scalar_fact(),
            u8::scalar_fact()
        ))
    }

    as_op!();
}

/// Which way a [`QuantU8Op`] converts, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Direction {
    /// `f32 → u8`: the reciprocal of the scale (as tract holds it), the zero point.
    Quantize(f32, u8),
    /// `u8 → f32`: the scale, the zero point.
    Dequantize(f32, u8),
}

/// A vectorised quantize or dequantize pass.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct QuantU8Op {
    direction: Direction,
    isa: Isa,
}

impl Eq for QuantU8Op {}

impl QuantU8Op {
    /// For a quantize pass, the reciprocal of its scale and its zero point.
    pub(super) fn quantize(&self) -> Option<(f32, u8)> {
        match self.direction {
            Direction::Quantize(inv_scale, zero) => Some((inv_scale, zero)),
            Direction::Dequantize(..) => None,
        }
    }
}

impl QuantU8Op {
    /// For a dequantize pass, its scale and zero point.
    pub(super) fn dequantize(&self) -> Option<(f32, u8)> {
        match self.direction {
            Direction::Dequantize(scale, zero) => Some((scale, zero)),
            Direction::Quantize(..) => None,
        }
    }
}

impl Op for QuantU8Op {
    fn name(&self) -> StaticName {
        match self.direction {
            Direction::Quantize(..) => "TernQuantizeU8".into(),
            Direction::Dequantize(..) => "TernDequantizeU8".into(),
        }
    }

    op_as_typed_op!();
}

impl EvalOp for QuantU8Op {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs.first().context("a quantize pass takes one input")?;
        let isa = self.isa;
        let y = match self.direction {
            Direction::Quantize(inv_scale, zero) => map(x, |x: &[f32], y: &mut [u8]| {
                quantize_u8(isa, x, inv_scale, zero, y)
            })?,
            Direction::Dequantize(scale, zero) => map(x, |x: &[u8], y: &mut [f32]| {
                dequantize_u8(isa, x, scale, zero, y)
            })?,
        };
        Ok(tvec!(y.into_tvalue()))
    }
}

/// `f` over `x` into a new tensor of its shape, in pieces of [`TASK`] elements over the
/// session's pool.
fn map<X: Datum, Y: Datum>(
    x: &Tensor,
    f: impl Fn(&[X], &mut [Y]) -> Result<(), tern_kernels::Unsupported> + Send + Sync,
) -> TractResult<Tensor> {
    let xs = x.try_as_plain_ram()?;
    let xs = xs.as_slice::<X>()?;
    // SAFETY: the outputs (u8 and f32) have no invalid values, and the pieces below cover
    // every value of `y` (or the error drops it unread).
    let mut y = unsafe { Tensor::uninitialized::<Y>(x.shape())? };
    let mut view = y.try_as_plain_ram_mut()?;
    for_each_chunk(view.as_slice_mut::<Y>()?, TASK, |(i, y)| {
        f(&xs[i * TASK..i * TASK + y.len()], y)
    })
    .map_err(|e| anyhow::anyhow!(e))?;
    Ok(y)
}

impl TypedOp for QuantU8Op {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let dt = match self.direction {
            Direction::Quantize(..) => u8::datum_type(),
            Direction::Dequantize(..) => f32::datum_type(),
        };
        Ok(tvec!(dt.fact(inputs[0].shape.clone())))
    }

    as_op!();
}
