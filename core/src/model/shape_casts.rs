//! Shape arithmetic that detours through int32, kept in int64 so tract can carry it
//! symbolically.
//!
//! tract holds the values of `Shape` (and what is computed from them) as dimensions that
//! may be symbols, and its `Cast` to int64 keeps them so; a `Cast` to int32 needs numbers.
//! paddle2onnx writes `Shape → Cast(int32) → Slice → Cast(int64)`, so a model it exported
//! could not be planned with a symbolic width: ppocr_rec's `Reshape` then read a "variable"
//! shape, and every new width of a text line paid a compilation. Such a `Cast` is retyped
//! to int64 when its value only flows — through ops that take any integer type (`Slice`,
//! `Gather`, `Squeeze`, `Unsqueeze`, `Reshape`, `Flatten`, `Identity`, as their data input) —
//! into other `Cast`s, whose outputs have the type they name whatever their input: nothing
//! downstream sees the change, and the values are the same (shapes fit in int32).
//!
//! Only a partly symbolic plan is built from the widened graph ([`widen`]). The plans of
//! the graph as written do without: a fully symbolic one plans (or fails) the same, and
//! carrying the shape arithmetic symbolically there cost tract's declutter most of a second
//! of symbolic algebra on ppocr_cls (prepare 68 → 1257 ms), for nothing.

use std::collections::HashMap;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::cast::cast;

use crate::onnx::{attr_i, is_default_domain, pb};

const INT32: i64 = pb::tensor_proto::DataType::Int32 as i64;
#[cfg(test)]
const INT64: i64 = pb::tensor_proto::DataType::Int64 as i64;

/// How far a value is traced back to a `Shape`, or forward to a `Cast`.
const DEPTH: usize = 16;

/// The int32 casts of shape values in `proto`'s main graph that can be retyped to int64
/// (see the module docs), by the name of their output.
pub(crate) fn shape_casts(proto: &pb::ModelProto) -> Vec<String> {
    let Some(graph) = proto.graph.as_ref() else {
        return Vec::new();
    };
    let producers = crate::onnx::producer_nodes(graph);
    let mut consumers: HashMap<&str, Vec<(&pb::NodeProto, usize)>> = HashMap::new();
    for n in &graph.node {
        for (slot, i) in n.input.iter().enumerate() {
            consumers.entry(i.as_str()).or_default().push((n, slot));
        }
    }
    for o in &graph.output {
        // A graph output is a dead end for the forward check.
        consumers.entry(o.name.as_str()).or_default();
    }
    let outputs: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let view = View {
        producers,
        consumers,
        outputs,
    };
    graph
        .node
        .iter()
        .filter(|n| is_cast_to(n, INT32))
        .filter(|n| view.computed_from_shape(&n.input[0], 0))
        .filter(|n| view.only_into_casts(&n.output[0], 0))
        .map(|n| n.output[0].clone())
        .collect()
}

/// `graph` with the casts writing `outputs` (from [`shape_casts`]) retyped to int64 (which
/// tract's ONNX front end carries as dimensions, as it does its own int64 casts); how many
/// it found.
pub(crate) fn widen(graph: &InferenceModel, outputs: &[String]) -> (InferenceModel, usize) {
    let mut widened = graph.clone();
    let mut found = 0;
    for id in 0..widened.nodes().len() {
        let outlet = OutletId::new(id, 0);
        let named = widened
            .outlet_label(outlet)
            .is_some_and(|label| outputs.iter().any(|o| o == label));
        if !named || widened.nodes()[id].outputs.len() != 1 {
            continue;
        }
        let node = widened.node_mut(id);
        node.op = Box::new(cast(TDim::datum_type()));
        node.outputs[0].fact = InferenceFact::default();
        found += 1;
    }
    (widened, found)
}

fn is_cast_to(n: &pb::NodeProto, to: i64) -> bool {
    n.op_type == "Cast" && is_default_domain(&n.domain) && attr_i(n, "to", 0) == to
}

/// Ops whose data input (slot 0) may be any integer type, passed through.
fn passes_through(n: &pb::NodeProto) -> bool {
    is_default_domain(&n.domain)
        && matches!(
            n.op_type.as_str(),
            "Slice" | "Gather" | "Squeeze" | "Unsqueeze" | "Reshape" | "Flatten" | "Identity"
        )
}

struct View<'g> {
    producers: HashMap<&'g str, &'g pb::NodeProto>,
    consumers: HashMap<&'g str, Vec<(&'g pb::NodeProto, usize)>>,
    outputs: Vec<&'g str>,
}

impl View<'_> {
    /// Whether `value` is computed from a `Shape` through pass-through ops and casts.
    fn computed_from_shape(&self, value: &str, depth: usize) -> bool {
        let Some(n) = self.producers.get(value) else {
            return false;
        };
        if depth > DEPTH || !is_default_domain(&n.domain) {
            return false;
        }
        match n.op_type.as_str() {
            "Shape" => true,
            "Cast" => self.computed_from_shape(&n.input[0], depth + 1),
            _ if passes_through(n) => self.computed_from_shape(&n.input[0], depth + 1),
            _ => false,
        }
    }

    /// Whether every path from `value` reaches a `Cast` through pass-through ops only.
    fn only_into_casts(&self, value: &str, depth: usize) -> bool {
        if depth > DEPTH || self.outputs.contains(&value) {
            return false;
        }
        let Some(consumers) = self.consumers.get(value) else {
            return false;
        };
        !consumers.is_empty()
            && consumers.iter().all(|(n, slot)| {
                (n.op_type == "Cast" && is_default_domain(&n.domain))
                    || (*slot == 0
                        && passes_through(n)
                        && n.output.len() == 1
                        && self.only_into_casts(&n.output[0], depth + 1))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{int_attr, node};

    fn cast(input: &str, output: &str, to: i64) -> pb::NodeProto {
        node(
            "Cast",
            output,
            &[input],
            &[output],
            vec![int_attr("to", to)],
        )
    }

    fn graph(nodes: Vec<pb::NodeProto>, outputs: &[&str]) -> pb::ModelProto {
        pb::ModelProto {
            graph: Some(pb::GraphProto {
                node: nodes,
                output: outputs
                    .iter()
                    .map(|o| pb::ValueInfoProto {
                        name: o.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_shape_sliced_in_int32_and_cast_back_is_kept_in_int64() {
        // paddle2onnx: Shape → Cast(int32) → Slice → Cast(int64) → Reshape's shape.
        let m = graph(
            vec![
                node("Shape", "s", &["x"], &["s"], vec![]),
                cast("s", "s32", INT32),
                node("Slice", "w", &["s32", "a", "b"], &["w"], vec![]),
                cast("w", "w64", INT64),
                node("Reshape", "y", &["x", "w64"], &["y"], vec![]),
            ],
            &["y"],
        );
        assert_eq!(shape_casts(&m), ["s32"]);
    }

    #[test]
    fn casts_whose_int32_reaches_arithmetic_or_an_output_or_not_from_a_shape_stay() {
        let m = graph(
            vec![
                node("Shape", "s", &["x"], &["s"], vec![]),
                // Feeds an Add with (say) an int32 constant: the type is seen.
                cast("s", "s32", INT32),
                node("Add", "sum", &["s32", "k"], &["sum"], vec![]),
                // A graph output.
                cast("s", "out32", INT32),
                // Not a shape.
                cast("x", "x32", INT32),
                cast("x32", "x64", INT64),
            ],
            &["sum", "out32", "x64"],
        );
        assert!(shape_casts(&m).is_empty());
    }
}
