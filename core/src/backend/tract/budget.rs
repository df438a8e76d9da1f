//! The memory budget: how many bytes a run's values hold at once, known before it runs.
//!
//! A hostile model (or input) can ask tract for a tensor of terabytes: a `Transpose` of a
//! shape that does not exist, an `Expand` to a huge shape. tract's allocator then panics
//! at best and aborts the process at worst (an aborting allocation cannot be caught), and
//! an overcommitting OS lets a merely too-large one through until the OOM killer ends the
//! app. So before a plan runs, tern evaluates the size of every value the plan computes —
//! for the run's input shapes, in plan order, freeing each value after its last reader as
//! tract does — and refuses with [`Error::ResourceLimit`] when the peak would exceed the
//! session's limit ([`LimitOptions::memory_bytes`](crate::options::LimitOptions)). Weights
//! are not counted (they are loaded already); sizes known only once the run computes them
//! (data-dependent shapes) cannot be bounded here and are not counted.

use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::kinds::Resource;

/// One value a plan computes: its producer's name and its size as an expression.
#[derive(Debug, Clone)]
struct Value {
    node: usize,
    elements: TDim,
    width: u64,
}

/// The values of one plan, in plan order, with the step after which each is freed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Footprint {
    names: Vec<String>,
    values: Vec<Value>,
    /// Per step, the values (indices into `values`) produced there.
    produced: Vec<Vec<usize>>,
    /// Per step, the values whose last reader it is.
    freed: Vec<Vec<usize>>,
}

impl Footprint {
    /// The footprint of a runnable plan.
    pub(crate) fn of(plan: &TypedSimplePlan) -> Footprint {
        let model = plan.model();
        let order = plan.order_without_consts();
        let step_of: std::collections::HashMap<usize, usize> =
            order.iter().enumerate().map(|(s, n)| (*n, s)).collect();
        let outputs: std::collections::HashSet<OutletId> = model
            .output_outlets()
            .map(|o| o.iter().copied().collect())
            .unwrap_or_default();
        let mut fp = Footprint {
            produced: vec![Vec::new(); order.len()],
            freed: vec![Vec::new(); order.len()],
            ..Default::default()
        };
        for (step, &id) in order.iter().enumerate() {
            let node = model.node(id);
            fp.names.push(node.name.clone());
            for (slot, out) in node.outputs.iter().enumerate() {
                let fact = &out.fact;
                let ix = fp.values.len();
                fp.values.push(Value {
                    node: step,
                    elements: fact.shape.iter().product(),
                    width: fact.datum_type.size_of() as u64,
                });
                fp.produced[step].push(ix);
                // Freed after its last reader in plan order; a model output lives to the end.
                let last = out
                    .successors
                    .iter()
                    .filter_map(|s| step_of.get(&s.node).copied())
                    .max()
                    .unwrap_or(step);
                if !outputs.contains(&OutletId::new(id, slot)) {
                    fp.freed[last].push(ix);
                }
            }
        }
        fp
    }

    /// The peak bytes of values alive at once for these symbol values, and the largest
    /// value (its node and bytes). Sizes not known from `symbols` count as 0.
    fn peak(&self, symbols: &SymbolValues) -> (u64, Option<(usize, u64)>) {
        let bytes: Vec<u64> = self
            .values
            .iter()
            .map(|v| {
                v.elements
                    .eval(symbols)
                    .to_i64()
                    .ok()
                    .and_then(|n| u64::try_from(n).ok())
                    .map_or(0, |n| n.saturating_mul(v.width))
            })
            .collect();
        let (mut live, mut peak) = (0u64, 0u64);
        for (produced, freed) in self.produced.iter().zip(&self.freed) {
            live = produced
                .iter()
                .fold(live, |l, ix| l.saturating_add(bytes[*ix]));
            peak = peak.max(live);
            live = freed
                .iter()
                .fold(live, |l, ix| l.saturating_sub(bytes[*ix]));
        }
        let largest = bytes
            .iter()
            .enumerate()
            .max_by_key(|(_, b)| **b)
            .map(|(ix, b)| (self.values[ix].node, *b));
        (peak, largest)
    }

    /// Fails with [`Error::ResourceLimit`] when a run with these symbol values would hold
    /// more than `limit` bytes at once.
    pub(crate) fn check(&self, symbols: &SymbolValues, limit: u64) -> Result<()> {
        let (peak, largest) = self.peak(symbols);
        if peak <= limit {
            return Ok(());
        }
        let context = match largest {
            Some((step, bytes)) => format!(
                "the largest value, {} bytes, is computed by node {:?}",
                bytes, self.names[step]
            ),
            None => String::new(),
        };
        Err(Error::ResourceLimit {
            resource: Resource::MemoryBytes,
            needed: peak,
            limit,
            context,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::math;

    /// x → relu-ish chain of 3 element-wise ops on [n, 1000] f32: at most two values of
    /// 4000·n bytes are alive at once (an op's input and output).
    #[test]
    fn the_peak_counts_what_is_alive_at_once() {
        let mut model = TypedModel::default();
        let n = model.symbols.sym("n");
        let x = model
            .add_source("x", f32::fact([n.clone().into(), 1000.to_dim()]))
            .unwrap();
        let mut wire = x;
        for i in 0..3 {
            wire = model
                .wire_node(format!("abs{i}"), math::abs(), &[wire])
                .unwrap()[0];
        }
        model.select_output_outlets(&[wire]).unwrap();
        let plan = model.into_runnable().unwrap();
        let fp = Footprint::of(&plan);
        let mut symbols = SymbolValues::default();
        symbols.set(&n, 10);
        let (peak, largest) = fp.peak(&symbols);
        assert_eq!(peak, 2 * 4000 * 10);
        assert_eq!(largest.map(|(_, b)| b), Some(4000 * 10));
        assert!(fp.check(&symbols, 80_000).is_ok());
        let err = fp.check(&symbols, 79_999).unwrap_err();
        assert!(
            matches!(err, Error::ResourceLimit { needed: 80_000, .. }),
            "{err}"
        );
    }
}
