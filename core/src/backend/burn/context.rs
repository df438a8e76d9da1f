//! The state lowering keeps while it walks a graph: which slot holds each value, the
//! constants uploaded so far, and the small readers every op family uses (shapes, folded
//! constants, scalars). Families read and fill it; they never see the steps or the program.

use std::collections::HashMap;

use burn_backend::tensor::{Device, FloatTensor};
use burn_backend::{Backend, FloatDType, TensorData};
use tract_onnx::prelude::*;

use crate::error::{Error, Result};

/// An ONNX node (after tract's folding) the GPU backend cannot run, and why.
pub(crate) fn unsupported(node: &TypedNode, why: impl std::fmt::Display) -> Error {
    Error::UnsupportedOp {
        op_type: format!("{} ({why})", node.op.name()),
        domain: String::new(),
        node: node.name.clone(),
    }
}

/// A failure to read the graph (a bug or a graph tract should not have produced).
pub(crate) fn compile_err(e: impl std::fmt::Display) -> Error {
    Error::Compile {
        backend: crate::Backend::Gpu,
        reason: e.to_string(),
    }
}

/// A tract tensor's elements cast to `T`, in row-major order.
pub(crate) fn values<T: Datum + Copy>(t: &Tensor) -> Result<Vec<T>> {
    let cast = t.cast_to::<T>().map_err(compile_err)?;
    let view = cast.to_plain_array_view::<T>().map_err(compile_err)?;
    Ok(view.iter().copied().collect())
}

/// A shape known at lowering time.
pub(crate) fn concrete(shape: &ShapeFact) -> Result<Vec<usize>> {
    shape
        .as_concrete()
        .map(|s| s.to_vec())
        .ok_or_else(|| compile_err(format!("shape {shape:?} is not concrete")))
}

/// Slots and constants of a program being lowered.
pub(crate) struct Lowering<'m, B: Backend> {
    pub(crate) model: &'m TypedModel,
    pub(crate) device: Device<B>,
    /// What float constants are stored as on the device.
    precision: FloatDType,
    /// The slot that holds each float value computed or uploaded so far.
    slots: HashMap<OutletId, usize>,
    /// Constants uploaded, with the slot each fills.
    pub(crate) consts: Vec<(usize, FloatTensor<B>)>,
    pub(crate) n_slots: usize,
}

impl<'m, B: Backend> Lowering<'m, B> {
    pub(crate) fn new(model: &'m TypedModel, device: Device<B>, precision: FloatDType) -> Self {
        Lowering {
            model,
            device,
            precision,
            slots: HashMap::new(),
            consts: Vec::new(),
            n_slots: 0,
        }
    }

    /// A fresh slot for the value at `outlet`.
    pub(crate) fn new_slot(&mut self, outlet: OutletId) -> usize {
        let slot = self.n_slots;
        self.n_slots += 1;
        self.slots.insert(outlet, slot);
        slot
    }

    /// Makes `outlet` read the slot `slot` (an op that changes nothing on the device).
    pub(crate) fn alias(&mut self, outlet: OutletId, slot: usize) {
        self.slots.insert(outlet, slot);
    }

    pub(crate) fn fact(&self, outlet: OutletId) -> Result<&TypedFact> {
        self.model.outlet_fact(outlet).map_err(compile_err)
    }

    pub(crate) fn rank(&self, outlet: OutletId) -> Option<usize> {
        self.fact(outlet).ok().map(|f| f.rank())
    }

    pub(crate) fn shape(&self, outlet: OutletId) -> Result<Vec<usize>> {
        concrete(&self.fact(outlet)?.shape)
    }

    /// The slot of a float value; a constant is uploaded (once) on first use.
    pub(crate) fn float(&mut self, outlet: OutletId) -> Result<usize> {
        if let Some(slot) = self.slots.get(&outlet) {
            return Ok(*slot);
        }
        let fact = self.fact(outlet)?;
        let Some(konst) = fact.konst.clone() else {
            return Err(compile_err(format!(
                "value {outlet:?} is read before it is computed"
            )));
        };
        if konst.rank() == 0 || konst.len() == 0 {
            return Err(unsupported(
                self.model.node(outlet.node),
                "scalar or empty constant used as a tensor",
            ));
        }
        let slot = self.upload(&konst)?;
        self.slots.insert(outlet, slot);
        Ok(slot)
    }

    /// The slots of several float values.
    pub(crate) fn floats(&mut self, outlets: &[OutletId]) -> Result<Vec<usize>> {
        outlets.iter().map(|o| self.float(*o)).collect()
    }

    /// Uploads a host tensor as a constant of the program, in a slot of its own.
    pub(crate) fn upload(&mut self, konst: &Tensor) -> Result<usize> {
        let data = TensorData::new(values::<f32>(konst)?, konst.shape().to_vec());
        let mut tensor = B::float_from_data(data, &self.device);
        if self.precision != FloatDType::F32 {
            tensor = B::float_cast(tensor, self.precision);
        }
        let slot = self.n_slots;
        self.n_slots += 1;
        self.consts.push((slot, tensor));
        Ok(slot)
    }

    /// A folded constant's value, if the value is one.
    pub(crate) fn konst(&self, outlet: OutletId) -> Option<Arc<Tensor>> {
        self.fact(outlet).ok().and_then(|f| f.konst.clone())
    }

    /// The single value of a constant with one element, as f32.
    pub(crate) fn scalar(&self, outlet: OutletId) -> Option<f32> {
        let k = self.konst(outlet)?;
        if k.len() != 1 {
            return None;
        }
        k.cast_to_scalar::<f32>().ok()
    }
}
