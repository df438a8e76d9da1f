//! tract's optimiser pass lists, as tern runs them: the same passes in the same order,
//! with tract's `PushSplitDown` replaced by [`SplitDown`], which does the same in linear
//! time, [`SoftmaxBeforeLut`] first in the declutter list, and `PropagateRoi` only for
//! models with masks (see [`declutter`]).
//!
//! `PushSplitDown` merges nodes that compute the same thing from the same values (two
//! identical `Relu(x)`). It compares every pair of consumers of every value, so one value
//! with many consumers costs their number squared — and every graph has such values: all
//! the `Relu`s of a model read the one shared constant `0` after tract's typing. A chain of
//! 20,000 `Relu`s took 8 s to load, three quarters of it in that pass (onnxruntime: 0.7 s).
//! [`SplitDown`] first groups the consumers by the exact values they read, since only
//! nodes reading the same values can be the same, and compares within groups.

use std::collections::HashMap;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::optim::{Optimizer, OptimizerSession, TypedPass};

/// Declutters `model` (tract's `declutter` pass list, linear [`SplitDown`], after
/// [`SoftmaxBeforeLut`]).
pub(crate) fn declutter(model: &mut TypedModel) -> TractResult<()> {
    let mut optimizer = linear(Optimizer::declutter());
    optimizer.passes.insert(0, Box::new(SoftmaxBeforeLut));
    if !has_masks(model) {
        optimizer
            .passes
            .retain(|pass| format!("{pass:?}") != "PropagateRoi");
    }
    optimizer.optimize(model)
}

/// Whether any value of `model` is boolean: a mask that tract's `PropagateRoi` could turn
/// into a region of interest (attention masks, `Where`). Without one the pass finds nothing
/// to introduce, yet on a model with symbolic sizes it spends most of the declutter in
/// symbolic algebra (ppocr_cls with a symbolic batch, height and width: 0.35 of 1.2 s).
fn has_masks(model: &TypedModel) -> bool {
    model.nodes().iter().any(|n| {
        n.outputs
            .iter()
            .any(|o| o.fact.datum_type == bool::datum_type())
    })
}

/// Optimizes a decluttered `model` to tract's kernels (tract's `codegen` pass list, linear
/// [`SplitDown`]).
pub(crate) fn optimize(model: &mut TypedModel) -> TractResult<()> {
    model.optimize_with_session(&mut linear(Optimizer::codegen()).session())
}

/// `optimizer` with `PushSplitDown` replaced by [`SplitDown`].
fn linear(mut optimizer: Optimizer) -> Optimizer {
    for pass in optimizer.passes.iter_mut() {
        if format!("{pass:?}") == "PushSplitDown" {
            *pass = Box::new(SplitDown);
        }
    }
    optimizer
}

/// Keeps tract from folding a `Softmax` into a byte lookup table.
///
/// tract's `DequantizeLinearF32` declutter turns `dequantize → ops → quantize` into one
/// 256-entry table when the ops between are element-wise, and it takes an op for
/// element-wise when its axes map one to one — which `Softmax`'s do. A quantized softmax
/// (onnxruntime's `QLinearSoftmax`, a QDQ model that quantizes its Softmax) then became a
/// table of softmaxes over the 256 byte values: every output 255 on a test model. Before
/// tract's passes, this one writes a dequantization whose chain of single successors
/// reaches a `Softmax` as the plain `cast → subtract zero point → multiply by scale` it
/// means, which no fusion touches.
#[derive(Clone, Debug)]
pub(crate) struct SoftmaxBeforeLut;

/// How far down a chain of single successors a `Softmax` is looked for.
const LUT_CHAIN: usize = 32;

impl SoftmaxBeforeLut {
    /// Whether a `Softmax` is in the chain tract would fold into a table: the single
    /// successors of `node` through ops whose axes map one to one, up to a quantization.
    fn feeds_softmax(model: &TypedModel, node: &TypedNode) -> TractResult<bool> {
        use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
        use tract_onnx::tract_core::ops::quant::{QuantizeLinearI8, QuantizeLinearU8};
        let (mut current, mut softmax) = (node, false);
        for _ in 0..LUT_CHAIN {
            let Some(next) = model.single_succ(current.id)? else {
                return Ok(false);
            };
            softmax |= next.op_is::<tract_onnx::tract_core::ops::nn::Softmax>();
            let quantizes = next.op_as::<ElementWiseOp>().is_some_and(|op| {
                op.0.downcast_ref::<QuantizeLinearU8>().is_some()
                    || op.0.downcast_ref::<QuantizeLinearI8>().is_some()
            });
            let (inputs, outputs) = model.node_facts(next.id)?;
            let unary = next
                .op
                .axes_mapping(&inputs, &outputs)
                .is_ok_and(|m| m.is_element_wise_unary());
            if quantizes {
                return Ok(softmax);
            }
            if !unary {
                return Ok(false);
            }
            current = next;
        }
        Ok(false)
    }
}

impl TypedPass for SoftmaxBeforeLut {
    fn reset(&mut self) -> TractResult<()> {
        Ok(())
    }

    fn next(
        &mut self,
        _session: &mut OptimizerSession,
        model: &TypedModel,
    ) -> TractResult<Option<TypedModelPatch>> {
        use tract_onnx::tract_core::ops::{cast::cast, math, quant::DequantizeLinearF32};
        for node in model.nodes() {
            let Some(dq) = node.op_as::<DequantizeLinearF32>() else {
                continue;
            };
            if !Self::feeds_softmax(model, node)? {
                continue;
            }
            let mut patch = TypedModelPatch::default();
            let x = patch.tap_model(model, node.inputs[0])?;
            let rank = model.outlet_fact(node.inputs[0])?.rank();
            let zero = tensor0(dq.zero_point as f32).broadcast_into_rank(rank)?;
            let scale = tensor0(dq.scale).broadcast_into_rank(rank)?;
            let zero = patch.add_const(format!("{}.zero_point", node.name), zero)?;
            let scale = patch.add_const(format!("{}.scale", node.name), scale)?;
            let name = &node.name;
            let y = patch.wire_node(format!("{name}.cast"), cast(f32::datum_type()), &[x])?;
            let y = patch.wire_node(format!("{name}.sub"), math::sub(), &[y[0], zero])?;
            let y = patch.wire_node(format!("{name}.mul"), math::mul(), &[y[0], scale])?;
            patch.shunt_outside(model, node.id.into(), y[0])?;
            return Ok(Some(patch));
        }
        Ok(None)
    }
}

/// Merges nodes that read the same values and apply the same op: the later ones' outputs
/// are rewired to the first one's, and they are removed (tract's `PushSplitDown`).
#[derive(Clone, Debug)]
pub(crate) struct SplitDown;

impl TypedPass for SplitDown {
    fn reset(&mut self) -> TractResult<()> {
        Ok(())
    }

    fn next(
        &mut self,
        _session: &mut OptimizerSession,
        model: &TypedModel,
    ) -> TractResult<Option<TypedModelPatch>> {
        let mut patch = TypedModelPatch::default();
        let outputs: Vec<OutletId> = model.output_outlets()?.to_vec();
        let is_output = |node: usize| outputs.iter().any(|o| o.node == node);
        for id in model.eval_order()? {
            for output in &model.node(id).outputs {
                if output.successors.len() < 2 {
                    continue;
                }
                // Consumers by the values they read, in order, each node once.
                let mut groups: HashMap<&[OutletId], Vec<usize>> = HashMap::new();
                for s in &output.successors {
                    let group = groups.entry(&model.node(s.node).inputs[..]).or_default();
                    if !group.contains(&s.node) {
                        group.push(s.node);
                    }
                }
                for group in groups.values().filter(|g| g.len() > 1) {
                    let mut kept: Vec<usize> = Vec::new();
                    for &b in group {
                        if patch.obliterate.contains(&b) {
                            continue;
                        }
                        let b_node = model.node(b);
                        let same = kept.iter().copied().find(|&a| {
                            // Two model outputs stay two outputs.
                            !(is_output(a) && is_output(b)) && model.node(a).same_as(b_node)
                        });
                        match same {
                            Some(a) => {
                                for slot in 0..b_node.outputs.len() {
                                    let tap = patch.tap_model(model, OutletId::new(a, slot))?;
                                    patch.shunt_outside(model, OutletId::new(b, slot), tap)?;
                                }
                                patch.obliterate(b)?;
                            }
                            None => kept.push(b),
                        }
                    }
                }
            }
        }
        Ok(Some(patch).filter(|p| !p.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::math;

    /// Two identical `abs(x)` are merged into one, as tract's pass does; `abs(x)` and
    /// `abs(y)` are not.
    #[test]
    fn nodes_reading_the_same_values_with_the_same_op_are_merged() {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([4])).unwrap();
        let y = model.add_source("y", f32::fact([4])).unwrap();
        let a = model.wire_node("a", math::abs(), &[x]).unwrap()[0];
        let b = model.wire_node("b", math::abs(), &[x]).unwrap()[0];
        let c = model.wire_node("c", math::abs(), &[y]).unwrap()[0];
        let ab = model.wire_node("ab", math::add(), &[a, b]).unwrap()[0];
        let out = model.wire_node("out", math::add(), &[ab, c]).unwrap()[0];
        model.select_output_outlets(&[out]).unwrap();
        declutter(&mut model).unwrap();
        let abs = model
            .nodes()
            .iter()
            .filter(|n| n.op.name().contains("Abs"))
            .count();
        assert_eq!(abs, 2, "{model}");
        let plan = model.into_runnable().unwrap();
        let x = tensor1(&[-1f32, 2., -3., 4.]);
        let y = tensor1(&[10f32, -10., 10., -10.]);
        let got = plan.run(tvec![x.into_tvalue(), y.into_tvalue()]).unwrap();
        let expected = tensor1(&[12f32, 14., 16., 18.]);
        assert_eq!(*got[0], expected);
    }
}
