//! Which graph inputs a model reads as *values* that decide its plan: a `Reshape`'s shape,
//! a `Slice`'s starts, a `Resize`'s sizes, a `Reduce`'s axes, a `Pad`'s pads, the scales of
//! `QuantizeLinear`, the parameters of a `BatchNormalization`…
//!
//! tract plans these operands only when they are constants. onnxruntime takes them as
//! ordinary inputs, and exporters and the ONNX test suite often leave them as graph
//! inputs; such a model does not plan at all, symbolically or per shape. Knowing which
//! inputs they are lets the CPU backend fold their values into a plan of their own (keyed
//! by those values, see `backend::tract`) instead of refusing the model.
//!
//! An input counts when it reaches one of these operands directly or through shape
//! arithmetic (`Cast`, `Concat`, `Unsqueeze`, `Gather`, integer `Add`/`Mul`…): a graph
//! that computes a shape from a small input still needs that input's value.

use std::collections::BTreeSet;

use crate::onnx::{is_default_domain, pb};

/// The operand positions of a default-domain op that tract needs as constants.
fn value_slots(op_type: &str) -> &'static [usize] {
    match op_type {
        "Reshape" | "Expand" | "Tile" | "Unsqueeze" | "Squeeze" | "Split" | "CumSum" | "TopK"
        | "Upsample" | "Trilu" | "Compress" | "CenterCropPad" | "ReduceSum" | "ReduceMean"
        | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1" | "ReduceL2" | "ReduceLogSum"
        | "ReduceLogSumExp" | "ReduceSumSquare" => &[1],
        "ConstantOfShape" | "BlackmanWindow" | "HannWindow" | "HammingWindow" => &[0],
        "Slice" => &[1, 2, 3, 4],
        "Resize" | "Pad" => &[1, 2, 3],
        "QuantizeLinear" | "DequantizeLinear" | "Clip" | "DFT" | "Col2Im" => &[1, 2],
        "OneHot" => &[1, 2],
        "STFT" => &[1, 2, 3],
        "Range" => &[0, 1, 2],
        "BatchNormalization" => &[1, 2, 3, 4],
        "MelWeightMatrix" => &[0, 1, 2, 3, 4],
        "NonMaxSuppression" => &[2, 3, 4],
        "ConvInteger" | "MatMulInteger" => &[2, 3],
        "LSTM" | "GRU" | "RNN" => &[4],
        "QLinearConv" | "QLinearMatMul" => &[1, 2, 4, 5, 6, 7],
        _ => &[],
    }
}

/// Ops through which a value operand is traced back to the inputs it is computed from.
fn is_shape_arithmetic(op_type: &str) -> bool {
    matches!(
        op_type,
        "Cast"
            | "Concat"
            | "Unsqueeze"
            | "Squeeze"
            | "Reshape"
            | "Flatten"
            | "Gather"
            | "Identity"
            | "Slice"
            | "Add"
            | "Sub"
            | "Mul"
            | "Div"
            | "Neg"
            | "Abs"
            | "Min"
            | "Max"
            | "Floor"
            | "Ceil"
            | "Round"
            | "ReduceProd"
    )
}

/// The graph inputs (not initializers) of `graph` whose values some operator needs to plan,
/// in graph input order. Subgraphs are not searched: their operands are theirs to plan.
pub(crate) fn value_inputs(graph: &pb::GraphProto) -> Vec<String> {
    let initializers: BTreeSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: BTreeSet<&str> = graph
        .input
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| !initializers.contains(n))
        .collect();
    if inputs.is_empty() {
        return Vec::new();
    }
    let producers = crate::onnx::producer_nodes(graph);
    let mut pending: Vec<&str> = graph
        .node
        .iter()
        .filter(|n| is_default_domain(&n.domain))
        .flat_map(|n| {
            value_slots(&n.op_type)
                .iter()
                .filter_map(|&slot| n.input.get(slot))
                .map(String::as_str)
        })
        .filter(|name| !name.is_empty())
        .collect();
    let mut seen = BTreeSet::new();
    let mut found = BTreeSet::new();
    while let Some(value) = pending.pop() {
        if !seen.insert(value) {
            continue;
        }
        if inputs.contains(value) {
            found.insert(value);
        } else if let Some(node) = producers.get(value) {
            if is_default_domain(&node.domain) && is_shape_arithmetic(&node.op_type) {
                pending.extend(
                    node.input
                        .iter()
                        .map(String::as_str)
                        .filter(|n| !n.is_empty()),
                );
            }
        }
    }
    graph
        .input
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| found.contains(n))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
        crate::onnx::node(op, outputs[0], inputs, outputs, vec![])
    }

    fn input(name: &str) -> pb::ValueInfoProto {
        pb::ValueInfoProto {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn inputs_feeding_value_operands_are_found_directly_and_through_shape_arithmetic() {
        let graph = pb::GraphProto {
            input: ["x", "shape", "axes", "scale", "w"].map(input).to_vec(),
            initializer: vec![pb::TensorProto {
                name: "w".into(),
                ..Default::default()
            }],
            node: vec![
                // `shape` is cast and concatenated before the Reshape reads it.
                node("Cast", &["shape"], &["shape64"]),
                node("Shape", &["x"], &["xs"]),
                node("Concat", &["shape64", "xs"], &["target"]),
                node("Reshape", &["x", "target"], &["r"]),
                node("ReduceSum", &["r", "axes"], &["s"]),
                node("Mul", &["s", "scale"], &["y"]),
                // An initializer in a value operand is a constant already.
                node("Unsqueeze", &["y", "w"], &["z"]),
            ],
            ..Default::default()
        };
        // `x` reaches the Reshape's shape only through `Shape`, which reads its shape, not
        // its values; `scale` feeds ordinary arithmetic.
        assert_eq!(value_inputs(&graph), ["shape", "axes"]);
    }

    #[test]
    fn graphs_without_value_operands_have_none() {
        let graph = pb::GraphProto {
            input: ["x", "y"].map(input).to_vec(),
            node: vec![
                node("Add", &["x", "y"], &["z"]),
                node("Relu", &["z"], &["r"]),
            ],
            ..Default::default()
        };
        assert!(value_inputs(&graph).is_empty());
    }
}
