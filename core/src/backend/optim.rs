//! tract's optimiser pass lists, as tern runs them: the same passes in the same order,
//! with tract's `PushSplitDown` replaced by [`SplitDown`], which does the same in linear
//! time.
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

/// Declutters `model` (tract's `declutter` pass list, linear [`SplitDown`]).
pub(crate) fn declutter(model: &mut TypedModel) -> TractResult<()> {
    linear(Optimizer::declutter()).optimize(model)
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
