//! `mean-u8` and `maxpool-u8`: pooling between quantized tensors on bytes.
//!
//! - `Q(Σ DQ(x) · 1/n)` over the trailing axes (GlobalAveragePool): [`MeanU8Op`] sums the
//!   bytes as integers and scales once. The integer sum is exact where the float sum
//!   rounds, so an output may differ from the chain's by one step where the mean falls on
//!   a rounding boundary.
//! - `Q(MaxPool(DQ(x)))`: dequantize and quantize are non-decreasing, so the maximum
//!   commutes with them: `MaxPool(x)` on bytes, then (unless it is the identity) the
//!   256-entry table of `Q(DQ(v))` on the pooled, smaller tensor. Exactly the chain's
//!   result.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::MaxPool;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};

use tern_kernels::quant::{dequantize_u8, quantize_u8};
use tern_kernels::Isa;

use super::binary::{dequantized, Dq};
use super::lut::LutU8Op;
use super::quant::QuantU8Op;
use super::{konst, reroute};

/// Replaces each `Q(Σ_{trailing axes} DQ(x) · k)` (GlobalAveragePool, `k` = 1/n a scalar
/// constant) by a [`MeanU8Op`].
pub(super) fn mean_pass(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(quantize) = node.op_as::<QuantU8Op>().and_then(|q| q.quantize()) else {
            continue;
        };
        let Some(found) = mean_of(model, node.inputs[0]) else {
            continue;
        };
        let (x, op) = found;
        let op = MeanU8Op { quantize, ..op };
        reroute(model, id, &[x], vec![("mean", Box::new(op))])?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// `Σ DQ(x) · k` at `outlet`: the `u8` input and the op (its quantization still unset).
fn mean_of(model: &TypedModel, outlet: OutletId) -> Option<(OutletId, MeanU8Op)> {
    let mul = model.node(outlet.node);
    let bin = mul.op_as::<TypedBinOp>()?;
    if bin.0.name() != "Mul" || mul.inputs.len() != 2 {
        return None;
    }
    let factor = konst(model, mul, 1)?;
    if factor.len() != 1 || factor.datum_type() != f32::datum_type() {
        return None;
    }
    let factor = *factor
        .try_as_plain_ram()
        .ok()?
        .as_slice::<f32>()
        .ok()?
        .first()?;
    let sum = model.node(mul.inputs[0].node);
    let reduce = sum.op_as::<Reduce>()?;
    if reduce.reducer != Reducer::Sum {
        return None;
    }
    let (x, dq) = dequantized(model, *sum.inputs.first()?)?;
    let shape = model.outlet_fact(x).ok()?.shape.as_concrete()?.to_vec();
    let mut axes = reduce.axes.to_vec();
    axes.sort_unstable();
    let trailing = (shape.len() - axes.len()..shape.len()).collect::<Vec<_>>();
    if axes.is_empty() || axes != trailing {
        return None;
    }
    Some((
        x,
        MeanU8Op {
            dequantize: dq,
            factor,
            inner: shape[shape.len() - axes.len()..].iter().product(),
            reduced: axes.len(),
            quantize: (1.0, 0),
        },
    ))
}

/// `quantize(scale · (Σ x - n · zero) · factor)` over each run of `inner` bytes (the
/// trailing axes), kept as axes of 1.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MeanU8Op {
    dequantize: Dq,
    factor: f32,
    inner: usize,
    /// How many trailing axes are reduced.
    reduced: usize,
    quantize: (f32, u8),
}

impl Eq for MeanU8Op {}

impl Op for MeanU8Op {
    fn name(&self) -> StaticName {
        "TernMeanU8".into()
    }

    op_as_typed_op!();
}

impl EvalOp for MeanU8Op {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let inner = self.inner.max(1);
        ensure!(x.len() % inner == 0, "{:?} in runs of {inner}", x.shape());
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<u8>()?;
        let (scale, zero) = self.dequantize;
        let (inv, zo) = self.quantize;
        let means: Vec<f32> = xs
            .chunks(inner)
            .map(|run| {
                // u32 sums of at most 2^24 bytes cannot overflow.
                let sum: i64 = run
                    .chunks(1 << 24)
                    .map(|c| i64::from(c.iter().map(|&v| u32::from(v)).sum::<u32>()))
                    .sum();
                let centred = sum - i64::from(zero) * run.len() as i64;
                centred as f32 * scale * self.factor
            })
            .collect();
        let mut ys = vec![0u8; means.len()];
        quantize_u8(Isa::Scalar, &means, inv, zo, &mut ys).map_err(|e| anyhow::anyhow!(e))?;
        let shape = self.output_shape(x.shape());
        Ok(tvec!(tensor1(&ys).into_shape(&shape)?.into_tvalue()))
    }
}

impl MeanU8Op {
    /// The input's shape with the reduced axes kept as 1.
    fn output_shape<D: Clone + From<usize>>(&self, shape: &[D]) -> Vec<D> {
        let mut out = shape.to_vec();
        let kept = out.len().saturating_sub(self.reduced);
        out[kept..].fill(D::from(1));
        out
    }
}

impl TypedOp for MeanU8Op {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == u8::datum_type(),
            "a byte mean reads u8"
        );
        let shape: Vec<TDim> = self.output_shape(&inputs[0].shape.to_tvec());
        Ok(tvec!(u8::fact(shape)))
    }

    as_op!();
}

/// Replaces each `Q(MaxPool(DQ(x)))` (positive scales, no index output) by a MaxPool on
/// `x` followed by the table of `Q(DQ(v))` (none when that is the identity).
pub(super) fn maxpool_pass(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some((inv, zo)) = node.op_as::<QuantU8Op>().and_then(|q| q.quantize()) else {
            continue;
        };
        let pool_node = model.node(node.inputs[0].node);
        let Some(pool) = pool_node.op_as::<MaxPool>() else {
            continue;
        };
        let Some((x, (scale, zero))) = pool_node
            .inputs
            .first()
            .and_then(|&i| dequantized(model, i))
        else {
            continue;
        };
        if pool.with_index_outputs.is_some() || !(scale > 0.0 && inv > 0.0) {
            continue;
        }
        // Q(DQ(v)) for every byte, by the kernels the quantize passes run.
        let values: Vec<u8> = (0..=255).collect();
        let mut floats = [0f32; 256];
        let mut table = [0u8; 256];
        dequantize_u8(Isa::Scalar, &values, scale, zero, &mut floats)
            .and_then(|_| quantize_u8(Isa::Scalar, &floats, inv, zo, &mut table))
            .map_err(|e| anyhow::anyhow!(e))?;
        let mut ops: Vec<(&str, Box<dyn TypedOp>)> = vec![("maxpool", Box::new(pool.clone()))];
        if table.iter().enumerate().any(|(v, &t)| usize::from(t) != v) {
            ops.push(("lut", Box::new(LutU8Op::per_tensor(table))));
        }
        reroute(model, id, &[x], ops)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::super::binary::tests::{bytes, outputs};
    use super::*;
    use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::math;
    use tract_onnx::tract_core::ops::nn::DataFormat;
    use tract_onnx::tract_core::ops::quant::{quantize_linear_u8, DequantizeLinearF32};

    /// GlobalAveragePool's `Q(Σ DQ(x) / n)` as an integer sum, within one quantization
    /// step of the float chain; a 2×2 MaxPool between a dequantize and a quantize of other
    /// parameters, on bytes and a table, exactly.
    #[test]
    fn byte_pools_give_what_the_chain_gave() -> TractResult<()> {
        let shape = [2usize, 3, 12, 40];
        let mut m = TypedModel::default();
        let x = m.add_source("x", u8::fact(shape))?;
        let dx = m.wire_node(
            "dq",
            DequantizeLinearF32 {
                scale: 0.05,
                zero_point: 121,
            },
            &[x],
        )?[0];
        let sum = m.wire_node("sum", Reduce::new(tvec![2, 3], Reducer::Sum), &[dx])?[0];
        let k = m.add_const("k", tensor0(1.0f32 / 480.0).broadcast_into_rank(4)?)?;
        let mean = m.wire_node("mean", math::mul(), &[sum, k])?[0];
        let mean = m.wire_node("q.mean", quantize_linear_u8(1.0 / 0.01, 128), &[mean])?[0];
        let spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![2, 2],
            padding: PaddingSpec::Valid,
            dilations: None,
            strides: Some(tvec![2, 2]),
            input_channels: 3,
            output_channels: 3,
        };
        let pool = MaxPool {
            pool_spec: spec,
            with_index_outputs: None,
        };
        let max = m.wire_node("max", pool, &[dx])?[0];
        let max = m.wire_node("q.max", quantize_linear_u8(1.0 / 0.08, 7), &[max])?[0];
        m.select_output_outlets(&[mean, max])?;
        let inputs = [bytes(&shape, 5)?];

        let mut rewritten = m.clone();
        super::super::quant::pass(&mut rewritten)?;
        assert_eq!(maxpool_pass(&mut rewritten)?, 1);
        assert_eq!(mean_pass(&mut rewritten)?, 1);
        assert!(rewritten.nodes().iter().any(|n| n.op_is::<MeanU8Op>()));
        let want = outputs(m, &inputs)?;
        let got = outputs(rewritten, &inputs)?;
        assert_eq!(want[1], got[1], "max pool");
        assert_eq!(want[0].len(), got[0].len());
        for (w, g) in want[0].iter().zip(&got[0]) {
            assert!(w.abs_diff(*g) <= 1, "mean {w} vs {g}");
        }
        Ok(())
    }
}
