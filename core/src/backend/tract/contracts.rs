//! Shape contracts: the equalities between dimensions that tract's kernels assume and do
//! not check.
//!
//! A plan built for symbolic input shapes types each value with expressions over the input
//! symbols. Where an ONNX op relates two inputs' dimensions — the contracted axis of a
//! `MatMul`, `[n, k] × [m, p]` — tract's typing may keep two unrelated symbols (`k`, `m`)
//! and its matrix kernel then trusts that they are equal: run with `k = 1`, `m = 1000` it
//! reads out of bounds. onnxruntime says "MatMul dimension mismatch". So tern collects,
//! when it builds a plan, every pair of dimension expressions an unchecked kernel needs
//! equal, and before each run evaluates them for the run's input shapes: a mismatch is a
//! typed [`Error::ShapeConflict`] naming the node, and no kernel runs.
//!
//! The contracts are read from the decluttered graph (before `optimize` turns einsums
//! into packed matrix products), whose symbols the optimized plan shares.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// One equality a kernel relies on.
#[derive(Debug, Clone)]
struct Contract {
    /// The node whose kernel relies on it.
    node: String,
    /// The input whose shape is named in the error.
    input: usize,
    /// Axis name in the einsum expression, for the error.
    axis: char,
    a: TDim,
    b: TDim,
    /// `b` may also be 1 (a broadcast axis, present in the output).
    broadcast: bool,
}

/// The contracts of one plan, and how to resolve its symbols from input shapes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Contracts {
    /// The model's input shapes as expressions.
    inputs: Vec<TVec<TDim>>,
    contracts: Vec<Contract>,
}

impl Contracts {
    /// The contracts of a decluttered typed model that a run cannot be trusted to keep:
    /// only pairs not already equal as expressions (a concrete plan has none left, or
    /// fails here, at build time, with the same error a run would give).
    pub(crate) fn of(model: &TypedModel) -> Result<Contracts> {
        let inputs = model
            .input_outlets()
            .map_err(|e| compile(&e))?
            .iter()
            .map(|o| {
                Ok(model
                    .outlet_fact(*o)
                    .map_err(|e| compile(&e))?
                    .shape
                    .to_tvec())
            })
            .collect::<Result<Vec<_>>>()?;
        let mut contracts = Vec::new();
        for node in model.nodes() {
            let Some(einsum) = node.op_as::<EinSum>() else {
                continue;
            };
            let facts = model.node_input_facts(node.id).map_err(|e| compile(&e))?;
            for axis in einsum.axes.iter_all_axes() {
                // Every position of this axis in the data inputs (quantization parameters
                // of a quantized einsum are scalars and carry no axis).
                let mut dims = axis
                    .inputs
                    .iter()
                    .enumerate()
                    .flat_map(|(input, positions)| {
                        let fact = facts.get(input);
                        positions
                            .iter()
                            .filter_map(move |p| Some((input, fact?.shape.get(*p)?.clone())))
                    });
                let Some((_, first)) = dims.next() else {
                    continue;
                };
                let broadcast = !axis.outputs.iter().all(|o| o.is_empty());
                for (input, dim) in dims {
                    if dim != first {
                        contracts.push(Contract {
                            node: node.name.clone(),
                            input,
                            axis: axis.repr,
                            a: first.clone(),
                            b: dim,
                            broadcast,
                        });
                    }
                }
            }
        }
        let contracts = Contracts { inputs, contracts };
        // With every dimension known at build time, a broken contract is broken for good.
        contracts.check_values(&SymbolValues::default())?;
        Ok(contracts)
    }

    /// The values of the input symbols for one run's inputs (in model order): each input
    /// dimension declared as a bare symbol takes the size given.
    pub(crate) fn symbols(&self, inputs: &[Tensor]) -> SymbolValues {
        let mut values = SymbolValues::default();
        for (dims, tensor) in self.inputs.iter().zip(inputs) {
            for (dim, &size) in dims.iter().zip(tensor.shape()) {
                if let TDim::Sym(symbol) = dim {
                    values.set(symbol, size as i64);
                }
            }
        }
        values
    }

    /// Checks the contracts for one run's symbol values ([`Contracts::symbols`]).
    pub(crate) fn check_values(&self, values: &SymbolValues) -> Result<()> {
        for c in &self.contracts {
            let (Ok(a), Ok(b)) = (c.a.eval(values).to_i64(), c.b.eval(values).to_i64()) else {
                continue; // not known before the run (a data-dependent size)
            };
            if a != b && !(c.broadcast && (a == 1 || b == 1)) {
                return Err(Error::ShapeConflict {
                    node: c.node.clone(),
                    reason: format!(
                        "axis {:?} is {a} in the first operand and {b} in operand {}",
                        c.axis, c.input
                    ),
                });
            }
        }
        Ok(())
    }
}

fn compile(e: &anyhow::Error) -> Error {
    Error::Compile {
        backend: crate::Backend::Cpu,
        reason: crate::error::chain(e),
    }
}
