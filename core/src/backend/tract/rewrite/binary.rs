//! `binary-u8`: the float islands QDQ models leave between two quantized tensors,
//! `Q(DQ(a) + DQ(b))` and `Q(DQ(a) · DQ(b))` (a residual Add; a squeeze-and-excitation
//! Mul, whose `b` is one value per channel), run on bytes: [`BinaryU8Op`] dequantizes a
//! piece of each input into a small float buffer, combines them and quantizes, so the float
//! tensors (four bytes a value, written and read three times) never exist. It runs the
//! chain's own arithmetic in the same order, so it gives what the chain gave, byte for
//! byte.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;

use tern_kernels::quant::{dequantize_u8, quantize_u8};
use tern_kernels::Isa;

use super::quant::QuantU8Op;
use super::{for_each_chunk, reroute, TASK};

/// The combination a [`BinaryU8Op`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Combine {
    Add,
    Mul,
}

impl Combine {
    /// `a ∘= b`, as the float op computes it.
    #[inline]
    fn apply(self, a: &mut f32, b: f32) {
        match self {
            Combine::Add => *a += b,
            Combine::Mul => *a *= b,
        }
    }
}

/// A quantized tensor's dequantization: scale and zero point.
pub(super) type Dq = (f32, u8);

/// The dequantize parameters of the node producing `outlet`, with its `u8` input, when it
/// is a [`QuantU8Op`] dequantize.
pub(super) fn dequantized(model: &TypedModel, outlet: OutletId) -> Option<(OutletId, Dq)> {
    let node = model.node(outlet.node);
    let dq = node.op_as::<QuantU8Op>()?.dequantize()?;
    Some((*node.inputs.first()?, dq))
}

/// Replaces each `Q(DQ(a) ∘ DQ(b))` (∘ an Add or a Mul, `b` of `a`'s shape or varying
/// along its leading axes only) by a [`BinaryU8Op`].
pub(super) fn binary_pass(model: &mut TypedModel) -> TractResult<usize> {
    let isa = Isa::detect();
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some((inv_scale, zero)) = node.op_as::<QuantU8Op>().and_then(|q| q.quantize()) else {
            continue;
        };
        let bin = model.node(node.inputs[0].node);
        let Some(op) = bin.op_as::<TypedBinOp>() else {
            continue;
        };
        let combine = match op.0.name() {
            "Add" => Combine::Add,
            "Mul" => Combine::Mul,
            _ => continue,
        };
        if bin.inputs.len() != 2 || op.1.is_some_and(|t| t != f32::datum_type()) {
            continue;
        }
        let (Some(a), Some(b)) = (
            dequantized(model, bin.inputs[0]),
            dequantized(model, bin.inputs[1]),
        ) else {
            continue;
        };
        let shape = |o: OutletId| -> Option<Vec<usize>> {
            Some(model.outlet_fact(o).ok()?.shape.as_concrete()?.to_vec())
        };
        let (Some(sa), Some(sb), Some(out)) = (shape(a.0), shape(b.0), shape(node.inputs[0]))
        else {
            continue;
        };
        // The full-shaped input first (both ops commute, bit for bit).
        let (full, other, other_shape) = if sa == out { (a, b, sb) } else { (b, a, sa) };
        if shape(full.0).as_ref() != Some(&out) {
            continue;
        }
        let Some(inner) = prefix_broadcast(&out, &other_shape) else {
            continue;
        };
        let op = BinaryU8Op {
            isa,
            combine,
            a: full.1,
            b: other.1,
            inner,
            quantize: (inv_scale, zero),
        };
        reroute(
            model,
            id,
            &[full.0, other.0],
            vec![("binary", Box::new(op))],
        )?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// How many consecutive values of a tensor of shape `full` share one value of `other`
/// (1 when they have the same shape): `other` must keep `full`'s leading axes and be 1 on
/// the rest, at the same rank. `None` for any other broadcast.
fn prefix_broadcast(full: &[usize], other: &[usize]) -> Option<usize> {
    if full.len() != other.len() {
        return None;
    }
    let kept = full.iter().zip(other).take_while(|(f, o)| f == o).count();
    other[kept..]
        .iter()
        .all(|&d| d == 1)
        .then(|| full[kept..].iter().product::<usize>().max(1))
}

/// `quantize(dequantize(a) ∘ dequantize(b))` on bytes; `b` holds one value per `inner`
/// consecutive values of `a` (see [`prefix_broadcast`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BinaryU8Op {
    isa: Isa,
    combine: Combine,
    a: Dq,
    b: Dq,
    inner: usize,
    /// The reciprocal of the output scale and its zero point.
    quantize: (f32, u8),
}

impl Eq for BinaryU8Op {}

impl Op for BinaryU8Op {
    fn name(&self) -> StaticName {
        match self.combine {
            Combine::Add => "TernAddU8".into(),
            Combine::Mul => "TernMulU8".into(),
        }
    }

    op_as_typed_op!();
}

impl EvalOp for BinaryU8Op {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (a, b) = args_2!(inputs);
        let inner = self.inner;
        ensure!(
            a.len() == b.len() * inner,
            "inputs of {:?} and {:?} for runs of {inner}",
            a.shape(),
            b.shape()
        );
        let av = a.try_as_plain_ram()?;
        let av = av.as_slice::<u8>()?;
        let bv = b.try_as_plain_ram()?;
        let bv = bv.as_slice::<u8>()?;
        let mut y = Tensor::zero::<u8>(a.shape())?;
        let mut view = y.try_as_plain_ram_mut()?;
        let ys = view.as_slice_mut::<u8>()?;
        let piece = TASK.div_ceil(inner).max(1) * inner;
        let (isa, (sa, za), (sb, zb), (inv, zo)) = (self.isa, self.a, self.b, self.quantize);
        let combine = self.combine;
        for_each_chunk(ys, piece, |(i, y)| -> TractResult<()> {
            let start = i * piece;
            let mut fa = vec![0f32; y.len()];
            dequantize_u8(isa, &av[start..start + y.len()], sa, za, &mut fa)
                .map_err(|e| anyhow::anyhow!(e))?;
            if inner == 1 {
                let mut fb = vec![0f32; y.len()];
                dequantize_u8(isa, &bv[start..start + y.len()], sb, zb, &mut fb)
                    .map_err(|e| anyhow::anyhow!(e))?;
                fa.iter_mut()
                    .zip(&fb)
                    .for_each(|(a, b)| combine.apply(a, *b));
            } else {
                // One value per run, dequantized as the chain did (all of the piece's at
                // once: one call per run cost more than the runs of a small plane).
                let runs = y.len() / inner;
                let mut fb = vec![0f32; runs];
                let first = start / inner;
                dequantize_u8(isa, &bv[first..first + runs], sb, zb, &mut fb)
                    .map_err(|e| anyhow::anyhow!(e))?;
                for (run, b) in fa.chunks_mut(inner).zip(&fb) {
                    run.iter_mut().for_each(|a| combine.apply(a, *b));
                }
            }
            quantize_u8(isa, &fa, inv, zo, y).map_err(|e| anyhow::anyhow!(e))
        })?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for BinaryU8Op {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.iter().all(|f| f.datum_type == u8::datum_type()),
            "a byte binary op reads u8"
        );
        Ok(tvec!(u8::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::math;
    use tract_onnx::tract_core::ops::quant::{quantize_linear_u8, DequantizeLinearF32};

    /// Bytes `0, 37, 74, …` (mod 256) from `seed`, in `shape`.
    pub(crate) fn bytes(shape: &[usize], seed: usize) -> TractResult<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<u8> = (0..n)
            .map(|i| ((i * 37 + seed * 101) % 256) as u8)
            .collect();
        tensor1(&v).into_shape(shape)
    }

    /// Each output of `m` on `inputs`, as bytes.
    pub(crate) fn outputs(m: TypedModel, inputs: &[Tensor]) -> TractResult<Vec<Vec<u8>>> {
        let inputs = inputs.iter().map(|t| t.clone().into_tvalue()).collect();
        let ys = m.into_runnable()?.run(inputs)?;
        ys.iter()
            .map(|y| Ok(y.try_as_plain_ram()?.as_slice::<u8>()?.to_vec()))
            .collect()
    }

    /// A residual Add of same-shaped tensors, and squeeze-and-excitation Muls by one
    /// value per channel (either operand first), give byte for byte what the float chain
    /// gave, in pieces larger than a task.
    #[test]
    fn byte_adds_and_muls_give_what_the_chain_gave() -> TractResult<()> {
        let shape = [2usize, 3, 70, 90];
        let mut m = TypedModel::default();
        let x = m.add_source("x", u8::fact(shape))?;
        let y = m.add_source("y", u8::fact(shape))?;
        let s = m.add_source("s", u8::fact([2usize, 3, 1, 1]))?;
        let dq = |scale: f32, zero_point: i32| DequantizeLinearF32 { scale, zero_point };
        let dx = m.wire_node("dq.x", dq(0.05, 121), &[x])?[0];
        let dy = m.wire_node("dq.y", dq(0.03, 17), &[y])?[0];
        let ds = m.wire_node("dq.s", dq(0.004, 0), &[s])?[0];
        let add = m.wire_node("add", math::add(), &[dx, dy])?[0];
        let mul = m.wire_node("mul", math::mul(), &[dx, ds])?[0];
        let lum = m.wire_node("lum", math::mul(), &[ds, dy])?[0];
        let mut outs = vec![];
        for (name, t, zero) in [("q.add", add, 100), ("q.mul", mul, 3), ("q.lum", lum, 0)] {
            outs.push(m.wire_node(name, quantize_linear_u8(1.0 / 0.06, zero), &[t])?[0]);
        }
        m.select_output_outlets(&outs)?;
        let inputs = [
            bytes(&shape, 1)?,
            bytes(&shape, 2)?,
            bytes(&[2, 3, 1, 1], 3)?,
        ];

        let mut rewritten = m.clone();
        super::super::quant::pass(&mut rewritten)?;
        assert_eq!(binary_pass(&mut rewritten)?, 3);
        assert!(!rewritten.nodes().iter().any(|n| n.op_is::<TypedBinOp>()));
        assert_eq!(outputs(m, &inputs)?, outputs(rewritten, &inputs)?);
        Ok(())
    }

    #[test]
    fn only_leading_axes_broadcast() {
        assert_eq!(prefix_broadcast(&[2, 3, 4, 5], &[2, 3, 4, 5]), Some(1));
        assert_eq!(prefix_broadcast(&[2, 3, 4, 5], &[2, 3, 1, 1]), Some(20));
        assert_eq!(prefix_broadcast(&[2, 3, 4, 5], &[1, 1, 1, 1]), Some(120));
        assert_eq!(prefix_broadcast(&[2, 3, 4, 5], &[1, 3, 1, 1]), None);
        assert_eq!(prefix_broadcast(&[2, 3, 4, 5], &[2, 3, 4, 1]), Some(5));
        assert_eq!(prefix_broadcast(&[2, 3, 4, 5], &[3, 1, 1]), None);
    }
}
