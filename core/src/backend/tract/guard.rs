//! Size guards for values whose size only the run knows.
//!
//! The memory budget ([`super::budget`]) bounds every value whose size follows from the
//! input shapes. Some sizes follow from input *values*: a `Range` from its bounds, a
//! `TopK` from `k`, a broadcast to a shape computed from data. tract allocates those as it
//! runs them — an allocator panic for a terabyte, and for a few gigabytes an allocation
//! an overcommitting OS grants and then kills the app for filling. So after optimisation,
//! each node whose output size mentions a symbol the inputs do not define is wrapped in a
//! [`SizeGuard`]: just before the node runs, the guard asks the op for its output facts
//! given the actual inputs (as constants) and the run's symbol values, and refuses with
//! [`Error::ResourceLimit`] when an output would exceed the session's memory limit.

use std::collections::HashSet;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::plan::EvalContext;

use crate::error::Error;
use crate::kinds::Resource;

/// Inputs up to this many elements are shown to the op as constants when the guard asks
/// for its output facts (the bounds of a `Range`, the `k` of a `TopK`, a shape).
const KONST_ELEMENTS: usize = 64;

/// Wraps the nodes of `model` whose output sizes are known only from values computed by
/// the run; returns how many.
pub(crate) fn wrap_dynamic_sizes(model: &mut TypedModel, limit: u64) -> TractResult<usize> {
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
        // Ops that keep state between turns are left alone (their state is per node).
        if !dynamic || node.op.state(&context)?.is_some() || node.op_is::<SizeGuard>() {
            continue;
        }
        let guard = SizeGuard {
            inner: node.op.clone(),
            limit,
        };
        model.node_mut(id).op = Box::new(guard);
        wrapped += 1;
    }
    Ok(wrapped)
}

/// An op whose output sizes are checked against the memory limit before it runs.
#[derive(Debug, Clone)]
pub(crate) struct SizeGuard {
    inner: Box<dyn TypedOp>,
    limit: u64,
}

impl PartialEq for SizeGuard {
    fn eq(&self, other: &Self) -> bool {
        self.limit == other.limit && self.inner.as_op() == other.inner.as_op()
    }
}

impl Eq for SizeGuard {}

impl SizeGuard {
    /// Fails when an output of the op on `inputs` would exceed the limit.
    fn check(&self, ctx: &EvalContext, inputs: &TVec<TValue>) -> TractResult<()> {
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
            if bytes > self.limit {
                return Err(Error::ResourceLimit {
                    resource: Resource::MemoryBytes,
                    needed: bytes,
                    limit: self.limit,
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

impl Op for SizeGuard {
    fn name(&self) -> StaticName {
        format!("TernSizeGuard({})", self.inner.name()).into()
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

impl EvalOp for SizeGuard {
    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.check(ctx, &inputs)?;
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

impl TypedOp for SizeGuard {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.inner.output_facts(inputs)
    }

    as_op!();
}
