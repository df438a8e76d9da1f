//! Run-time guards: checks made just before a node runs, on the values it is given, for
//! what tract's kernels would otherwise meet with a panic or an allocation the process
//! cannot survive.
//!
//! **Sizes only the run knows.**
//! The memory budget ([`super::budget`]) bounds every value whose size follows from the
//! input shapes. Some sizes follow from input *values*: a `Range` from its bounds, a
//! `TopK` from `k`, a broadcast to a shape computed from data. tract allocates those as it
//! runs them — an allocator panic for a terabyte, and for a few gigabytes an allocation
//! an overcommitting OS grants and then kills the app for filling. So after optimisation,
//! each node whose output size mentions a symbol the inputs do not define is wrapped in a
//! [`Guard`]: just before the node runs, the guard asks the op for its output facts
//! given the actual inputs (as constants) and the run's symbol values, and refuses with
//! [`Error::ResourceLimit`] when an output would exceed the session's memory limit.
//!
//! **Values an op cannot take.** Indices past the end of the axis they index (`Gather`,
//! `GatherElements`, `ScatterElements`), integer division or remainder by zero, a `Range`
//! with a zero or non-finite step or bound and a `TopK` asking for more than the axis holds
//! are refused with [`Error::InvalidValue`] naming the node, where tract panicked.
//!
//! **Outputs with no elements.** In a symbolic plan an output's size is an expression of
//! the input sizes, and a small input can make it zero: a 2×2 max pool (stride 2, no
//! padding) of a one-row plane has no rows (where tract's concrete plans, like
//! onnxruntime, make one window). Several of tract's kernels divide by a row length and
//! panic on such an output. A node with a symbolic output size is wrapped. When the run's
//! sizes give it only empty outputs because an input size is 0 (an empty batch), it is not
//! run: its outputs are the empty tensors of their shapes, which is all an op can produce
//! there. A 0 computed from the sizes (a window's rounding) and output sizes below zero
//! are refused with [`Error::InvalidValue`], and the backend retries the run on a
//! concrete plan.

use std::collections::HashSet;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::plan::EvalContext;

use crate::error::Error;
use crate::kinds::Resource;

/// Inputs up to this many elements are shown to the op as constants when the guard asks
/// for its output facts (the bounds of a `Range`, the `k` of a `TopK`, a shape).
const KONST_ELEMENTS: usize = 64;

/// A check on the values one op is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueCheck {
    /// Input 1 holds indices into `axis` of input 0: each in `[-d, d)`.
    Indices { axis: usize },
    /// Input 1 is an integer divisor: no element may be 0.
    NonZeroDivisor,
    /// A `Range`'s bounds (inputs 0, 1) and step (input 2) are finite, the step not 0.
    RangeBounds,
    /// A `TopK`'s `k` (input 1) is within `0..=d` for axis `axis` of input 0.
    TopK { axis: usize },
}

impl ValueCheck {
    /// The check `op` needs, if any (`inputs`: its input facts).
    fn of(op: &dyn TypedOp, inputs: &[&TypedFact]) -> Option<ValueCheck> {
        use tract_onnx::tract_core::ops::array::{
            Gather, GatherElements, Range, ScatterElements, Topk,
        };
        use tract_onnx::tract_core::ops::binary::TypedBinOp;
        use tract_onnx::tract_core::ops::math;
        // Constant indices within a fixed axis need no check at every run.
        let indices = |axis: usize| {
            let size = inputs.first()?.shape.get(axis)?.to_i64().ok();
            let fixed = inputs
                .get(1)?
                .konst
                .as_ref()
                .zip(size)
                .is_some_and(|(k, size)| {
                    k.cast_to::<i64>().ok().is_some_and(|k| {
                        k.to_plain_array_view::<i64>()
                            .is_ok_and(|v| v.iter().all(|i| (-size..size).contains(i)))
                    })
                });
            (!fixed).then_some(ValueCheck::Indices { axis })
        };
        if let Some(g) = op.downcast_ref::<Gather>() {
            return indices(g.axis);
        }
        if let Some(g) = op.downcast_ref::<GatherElements>() {
            return indices(g.axis);
        }
        if let Some(g) = op.downcast_ref::<ScatterElements>() {
            return indices(g.axis);
        }
        if op.is::<Range>() {
            return Some(ValueCheck::RangeBounds);
        }
        if let Some(topk) = op.downcast_ref::<Topk>() {
            return Some(ValueCheck::TopK { axis: topk.axis });
        }
        let bin = op.downcast_ref::<TypedBinOp>()?;
        let integer = inputs.get(1).is_some_and(|f| f.datum_type.is_integer());
        let divides = bin.0.is::<math::Div>() || bin.0.is::<math::Rem>();
        // A constant divisor without zeros needs no check at every run.
        let safe = inputs
            .get(1)
            .and_then(|f| f.konst.as_ref())
            .is_some_and(|k| {
                k.cast_to::<i64>()
                    .ok()
                    .and_then(|k| {
                        k.to_plain_array_view::<i64>()
                            .ok()
                            .map(|v| v.iter().all(|x| *x != 0))
                    })
                    .unwrap_or(false)
            });
        (integer && divides && !safe).then_some(ValueCheck::NonZeroDivisor)
    }

    fn check(self, node: &str, inputs: &TVec<TValue>) -> Result<(), Error> {
        let invalid = |reason: String| Error::InvalidValue {
            node: node.to_string(),
            reason,
        };
        if self == ValueCheck::RangeBounds {
            for (ix, what) in [(0, "start"), (1, "limit"), (2, "delta")] {
                let Some(v) = inputs.get(ix) else { continue };
                let v = v
                    .cast_to_scalar::<f64>()
                    .map_err(|e| invalid(format!("{what}: {e:#}")))?;
                if !v.is_finite() || (ix == 2 && v == 0.0) {
                    return Err(invalid(format!("Range {what} is {v}")));
                }
            }
            return Ok(());
        }
        let Some(values) = inputs.get(1) else {
            return Ok(());
        };
        let values = values
            .cast_to::<i64>()
            .map_err(|e| invalid(format!("{e:#}")))?;
        let values = values
            .to_plain_array_view::<i64>()
            .map_err(|e| invalid(format!("{e:#}")))?;
        match self {
            ValueCheck::Indices { axis } => {
                let Some(&size) = inputs.first().and_then(|d| d.shape().get(axis)) else {
                    return Err(invalid(format!("no axis {axis} to index")));
                };
                let size = size as i64;
                if let Some(bad) = values.iter().find(|i| **i < -size || **i >= size) {
                    return Err(invalid(format!(
                        "index {bad} is out of range for axis {axis} of size {size}"
                    )));
                }
            }
            ValueCheck::NonZeroDivisor => {
                if values.iter().any(|v| *v == 0) {
                    return Err(invalid("integer division by zero".into()));
                }
            }
            ValueCheck::TopK { axis } => {
                let size = inputs
                    .first()
                    .and_then(|d| d.shape().get(axis))
                    .map_or(0, |d| *d as i64);
                if let Some(bad) = values.iter().find(|k| **k < 0 || **k > size) {
                    return Err(invalid(format!(
                        "TopK k = {bad} is not within 0..={size} (axis {axis})"
                    )));
                }
            }
            ValueCheck::RangeBounds => {}
        }
        Ok(())
    }
}

/// Wraps the nodes of `model` that need a run-time check — output sizes known only from
/// values the run computes, indices, integer divisors — in a [`Guard`]; returns how many.
pub(crate) fn wrap(model: &mut TypedModel, limit: u64) -> TractResult<usize> {
    let mut input_symbols: HashSet<Symbol> = HashSet::new();
    for outlet in model.input_outlets()?.to_vec() {
        for dim in model.outlet_fact(outlet)?.shape.iter() {
            input_symbols.extend(dim.symbols());
        }
    }
    let context = EvalContext::out_of_plan();
    let mut wrapped = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let dynamic = node.outputs.iter().any(|o| {
            o.fact
                .shape
                .iter()
                .any(|d| d.symbols().iter().any(|s| !input_symbols.contains(s)))
        });
        let values = ValueCheck::of(node.op.as_ref(), &model.node_input_facts(id)?);
        let symbolic = node
            .outputs
            .iter()
            .any(|o| o.fact.shape.iter().any(|d| d.to_i64().is_err()));
        let outputs = symbolic.then(|| {
            node.outputs
                .iter()
                .map(|o| (o.fact.datum_type, o.fact.shape.to_tvec()))
                .collect()
        });
        // Ops that keep state between turns are left alone (their state is per node).
        if !(dynamic || symbolic || values.is_some())
            || node.op.state(&context)?.is_some()
            || node.op_is::<Guard>()
        {
            continue;
        }
        let guard = Guard {
            inner: node.op.clone(),
            node: node.name.clone(),
            size_limit: dynamic.then_some(limit),
            values,
            outputs,
        };
        model.node_mut(id).op = Box::new(guard);
        wrapped += 1;
    }
    Ok(wrapped)
}

/// An op whose inputs are checked before it runs.
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    inner: Box<dyn TypedOp>,
    /// The node's name, for errors.
    node: String,
    /// Checks the op's output sizes against this many bytes.
    size_limit: Option<u64>,
    /// Checks the values of its inputs.
    values: Option<ValueCheck>,
    /// The type and declared shape of each output, where a shape is symbolic: an output
    /// with no elements at the run's sizes is made here, without running the op.
    outputs: Option<TVec<(DatumType, TVec<TDim>)>>,
}

impl PartialEq for Guard {
    fn eq(&self, other: &Self) -> bool {
        self.size_limit == other.size_limit
            && self.values == other.values
            && self.outputs == other.outputs
            && self.inner.as_op() == other.inner.as_op()
    }
}

impl Eq for Guard {}

impl Guard {
    /// Fails when the op's inputs break its value check, or an output of the op on
    /// `inputs` would exceed the size limit.
    fn check(&self, ctx: &EvalContext, inputs: &TVec<TValue>) -> TractResult<()> {
        if let Some(values) = self.values {
            values.check(&self.node, inputs)?;
        }
        let Some(limit) = self.size_limit else {
            return Ok(());
        };
        let facts: TVec<TypedFact> = inputs
            .iter()
            .map(|t| {
                if t.len() <= KONST_ELEMENTS {
                    TypedFact::try_from(t.clone().into_arc_tensor())
                } else {
                    Ok(TypedFact::shape_and_dt_of(t))
                }
            })
            .collect::<TractResult<_>>()?;
        let refs: TVec<&TypedFact> = facts.iter().collect();
        for fact in self.inner.output_facts(&refs)? {
            let mut bytes = fact.datum_type.size_of() as u64;
            for dim in fact.shape.iter() {
                let Ok(n) = dim.eval(ctx.symbols).to_i64() else {
                    bytes = 0; // still unknown: left to the op
                    break;
                };
                bytes = bytes.saturating_mul(u64::try_from(n).unwrap_or(0));
            }
            if bytes > limit {
                return Err(Error::ResourceLimit {
                    resource: Resource::MemoryBytes,
                    needed: bytes,
                    limit,
                    context: format!(
                        "an output of {} computed from the run's values",
                        self.inner.name()
                    ),
                }
                .into());
            }
        }
        Ok(())
    }
}

impl Guard {
    /// The op's outputs when, at the run's sizes, none of them has elements because a
    /// size the inputs give is 0 (an empty batch): made without running the op. `None`
    /// when the op must run. An output size below zero, or a 0 computed from the input
    /// sizes (a window larger than its padded input: the symbolic size rounds down to 0
    /// where tract's concrete plan and onnxruntime make one window), is an error, which
    /// a symbolic plan's caller retries on a concrete plan.
    fn empty_outputs(
        &self,
        ctx: &EvalContext,
        inputs: &TVec<TValue>,
    ) -> TractResult<Option<TVec<TValue>>> {
        let Some(outputs) = &self.outputs else {
            return Ok(None);
        };
        let invalid = |reason: String| Error::InvalidValue {
            node: self.node.clone(),
            reason,
        };
        let mut shapes: TVec<TVec<usize>> = tvec![];
        // Whether each 0 came from a size the inputs give rather than one computed from
        // them.
        let mut given = true;
        for (_, shape) in outputs {
            let mut dims = tvec![];
            for dim in shape {
                let Ok(n) = dim.eval(ctx.symbols).to_i64() else {
                    return Ok(None); // not known before the op runs
                };
                let n = usize::try_from(n).map_err(|_| {
                    invalid(format!(
                        "{} would make an output of size {n} (from {dim}) at these input sizes",
                        self.inner.name()
                    ))
                })?;
                given &= n != 0 || zero_given(dim, ctx.symbols);
                dims.push(n);
            }
            shapes.push(dims);
        }
        // An output with elements needs the op: only outputs all empty are made here.
        if shapes.is_empty() || !shapes.iter().all(|s| s.contains(&0)) {
            return Ok(None);
        }
        if !given {
            return Err(invalid(format!(
                "{} makes an empty output {:?} from inputs {:?}: a window larger than its \
                 input, or a size computed down to 0",
                self.inner.name(),
                shapes[0],
                inputs
                    .iter()
                    .map(|i| i.shape().to_vec())
                    .collect::<Vec<_>>()
            ))
            .into());
        }
        outputs
            .iter()
            .zip(shapes)
            .map(|((dt, _), shape)| Ok(Tensor::zero_dt(*dt, &shape)?.into_tvalue()))
            .collect::<TractResult<_>>()
            .map(Some)
    }
}

/// Whether `dim`, 0 at `symbols`, is 0 because a size the inputs give is: a symbol, or a
/// factor of a product or a dividend that is; not a 0 computed with sums or bounds (a
/// window's rounding).
fn zero_given(dim: &TDim, symbols: &SymbolValues) -> bool {
    let zero = |d: &TDim| d.eval(symbols).to_i64().is_ok_and(|n| n == 0);
    match dim {
        TDim::Sym(_) => zero(dim),
        TDim::Mul(terms) => terms.iter().any(|t| zero(t) && zero_given(t, symbols)),
        TDim::MulInt(_, d) | TDim::Div(d, _) => zero(d) && zero_given(d, symbols),
        _ => false,
    }
}

impl Op for Guard {
    fn name(&self) -> StaticName {
        format!("TernGuard({})", self.inner.name()).into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        self.inner.info()
    }

    fn mints_runtime_symbols(&self) -> bool {
        self.inner.mints_runtime_symbols()
    }

    fn required_bound_symbols(&self, inputs: &[&TypedFact]) -> TVec<Symbol> {
        self.inner.required_bound_symbols(inputs)
    }

    op_as_typed_op!();
}

impl EvalOp for Guard {
    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.check(ctx, &inputs)?;
        if let Some(empty) = self.empty_outputs(ctx, &inputs)? {
            return Ok(empty);
        }
        self.inner.eval(ctx, inputs)
    }

    fn forwards_input(&self) -> Option<usize> {
        self.inner.forwards_input()
    }

    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        self.inner.eval_out_of_plan(inputs)
    }

    fn drop_session(&self, session: SessionId, node_id: usize) {
        self.inner.drop_session(session, node_id)
    }
}

impl TypedOp for Guard {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.inner.output_facts(inputs)
    }

    as_op!();
}
