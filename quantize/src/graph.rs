//! Reading, editing and writing ONNX graphs with tract-onnx's protobuf types.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use prost::Message;
use tract_onnx::pb;

use crate::error::{QuantizeError, Result};
pub use tern::onnx::{attr_i, f32_tensor, int_attr, node, tensor};

/// ONNX element type codes used here.
pub const FLOAT: i32 = 1;
/// uint8
pub const UINT8: i32 = 2;
/// int8
pub const INT8: i32 = 3;
/// int32
pub const INT32: i32 = 6;
/// int64
pub const INT64: i32 = 7;
/// float16
pub const FLOAT16: i32 = 10;

/// Nodes a transformation must leave alone, by node name or by op type.
#[derive(Debug, Clone, Default)]
pub struct Exclusions {
    /// Node names.
    pub nodes: HashSet<String>,
    /// Op types.
    pub ops: HashSet<String>,
}

impl Exclusions {
    /// Each of `names` excludes the node so named and every node of that op type (what the
    /// CLI's `--exclude NODE|OP` means).
    pub fn by_name_or_op(names: &[String]) -> Self {
        let set: HashSet<String> = names.iter().cloned().collect();
        Self {
            nodes: set.clone(),
            ops: set,
        }
    }

    /// Whether `n` may be transformed.
    pub fn allows(&self, n: &pb::NodeProto) -> bool {
        !self.nodes.contains(&n.name) && !self.ops.contains(&n.op_type)
    }
}

/// Reads a model file.
pub fn load(path: &Path) -> Result<pb::ModelProto> {
    let bytes = std::fs::read(path).map_err(|source| QuantizeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let model =
        tern::onnx::decode(&bytes).map_err(|e| QuantizeError::InvalidModel(e.to_string()))?;
    if model.graph.is_none() || model.ir_version <= 0 {
        return Err(QuantizeError::InvalidModel("no graph".into()));
    }
    Ok(model)
}

/// Writes a model file.
pub fn save(model: &pb::ModelProto, path: &Path) -> Result<()> {
    std::fs::write(path, model.encode_to_vec()).map_err(|source| QuantizeError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The graph (checked present by [`load`]).
pub fn graph_mut(model: &mut pb::ModelProto) -> &mut pb::GraphProto {
    model.graph.get_or_insert_with(Default::default)
}

/// Fails if the model already contains quantized ops.
pub fn ensure_not_quantized(model: &pb::ModelProto) -> Result<()> {
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| QuantizeError::InvalidModel("no graph".into()))?;
    // Same op list as tern's `ModelInfo::quantized`, keyed the same way (domain-prefixed).
    match graph
        .node
        .iter()
        .find(|n| tern::model::QUANTIZED_OPS.contains(&tern::onnx::op_key(n).as_str()))
    {
        Some(n) => Err(QuantizeError::AlreadyQuantized(n.op_type.clone())),
        None => Ok(()),
    }
}

/// Turns single-tensor `Constant` nodes into initializers (exporters such as paddle2onnx
/// keep weights in them; transformations look for initializers).
pub fn constants_to_initializers(graph: &mut pb::GraphProto) {
    let mut kept = Vec::with_capacity(graph.node.len());
    for node in std::mem::take(&mut graph.node) {
        let tensor = (node.op_type == "Constant"
            && node.attribute.len() == 1
            && node.attribute[0].name == "value")
            .then(|| node.attribute[0].t.clone())
            .flatten();
        match (tensor, node.output.first()) {
            (Some(mut t), Some(out)) => {
                t.name = out.clone();
                graph.initializer.push(t);
            }
            _ => kept.push(node),
        }
    }
    graph.node = kept;
}

/// The values of an initializer of ONNX type `data_type`, from its raw little-endian bytes
/// or its typed field.
fn values<T: Copy, const N: usize>(
    t: &pb::TensorProto,
    data_type: i32,
    from_le: fn([u8; N]) -> T,
    typed: &[T],
) -> Option<Vec<T>> {
    if t.data_type != data_type || t.data_location == Some(1) {
        return None;
    }
    if t.raw_data.is_empty() {
        return Some(typed.to_vec());
    }
    Some(
        t.raw_data
            .chunks_exact(N)
            .map(|c| from_le(c.try_into().unwrap_or([0; N])))
            .collect(),
    )
}

/// The f32 values of an initializer (raw or typed storage).
pub fn f32_values(t: &pb::TensorProto) -> Option<Vec<f32>> {
    values(t, FLOAT, f32::from_le_bytes, &t.float_data)
}

/// The values of an int64 initializer (raw or typed storage).
pub fn i64_values(t: &pb::TensorProto) -> Option<Vec<i64>> {
    values(t, INT64, i64::from_le_bytes, &t.int64_data)
}

/// Initializers by name.
pub fn initializers(graph: &pb::GraphProto) -> HashMap<String, pb::TensorProto> {
    graph
        .initializer
        .iter()
        .map(|t| (t.name.clone(), t.clone()))
        .collect()
}

/// How many nodes read each tensor name.
pub fn consumers(graph: &pb::GraphProto) -> HashMap<String, usize> {
    let mut c = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            *c.entry(i.clone()).or_default() += 1;
        }
    }
    for o in &graph.output {
        *c.entry(o.name.clone()).or_default() += 1;
    }
    c
}

/// Orders the nodes so each comes after the producers of its inputs (Kahn's algorithm,
/// taking the earliest ready node first, so an already sorted graph keeps its order and new
/// nodes appended at the end move up to where they are needed).
pub fn topological_sort(graph: &mut pb::GraphProto) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let producer = tern::onnx::producers(graph);
    let n = graph.node.len();
    let mut waiting = vec![0usize; n];
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in graph.node.iter().enumerate() {
        let deps: HashSet<usize> = node
            .input
            .iter()
            .filter_map(|x| producer.get(x.as_str()).copied())
            .filter(|p| *p != i)
            .collect();
        waiting[i] = deps.len();
        for d in deps {
            readers[d].push(i);
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> =
        (0..n).filter(|i| waiting[*i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &r in &readers[i] {
            waiting[r] -= 1;
            if waiting[r] == 0 {
                ready.push(Reverse(r));
            }
        }
    }
    if order.len() < n {
        // A cycle (not valid ONNX): leave the graph as it was.
        return;
    }
    let mut nodes: Vec<Option<pb::NodeProto>> = std::mem::take(&mut graph.node)
        .into_iter()
        .map(Some)
        .collect();
    graph.node = order.into_iter().filter_map(|i| nodes[i].take()).collect();
}

/// Every tensor name read by the nodes of the subgraphs (`If`/`Loop`/`Scan` bodies) of
/// `graph`'s nodes, at any depth: such bodies may read the outer graph's initializers.
fn names_read_by_subgraphs(graph: &pb::GraphProto) -> HashSet<String> {
    fn visit(g: &pb::GraphProto, names: &mut HashSet<String>) {
        for n in &g.node {
            names.extend(n.input.iter().cloned());
            for a in &n.attribute {
                for sub in a.g.iter().chain(&a.graphs) {
                    visit(sub, names);
                }
            }
        }
    }
    let mut names = HashSet::new();
    for n in &graph.node {
        for a in &n.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                visit(sub, &mut names);
            }
        }
    }
    names
}

/// Every tensor name the graph uses: inputs, outputs, initializers and node wires.
pub fn tensor_names(graph: &pb::GraphProto) -> HashSet<String> {
    graph
        .input
        .iter()
        .chain(&graph.output)
        .map(|v| v.name.clone())
        .chain(graph.initializer.iter().map(|t| t.name.clone()))
        .chain(
            graph
                .node
                .iter()
                .flat_map(|n| n.input.iter().chain(&n.output).cloned()),
        )
        .collect()
}

/// `base`, or `base` with `_` appended until it is not in `taken`.
pub fn unused_name(base: &str, taken: &HashSet<String>) -> String {
    let mut name = base.to_string();
    while taken.contains(&name) {
        name.push('_');
    }
    name
}

/// Removes initializers no node, subgraph or output reads.
pub fn prune_initializers(graph: &mut pb::GraphProto) {
    let mut used = names_read_by_subgraphs(graph);
    used.extend(
        graph
            .node
            .iter()
            .flat_map(|n| n.input.iter().cloned())
            .chain(graph.output.iter().map(|o| o.name.clone())),
    );
    graph.initializer.retain(|t| used.contains(&t.name));
}

/// Initializers up to this many encoded bytes are compared by [`share_identical_initializers`].
const SHARED_INITIALIZER_MAX_BYTES: usize = 1 << 16;

/// Keeps one copy of initializers with the same type, shape and values, pointing the nodes
/// that read a duplicate at the copy kept: exporters repeat small constants (an activation's
/// `3.0` and `6.0` per layer) and quantization adds a scale per tensor. Initializers that
/// are graph inputs or outputs, or read inside subgraphs, keep their names.
pub fn share_identical_initializers(graph: &mut pb::GraphProto) {
    let mut pinned = names_read_by_subgraphs(graph);
    pinned.extend(
        graph
            .input
            .iter()
            .chain(&graph.output)
            .map(|v| v.name.clone()),
    );
    let mut first_with: HashMap<Vec<u8>, String> = HashMap::new();
    let mut renamed: HashMap<String, String> = HashMap::new();
    for t in &graph.initializer {
        if pinned.contains(&t.name) || t.encoded_len() > SHARED_INITIALIZER_MAX_BYTES {
            continue;
        }
        let key = pb::TensorProto {
            name: String::new(),
            ..t.clone()
        }
        .encode_to_vec();
        match first_with.get(&key) {
            Some(kept) => {
                renamed.insert(t.name.clone(), kept.clone());
            }
            None => {
                first_with.insert(key, t.name.clone());
            }
        }
    }
    if renamed.is_empty() {
        return;
    }
    for input in graph.node.iter_mut().flat_map(|n| n.input.iter_mut()) {
        if let Some(kept) = renamed.get(input) {
            input.clone_from(kept);
        }
    }
    graph.initializer.retain(|t| !renamed.contains_key(&t.name));
}

/// Symmetric int8 quantization of weights whose channels lie on `axis` of `dims` (one scale
/// per channel, or one for the whole tensor when `per_channel` is false): `(values, scales)`.
/// Each value rounds to within half a step of its scale.
pub fn quantize_symmetric_int8(
    w: &[f32],
    dims: &[i64],
    axis: usize,
    per_channel: bool,
) -> (Vec<i8>, Vec<f32>) {
    let channels = if per_channel { dims[axis] as usize } else { 1 };
    let inner: usize = dims[axis + 1..].iter().product::<i64>() as usize;
    let channel_of = |i: usize| {
        if per_channel {
            (i / inner) % channels
        } else {
            0
        }
    };
    let mut maxes = vec![0f32; channels];
    for (i, v) in w.iter().enumerate() {
        maxes[channel_of(i)] = maxes[channel_of(i)].max(v.abs());
    }
    let scales: Vec<f32> = maxes
        .iter()
        .map(|m| if *m > 0.0 { m / 127.0 } else { 1.0 })
        .collect();
    let q = w
        .iter()
        .enumerate()
        .map(|(i, v)| (v / scales[channel_of(i)]).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (q, scales)
}

/// Rewrites a model of opset 11 or 12 to opset 13, the first that lets `DequantizeLinear`
/// take per-channel scales. Ops whose meaning changed are rewritten to keep it: `axes` and
/// `split` attributes of `Squeeze`, `Unsqueeze`, `ReduceSum` and `Split` become inputs, and
/// `Softmax`/`LogSoftmax`/`Hardmax` (which coerced their input to 2-D before 13) become
/// `Flatten → op(axis = 1) → Reshape` unless they already work on the last axis. Returns
/// whether anything changed; models with control flow (subgraphs) are refused.
pub fn upgrade_to_opset13(model: &mut pb::ModelProto) -> Result<bool> {
    let version = tern::onnx::default_opset(model);
    if version >= 13 {
        return Ok(false);
    }
    if version < 11 {
        return Err(QuantizeError::InvalidModel(format!(
            "opset {version}: only opsets 11 and 12 can be upgraded to 13"
        )));
    }
    let g = graph_mut(model);
    let default_domain = |n: &pb::NodeProto| tern::onnx::is_default_domain(&n.domain);
    if let Some(n) = g.node.iter().find(|n| {
        n.attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
    }) {
        return Err(QuantizeError::InvalidModel(format!(
            "{} ({}) has a subgraph: opset upgrade not supported",
            n.name, n.op_type
        )));
    }
    let mut nodes = Vec::with_capacity(g.node.len());
    let mut new_inits = Vec::new();
    for (ix, mut n) in std::mem::take(&mut g.node).into_iter().enumerate() {
        if !default_domain(&n) {
            nodes.push(n);
            continue;
        }
        let tag = format!("{}_op13_{ix}", n.name);
        match n.op_type.as_str() {
            "Squeeze" | "Unsqueeze" | "ReduceSum" | "Split" => {
                let key = if n.op_type == "Split" {
                    "split"
                } else {
                    "axes"
                };
                if let Some(pos) = n.attribute.iter().position(|a| a.name == key) {
                    let values = n.attribute.remove(pos).ints;
                    let name = format!("{tag}_{key}");
                    new_inits.push(tensor(
                        &name,
                        INT64,
                        &[values.len() as i64],
                        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    ));
                    n.input.truncate(1);
                    n.input.push(name);
                }
                nodes.push(n);
            }
            "Softmax" | "LogSoftmax" | "Hardmax" => {
                let axis = attr_i(&n, "axis", 1);
                n.attribute.retain(|a| a.name != "axis");
                if axis == -1 {
                    n.attribute.push(int_attr("axis", -1));
                    nodes.push(n);
                    continue;
                }
                // Opset < 13: flatten to [d0⋯d(axis-1), d(axis)⋯], normalise the second
                // dimension, restore the shape.
                let (x, y) = (n.input[0].clone(), n.output[0].clone());
                let (flat, soft, shape) = (
                    format!("{tag}_flat"),
                    format!("{tag}_soft"),
                    format!("{tag}_shape"),
                );
                nodes.push(node(
                    "Flatten",
                    &format!("{tag}_Flatten"),
                    &[&x],
                    &[&flat],
                    vec![int_attr("axis", axis)],
                ));
                nodes.push(node(
                    "Shape",
                    &format!("{tag}_Shape"),
                    &[&x],
                    &[&shape],
                    vec![],
                ));
                n.input = vec![flat];
                n.output = vec![soft.clone()];
                n.attribute.push(int_attr("axis", 1));
                nodes.push(n);
                nodes.push(node(
                    "Reshape",
                    &format!("{tag}_Reshape"),
                    &[&soft, &shape],
                    &[&y],
                    vec![],
                ));
            }
            _ => nodes.push(n),
        }
    }
    g.node = nodes;
    g.initializer.extend(new_inits);
    for o in model
        .opset_import
        .iter_mut()
        .filter(|o| tern::onnx::is_default_domain(&o.domain))
    {
        o.version = 13;
    }
    // Opset 13 needs IR version 7.
    model.ir_version = model.ir_version.max(7);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_initializers_are_stored_once_unless_a_subgraph_or_the_interface_reads_them() {
        let mut g = pb::GraphProto {
            input: vec![pb::ValueInfoProto {
                name: "overridable".into(),
                ..Default::default()
            }],
            initializer: vec![
                f32_tensor("three_a", &[], &[3.0]),
                f32_tensor("three_b", &[], &[3.0]),
                f32_tensor("three_1d", &[1], &[3.0]),
                f32_tensor("six", &[], &[6.0]),
                f32_tensor("overridable", &[], &[3.0]),
                f32_tensor("in_body", &[], &[3.0]),
            ],
            node: vec![
                node("Add", "a", &["x", "three_a"], &["y"], vec![]),
                node("Add", "b", &["y", "three_b"], &["z"], vec![]),
                node("Mul", "c", &["z", "three_1d"], &["w"], vec![]),
                node("Mul", "d", &["w", "six"], &["v"], vec![]),
                node("Mul", "e", &["v", "overridable"], &["u"], vec![]),
            ],
            ..Default::default()
        };
        let body = pb::GraphProto {
            node: vec![node("Identity", "i", &["in_body"], &["o"], vec![])],
            ..Default::default()
        };
        let mut if_node = node("If", "f", &["cond"], &["r"], vec![]);
        if_node.attribute.push(pb::AttributeProto {
            name: "then_branch".into(),
            g: Some(body),
            ..Default::default()
        });
        g.node.push(if_node);
        share_identical_initializers(&mut g);
        let names: Vec<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["three_a", "three_1d", "six", "overridable", "in_body"]
        );
        assert_eq!(g.node[1].input[1], "three_a");
        assert_eq!(
            g.node[2].input[1], "three_1d",
            "another shape is another tensor"
        );
        // The body's reference keeps its initializer through pruning as well.
        prune_initializers(&mut g);
        assert!(g.initializer.iter().any(|t| t.name == "in_body"));
    }
}
