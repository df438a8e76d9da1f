//! `rescale-f32` and `epilogue`: the float ops after an int8 layer whose output is not
//! requantized, folded into the layer's epilogue (`tern_kernels::epilogue`).
//!
//! QDQ fusion writes `ConvInteger → Cast → Mul(scale) [→ Add(bias)]` for a convolution
//! whose output stays float (tern-quantize quantizes only the convolutions' inputs, so a
//! BatchNormalization, an activation and the next layer's quantization follow). The
//! `rescale-f32` pass folds the Cast/Mul/Add into the layer; `epilogue` then folds what
//! follows, as far as it can: the BatchNormalization's Mul/Add, Relu/Clip, a HardSwish, and
//! the quantization, so the layer writes the next layer's `u8` in one pass. Both apply to
//! every op that implements [`Epilogued`] (the one-group and the depthwise convolution);
//! `epilogue` also to their float twins, whose epilogue starts as their bias.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;

use tern_kernels::epilogue::{Epilogue, HardSwish, OutputType};

use super::conv::ConvQ8Op;
use super::conv_f32::ConvF32Op;
use super::depthwise::DepthwiseQ8Op;
use super::depthwise_f32::DepthwiseF32Op;
use super::plain_vec;
use super::quant::QuantU8Op;

/// The datum type `e` writes.
pub(super) fn datum_type(e: &Epilogue) -> DatumType {
    match e.output_type() {
        OutputType::F32 => f32::datum_type(),
        OutputType::U8 => u8::datum_type(),
    }
}

/// A layer whose accumulators (an int8 layer's `i32`, a float layer's `f32`) can go
/// through an [`Epilogue`].
pub(super) trait Epilogued: TypedOp + Clone {
    /// Output channels: the epilogue's rows.
    fn channels(&self) -> usize;
    /// The output's datum type (`i32` for an int8 layer before any epilogue).
    fn output_type(&self) -> DatumType;
    /// The epilogue so far.
    fn epilogue(&self) -> Option<&Epilogue>;
    /// The same layer with epilogue `e` (its output type follows: f32, or u8 when `e`
    /// quantizes).
    fn with_epilogue(&self, e: Epilogue) -> Self;
}

/// Folds the `Cast → Mul(per-channel const) [→ Add(per-channel const)]` after an `i32`
/// [`ConvQ8Op`] or [`DepthwiseQ8Op`] (what QDQ fusion writes for a convolution whose output stays float) into
/// the op's epilogue: one pass writing f32 instead of three element-wise ops.
pub(super) fn rescale_pass(model: &mut TypedModel) -> TractResult<usize> {
    Ok(rescale::<ConvQ8Op>(model)? + rescale::<DepthwiseQ8Op>(model)?)
}

/// [`rescale_pass`] for the ops of type `T`.
fn rescale<T: Epilogued>(model: &mut TypedModel) -> TractResult<usize> {
    let mut folded = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = node.op_as::<T>() else {
            continue;
        };
        if op.output_type() != i32::datum_type() || op.epilogue().is_some() {
            continue;
        }
        let channels = op.channels();
        let Some(cast) = single_succ(model, node)
            .filter(|n| n.op_as::<Cast>().is_some_and(|c| c.to == f32::datum_type()))
        else {
            continue;
        };
        let Some(mul) = single_succ(model, cast) else {
            continue;
        };
        let Some(scale) = per_channel(model, mul, "Mul", channels) else {
            continue;
        };
        let add = single_succ(model, mul)
            .and_then(|n| Some((n, per_channel(model, n, "Add", channels)?)));
        let (last, bias) = match add {
            Some((add, bias)) => (add.id, bias),
            None => (mul.id, vec![0.0; channels]),
        };
        let fused = op.with_epilogue(Epilogue::affine(scale, bias));
        splice(model, id, last, fused, "rescaled")?;
        folded += 1;
    }
    if folded > 0 {
        model.compact()?;
    }
    Ok(folded)
}

/// Extends the epilogue of an f32 [`ConvQ8Op`] or [`DepthwiseQ8Op`] ([`rescale_pass`]),
/// or of a float [`ConvF32Op`] or [`DepthwiseF32Op`], with the float ops after it, as far as they fold ([`tern_kernels::epilogue`]): per-channel or scalar
/// `Mul`/`Add`/`Sub`/`Div` by constants (an unfolded BatchNormalization), then `Max`/`Min`
/// by scalars (Relu, Clip), then a HardSwish spelled out, then the quantization to `u8`
/// ([`QuantU8Op`]) for the next int8 layer. Each absorbed node must be read by the next one
/// alone.
pub(super) fn pass(model: &mut TypedModel) -> TractResult<usize> {
    Ok(extend::<ConvQ8Op>(model)?
        + extend::<DepthwiseQ8Op>(model)?
        + extend::<ConvF32Op>(model)?
        + extend::<DepthwiseF32Op>(model)?)
}

/// [`pass`] for the ops of type `T`.
fn extend<T: Epilogued>(model: &mut TypedModel) -> TractResult<usize> {
    let mut extended = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = node.op_as::<T>() else {
            continue;
        };
        let Some(start) = op.epilogue().filter(|e| e.quantize.is_none()) else {
            continue;
        };
        let mut e = start.clone();
        let mut tail = node;
        let mut stage = Stage::Affine;
        loop {
            let step = single_succ(model, tail)
                .and_then(|next| fold(model, next, &mut e, &mut stage).then_some(next))
                .or_else(|| {
                    (stage < Stage::HardSwish)
                        .then(|| hard_swish(model, tail))
                        .flatten()
                        .map(|(last, h)| {
                            e.hard_swish = Some(h);
                            stage = Stage::HardSwish;
                            last
                        })
                });
            match step {
                Some(next) => tail = next,
                None => break,
            }
            if e.quantize.is_some() {
                break;
            }
        }
        if tail.id == node.id {
            continue;
        }
        let fused = op.with_epilogue(e);
        splice(model, id, tail.id, fused, "epilogue")?;
        extended += 1;
    }
    if extended > 0 {
        model.compact()?;
    }
    Ok(extended)
}

/// How far an epilogue has come: each step may only follow the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Affine,
    Clamp,
    HardSwish,
}

/// Folds `node` into `e` if it is the next step an epilogue takes; says whether it did.
fn fold(model: &TypedModel, node: &TypedNode, e: &mut Epilogue, stage: &mut Stage) -> bool {
    let channels = e.rows();
    if let Some(q) = node.op_as::<QuantU8Op>().and_then(QuantU8Op::quantize) {
        e.quantize = Some(q);
        return true;
    }
    let Some((op, values, konst_first)) = const_operand(model, node, channels) else {
        return false;
    };
    let at = |c: usize| values[if values.len() == 1 { 0 } else { c }];
    match op {
        "Mul" | "Add" | "Sub" | "Div" if *stage == Stage::Affine => {
            if konst_first && ["Sub", "Div"].contains(&op) {
                return false;
            }
            for c in 0..channels {
                let v = at(c);
                match op {
                    "Mul" => (e.scale[c], e.bias[c]) = (e.scale[c] * v, e.bias[c] * v),
                    "Div" => (e.scale[c], e.bias[c]) = (e.scale[c] / v, e.bias[c] / v),
                    "Add" => e.bias[c] += v,
                    _ => e.bias[c] -= v,
                }
            }
            true
        }
        "Max" | "Min" if values.len() == 1 && *stage <= Stage::Clamp => {
            let (lo, hi) = &mut e.clamp;
            match op {
                "Max" => *lo = lo.max(values[0]),
                _ => *hi = hi.min(values[0]),
            }
            *stage = Stage::Clamp;
            true
        }
        _ => false,
    }
}

/// `x · min(max(x + a, lo), hi) · m` (or `/ d`) read from the nodes after `x`'s producer
/// `node`: its two readers are `Add(x, a)` and the `Mul(x, clamped)`; returns the last
/// node and the step.
fn hard_swish<'m>(model: &'m TypedModel, node: &TypedNode) -> Option<(&'m TypedNode, HardSwish)> {
    let outlet = OutletId::new(node.id, 0);
    let [a, b] = node.outputs.first()?.successors.as_slice() else {
        return None;
    };
    if model.output_outlets().ok()?.contains(&outlet) {
        return None;
    }
    let (a, b) = (model.node(a.node), model.node(b.node));
    let (add, mul) = match bin_name(a) {
        Some("Add") => (a, b),
        _ => (b, a),
    };
    let (_, shift, _) =
        const_operand(model, add, 1).filter(|(op, v, _)| *op == "Add" && v.len() == 1)?;
    let mut h = HardSwish {
        add: shift[0],
        lo: f32::NEG_INFINITY,
        hi: f32::INFINITY,
        mul: 1.0,
    };
    let mut clamped = add;
    while let Some(next) = single_succ(model, clamped).filter(|n| n.id != mul.id) {
        let (op, v, _) = const_operand(model, next, 1).filter(|(_, v, _)| v.len() == 1)?;
        match op {
            "Max" => h.lo = h.lo.max(v[0]),
            "Min" => h.hi = h.hi.min(v[0]),
            _ => return None,
        }
        clamped = next;
    }
    let product = single_succ(model, clamped).filter(|n| n.id == mul.id)?;
    let mut inputs = product.inputs.iter();
    let both = [inputs.next()?, inputs.next()?];
    if bin_name(product) != Some("Mul")
        || !both.contains(&&outlet)
        || !both.contains(&&OutletId::new(clamped.id, 0))
    {
        return None;
    }
    let (op, v, konst_first) = single_succ(model, product)
        .and_then(|n| const_operand(model, n, 1))
        .filter(|(_, v, _)| v.len() == 1)?;
    h.mul = match op {
        "Mul" => v[0],
        "Div" if !konst_first => 1.0 / v[0],
        _ => return None,
    };
    Some((single_succ(model, product)?, h))
}

/// The name of `node`'s binary op, if it is one.
pub(super) fn bin_name(node: &TypedNode) -> Option<&'static str> {
    let name = node.op_as::<TypedBinOp>()?.0.name();
    ["Add", "Sub", "Mul", "Div", "Max", "Min"]
        .into_iter()
        .find(|n| *n == name)
}

/// For a binary node with one constant f32 operand of one value or of `channels` values
/// along the channel axis (`[.., C, 1, 1]`) that does not change the other operand's shape:
/// the op's name, the values, and whether the constant is the first operand.
fn const_operand(
    model: &TypedModel,
    node: &TypedNode,
    channels: usize,
) -> Option<(&'static str, Vec<f32>, bool)> {
    let name = bin_name(node)?;
    let [a, b] = node.inputs.as_slice() else {
        return None;
    };
    let (fa, fb) = (model.outlet_fact(*a).ok()?, model.outlet_fact(*b).ok()?);
    let (konst, other, konst_first) = match (&fa.konst, &fb.konst) {
        (Some(k), None) => (k, fb, true),
        (None, Some(k)) => (k, fa, false),
        _ => return None,
    };
    let shape = konst.shape();
    let fits = konst.datum_type() == f32::datum_type()
        && (konst.len() == 1
            || (konst.len() == channels
                && shape.len() >= 3
                && shape[shape.len() - 3..] == [channels, 1, 1]))
        && node.outputs.first()?.fact.shape == other.shape;
    if !fits {
        return None;
    }
    Some((name, plain_vec::<f32>(konst)?, konst_first))
}

/// The only node reading `node`'s output, if exactly one does and the output is not a
/// model output.
pub(super) fn single_succ<'m>(model: &'m TypedModel, node: &TypedNode) -> Option<&'m TypedNode> {
    let [succ] = node.outputs.first()?.successors.as_slice() else {
        return None;
    };
    let outlet = OutletId::new(node.id, 0);
    (!model.output_outlets().ok()?.contains(&outlet)).then(|| model.node(succ.node))
}

/// For a binary `op_name` node with a constant f32 operand ([`const_operand`]): its values,
/// one per channel (a scalar repeated).
fn per_channel(
    model: &TypedModel,
    node: &TypedNode,
    op_name: &str,
    channels: usize,
) -> Option<Vec<f32>> {
    let (name, values, _) = const_operand(model, node, channels)?;
    (name == op_name).then(|| match values.len() {
        1 => vec![values[0]; channels],
        _ => values,
    })
}

/// Replaces the nodes from `node` (an int8 layer) to `last` by `op` reading `node`'s input.
fn splice<T: TypedOp>(
    model: &mut TypedModel,
    node: usize,
    last: usize,
    op: T,
    suffix: &str,
) -> TractResult<()> {
    let (name, input) = (model.node(node).name.clone(), model.node(node).inputs[0]);
    let mut patch = TypedModelPatch::default();
    let tap = patch.tap_model(model, input)?;
    let out = patch.wire_node(format!("{name}.{suffix}"), op, &[tap])?[0];
    patch.shunt_outside(model, OutletId::new(last, 0), out)?;
    patch.apply(model)
}
