//! Lowering: a decluttered tract graph with concrete shapes → a [`Program`] of device steps.
//!
//! tract has already done the front-end work by the time a graph gets here: ONNX parsing,
//! typing, constant folding (every `Shape`/`Gather`/`Concat` chain that only computes sizes
//! is gone) and decluttering into a small set of core ops (`Conv`, `EinSum` for every
//! `MatMul`/`Gemm`, `TypedBinOp`, `ElementWiseOp`, `Reduce`, `Softmax`, `AxisOp`…). This
//! module walks the graph in order, checks what every device step needs (one f32 output of
//! a concrete, non-empty shape), and hands each node to the op families ([`super::ops`]),
//! which resolve its attributes for the concrete shapes and upload constants once through
//! the [`Lowering`] context. A node no family takes is an [`Error::UnsupportedOp`] naming
//! the node.

use burn_backend::tensor::Device;
use burn_backend::{Backend, FloatDType};
use tract_onnx::prelude::*;

use super::context::{compile_err, concrete, unsupported, Lowering};
use super::ops::{lower_node, Lowered};
use super::program::{Program, Step};
#[cfg(doc)]
use crate::error::Error;
use crate::error::Result;

/// Turns a tract typed graph (concrete shapes, decluttered) into a device program that
/// computes in `precision` (f32 or f16).
pub(crate) fn lower<B: Backend>(
    model: &TypedModel,
    device: &Device<B>,
    precision: FloatDType,
) -> Result<Program<B>> {
    let mut lowering = Lowering::<B>::new(model, device.clone(), precision);
    let mut steps = Vec::new();
    let mut inputs = Vec::new();
    for outlet in model.input_outlets().map_err(compile_err)? {
        // Input types were checked by `prepare_on`, and programs type every input as f32.
        let fact = model.outlet_fact(*outlet).map_err(compile_err)?;
        let shape = concrete(&fact.shape)?;
        if shape.is_empty() || shape.contains(&0) {
            return Err(unsupported(
                model.node(outlet.node),
                format!("input of shape {shape:?}: scalar and empty tensors stay on the CPU"),
            ));
        }
        inputs.push(lowering.new_slot(*outlet));
    }
    let order = model.eval_order().map_err(compile_err)?;
    for id in order {
        let node = model.node(id);
        if model
            .input_outlets()
            .map_err(compile_err)?
            .contains(&id.into())
        {
            continue;
        }
        // Folded values (constants, shape arithmetic) are uploaded when a step reads them.
        if node.outputs.iter().all(|o| o.fact.konst.is_some()) {
            continue;
        }
        let out_shape = check_node(&lowering, node)?;
        match lower_node(&mut lowering, node, &out_shape)? {
            Lowered::Step(op, inputs) => {
                let output = lowering.new_slot(OutletId::new(node.id, 0));
                steps.push(Step {
                    op,
                    inputs,
                    output,
                    node: node.name.clone(),
                });
            }
            Lowered::Alias(slot) => lowering.alias(OutletId::new(node.id, 0), slot),
        }
    }
    let mut outputs = Vec::new();
    for outlet in model.output_outlets().map_err(compile_err)? {
        let fact = model.outlet_fact(*outlet).map_err(compile_err)?;
        if fact.datum_type != f32::datum_type() {
            return Err(unsupported(
                model.node(outlet.node),
                format!(
                    "output is {:?}; the GPU backend computes f32",
                    fact.datum_type
                ),
            ));
        }
        outputs.push((lowering.float(*outlet)?, concrete(&fact.shape)?));
    }
    Ok(Program::new(
        device.clone(),
        precision,
        lowering.consts,
        steps,
        lowering.n_slots,
        inputs,
        outputs,
    ))
}

/// What every device step needs: one f32 output of a concrete, non-empty shape, and no
/// computed scalar input. Returns the output shape.
fn check_node<B: Backend>(cx: &Lowering<B>, node: &TypedNode) -> Result<Vec<usize>> {
    if node.outputs.len() != 1 {
        return Err(unsupported(node, "more than one output"));
    }
    let out_fact = &node.outputs[0].fact;
    if out_fact.datum_type != f32::datum_type() {
        return Err(unsupported(
            node,
            format!(
                "produces {:?}; the GPU backend computes f32",
                out_fact.datum_type
            ),
        ));
    }
    let out_shape = out_fact
        .shape
        .as_concrete()
        .map(|s| s.to_vec())
        .ok_or_else(|| unsupported(node, "output shape known only at run time"))?;
    if out_shape.is_empty()
        || out_shape.contains(&0)
        || node
            .inputs
            .iter()
            .any(|i| cx.rank(*i) == Some(0) && cx.konst(*i).is_none())
    {
        return Err(unsupported(node, "scalar or empty tensors"));
    }
    Ok(out_shape)
}
