//! `softmax`: a float softmax over the last axis on `tern_kernels::softmax` (one pass per
//! row, vectorised exp). tract's calls three generic row kernels per row, whose per-call
//! cost dominates an attention's short rows (MiniLM's 16-key softmax: 0.13 ms a layer).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

use tern_kernels::softmax::softmax_rows;
use tern_kernels::Isa;

use super::{for_each_chunk, replace_each, TASK};

/// Replaces each f32 softmax over the last axis by [`SoftmaxOp`].
pub(super) fn pass(model: &mut TypedModel) -> TractResult<usize> {
    let isa = Isa::detect();
    replace_each(model, |model, node| {
        let Some(softmax) = node.op_as::<Softmax>() else {
            return Ok(None);
        };
        let x = model.outlet_fact(node.inputs[0])?;
        let rank = x.rank();
        Ok((softmax.kind == SoftmaxKind::Softmax
            && softmax.quant_output_dt.is_none()
            && x.datum_type == f32::datum_type()
            && rank > 0
            && *softmax.axes == [rank - 1])
        .then_some(SoftmaxOp { isa }))
    })
}

/// Softmax over the last axis of an f32 tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SoftmaxOp {
    isa: Isa,
}

impl Op for SoftmaxOp {
    fn name(&self) -> StaticName {
        "TernSoftmax".into()
    }

    op_as_typed_op!();
}

impl EvalOp for SoftmaxOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs
            .into_iter()
            .next()
            .context("a softmax takes one input")?;
        let len = x.shape().last().copied().unwrap_or(0);
        let mut y = x.into_tensor();
        if len == 0 || y.len() == 0 {
            return Ok(tvec!(y.into_tvalue()));
        }
        let isa = self.isa;
        let per_task = (TASK / len).max(1) * len;
        let mut view = y.try_as_plain_ram_mut()?;
        for_each_chunk(view.as_slice_mut::<f32>()?, per_task, |(_, rows)| {
            softmax_rows(isa, rows, len)
        })
        .map_err(|e| anyhow::anyhow!(e))?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for SoftmaxOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::datum_type().fact(inputs[0].shape.clone())))
    }

    as_op!();
}
