//! QDQ → QOperator fusion on the ONNX graph, as onnxruntime's QDQ transformer does it.
//!
//! A statically quantized model in QDQ form (tern-quantize's default output, onnxruntime's
//! quantizer's too) writes each int8 convolution as float ops between quantize and
//! dequantize nodes:
//!
//! ```text
//! DequantizeLinear(x_q) ─┐
//! DequantizeLinear(w_q) ─┼─ Conv ── QuantizeLinear ── y_q
//! DequantizeLinear(b_q) ─┘
//! ```
//!
//! tract folds the weight dequantization into f32 constants when it types the graph, so the
//! integer weights never reach an integer kernel and each layer costs a float convolution
//! plus a quantize and a dequantize pass. This pass rewrites the pattern to the one
//! `QLinearConv` it means (the weights stay `i8`, the bias becomes `i32` at scale
//! `x_scale · w_scale`), which the CPU backend's rewrites hand to tern's int8 kernels. It
//! runs on a copy of the protobuf at load; the unfused graph stays the model's own (for
//! the GPU backend and for `tern_kernels(false)`).
//!
//! Fused only when every piece is a plain initializer the kernels take: `u8` activations
//! and output, `i8` weights with zero points 0 (per tensor, or per output channel on axis
//! 0), `f32` scales, and a `Conv` whose output feeds that one `QuantizeLinear` alone.
//! Anything else is left as it is.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{self, tensor_proto::DataType};
use tract_onnx::prelude::*;

/// The graph of `proto` with its QDQ convolutions fused, and how many were; `None` when
/// none could be.
pub(crate) fn fuse(proto: &pb::ModelProto) -> Option<(pb::ModelProto, usize)> {
    let graph = proto.graph.as_ref()?;
    let initializers: HashMap<&str, &pb::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let producers: HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(ix, n)| n.output.iter().map(move |o| (o.as_str(), ix)))
        .collect();
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (ix, node) in graph.node.iter().enumerate() {
        for input in &node.input {
            consumers.entry(input.as_str()).or_default().push(ix);
        }
    }
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let graph_view = View {
        nodes: &graph.node,
        initializers: &initializers,
        producers: &producers,
        consumers: &consumers,
        outputs: &outputs,
    };

    let mut fused = Vec::new();
    for (ix, node) in graph.node.iter().enumerate() {
        if node.op_type == "Conv" && node.domain.is_empty() {
            if let Some(f) = graph_view.conv(ix) {
                fused.push(f);
            }
        }
    }
    if fused.is_empty() {
        return None;
    }

    let mut proto = proto.clone();
    let graph = proto.graph.as_mut()?;
    let mut replaced: HashMap<usize, pb::NodeProto> = HashMap::new();
    let mut removed: HashSet<usize> = HashSet::new();
    for f in &fused {
        replaced.insert(f.conv, f.node.clone());
        removed.insert(f.quantize);
        graph.initializer.extend(f.initializers.iter().cloned());
    }
    let count = fused.len();
    let nodes = std::mem::take(&mut graph.node);
    graph.node = nodes
        .into_iter()
        .enumerate()
        .filter(|(ix, _)| !removed.contains(ix))
        .map(|(ix, n)| replaced.remove(&ix).unwrap_or(n))
        .collect();
    prune_dequantizers(graph);
    Some((proto, count))
}

/// Drops the `DequantizeLinear` nodes nothing reads any more (the fused layers' weights).
fn prune_dequantizers(graph: &mut pb::GraphProto) {
    loop {
        let read: HashSet<&str> = graph
            .node
            .iter()
            .flat_map(|n| n.input.iter().map(String::as_str))
            .chain(graph.output.iter().map(|o| o.name.as_str()))
            .collect();
        let dead: HashSet<usize> = graph
            .node
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                n.op_type == "DequantizeLinear"
                    && n.output.iter().all(|o| !read.contains(o.as_str()))
            })
            .map(|(ix, _)| ix)
            .collect();
        if dead.is_empty() {
            return;
        }
        let nodes = std::mem::take(&mut graph.node);
        graph.node = nodes
            .into_iter()
            .enumerate()
            .filter(|(ix, _)| !dead.contains(ix))
            .map(|(_, n)| n)
            .collect();
    }
}

/// One fusion: the conv node's index, the `QuantizeLinear` it absorbs, the `QLinearConv`
/// that replaces the conv, and the initializers it adds (the `i32` bias).
struct Fused {
    conv: usize,
    quantize: usize,
    node: pb::NodeProto,
    initializers: Vec<pb::TensorProto>,
}

/// The graph, indexed for matching.
struct View<'g> {
    nodes: &'g [pb::NodeProto],
    initializers: &'g HashMap<&'g str, &'g pb::TensorProto>,
    producers: &'g HashMap<&'g str, usize>,
    consumers: &'g HashMap<&'g str, Vec<usize>>,
    outputs: &'g HashSet<&'g str>,
}

/// A `DequantizeLinear`'s or `QuantizeLinear`'s quantized side, scale and zero point.
struct Quant<'g> {
    value: &'g str,
    scale: &'g str,
    zero: &'g str,
    scales: Vec<f32>,
    zero_type: DatumType,
    zeros: Tensor,
    axis: i64,
}

impl<'g> View<'g> {
    /// The initializer `name` as a tract tensor (not for external data).
    fn tensor(&self, name: &str) -> Option<Tensor> {
        let t = self.initializers.get(name)?;
        let resolver = tract_onnx::data_resolver::default();
        tract_onnx::tensor::load_tensor(&*resolver, t, None).ok()
    }

    /// The node producing `value`, if it is of type `op`.
    fn producer(&self, value: &str, op: &str) -> Option<&'g pb::NodeProto> {
        let node = &self.nodes[*self.producers.get(value)?];
        (node.op_type == op && node.domain.is_empty()).then_some(node)
    }

    /// A (de)quantize node's parameters, when its scale and zero point are initializers.
    fn quant(&self, node: &'g pb::NodeProto, quantized_input: bool) -> Option<Quant<'g>> {
        let [value, scale, zero] = node.input.as_slice() else {
            return None;
        };
        let value = match quantized_input {
            true => value.as_str(),
            false => node.output.first()?.as_str(),
        };
        let scales = self.tensor(scale)?;
        if scales.datum_type() != f32::datum_type() || scales.rank() > 1 {
            return None;
        }
        let scales = scales
            .try_as_plain_ram()
            .ok()?
            .as_slice::<f32>()
            .ok()?
            .to_vec();
        if scales.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return None;
        }
        let zeros = self.tensor(zero)?;
        let axis = node
            .attribute
            .iter()
            .find(|a| a.name == "axis")
            .map_or(1, |a| a.i);
        Some(Quant {
            value,
            scale,
            zero,
            scales,
            zero_type: zeros.datum_type(),
            zeros,
            axis,
        })
    }

    /// The fusion of the `Conv` at `ix`, if its pattern holds.
    fn conv(&self, ix: usize) -> Option<Fused> {
        let conv = &self.nodes[ix];
        let (x, w) = (conv.input.first()?, conv.input.get(1)?);
        let b = conv.input.get(2).filter(|b| !b.is_empty());
        let [y] = conv.output.as_slice() else {
            return None;
        };
        // The output feeds one QuantizeLinear alone.
        let [q_ix] = self.consumers.get(y.as_str())?.as_slice() else {
            return None;
        };
        if self.outputs.contains(y.as_str()) {
            return None;
        }
        let q_node = &self.nodes[*q_ix];
        if q_node.op_type != "QuantizeLinear" || !q_node.domain.is_empty() {
            return None;
        }
        let yq = self.quant(q_node, false)?;
        let xq = self.quant(self.producer(x, "DequantizeLinear")?, true)?;
        let wq = self.quant(self.producer(w, "DequantizeLinear")?, true)?;
        if yq.zero_type != u8::datum_type()
            || xq.zero_type != u8::datum_type()
            || yq.scales.len() != 1
            || xq.scales.len() != 1
            || wq.zero_type != i8::datum_type()
        {
            return None;
        }
        let weights = self.tensor(wq.value)?;
        let out_channels = *weights.shape().first()?;
        if weights.datum_type() != i8::datum_type() || weights.rank() != 4 {
            return None;
        }
        let per_channel = wq.scales.len() > 1;
        if (per_channel && (wq.scales.len() != out_channels || ![0, -4].contains(&wq.axis)))
            || wq.zeros.len() != wq.scales.len()
            || wq
                .zeros
                .try_as_plain_ram()
                .ok()?
                .as_slice::<i8>()
                .ok()?
                .iter()
                .any(|z| *z != 0)
        {
            return None;
        }
        // The bias at scale x_scale · w_scale[c], rounded to i32.
        let bias = match b {
            None => None,
            Some(b) => {
                let float = match self.producer(b, "DequantizeLinear") {
                    Some(dq) => {
                        let bq = self.quant(dq, true)?;
                        let q = self.tensor(bq.value)?.cast_to::<f32>().ok()?.into_owned();
                        let zeros = bq.zeros.cast_to::<f32>().ok()?.into_owned();
                        let (q, z) = (
                            q.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec(),
                            zeros
                                .try_as_plain_ram()
                                .ok()?
                                .as_slice::<f32>()
                                .ok()?
                                .to_vec(),
                        );
                        let at = |v: &[f32], c: usize| if v.len() == 1 { v[0] } else { v[c] };
                        (0..q.len())
                            .map(|c| (q[c] - at(&z, c)) * at(&bq.scales, c))
                            .collect::<Vec<f32>>()
                    }
                    None => {
                        let t = self.tensor(b)?;
                        if t.datum_type() != f32::datum_type() {
                            return None;
                        }
                        t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec()
                    }
                };
                if float.len() != out_channels {
                    return None;
                }
                let ws = |c: usize| {
                    if per_channel {
                        wq.scales[c]
                    } else {
                        wq.scales[0]
                    }
                };
                let ints = float
                    .iter()
                    .enumerate()
                    .map(|(c, v)| {
                        let q = (v / (xq.scales[0] * ws(c))).round_ties_even();
                        (q.abs() < (1u32 << 30) as f32).then_some(q as i32)
                    })
                    .collect::<Option<Vec<i32>>>()?;
                Some(ints)
            }
        };

        let name = match conv.name.is_empty() {
            true => y.clone(),
            false => conv.name.clone(),
        };
        let mut initializers = Vec::new();
        let mut inputs = vec![
            xq.value.to_string(),
            xq.scale.to_string(),
            xq.zero.to_string(),
            wq.value.to_string(),
            wq.scale.to_string(),
            wq.zero.to_string(),
            yq.scale.to_string(),
            yq.zero.to_string(),
        ];
        if let Some(bias) = bias {
            let bias_name = format!("{name}.tern_bias_i32");
            initializers.push(pb::TensorProto {
                name: bias_name.clone(),
                dims: vec![bias.len() as i64],
                data_type: DataType::Int32 as i32,
                int32_data: bias,
                ..Default::default()
            });
            inputs.push(bias_name);
        }
        let node = pb::NodeProto {
            input: inputs,
            output: q_node.output.clone(),
            name: format!("{name}.qlinear"),
            op_type: "QLinearConv".into(),
            domain: String::new(),
            attribute: conv.attribute.clone(),
            doc_string: String::new(),
        };
        Some(Fused {
            conv: ix,
            quantize: *q_ix,
            node,
            initializers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: outputs[0].into(),
            ..Default::default()
        }
    }

    fn init(name: &str, dims: &[i64], dt: DataType, raw: Vec<u8>) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: dt as i32,
            raw_data: raw,
            ..Default::default()
        }
    }

    fn le<const N: usize, T>(values: &[T], bytes: impl Fn(&T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(bytes).collect()
    }

    /// x(f32) → Q → DQ → Conv(DQ(w), DQ(b)) → Q → DQ → y, with knobs to break it.
    fn model(w_zero: i8, extra_reader: bool) -> pb::ModelProto {
        let mut nodes = vec![
            node("QuantizeLinear", &["x", "xs", "xz"], &["xq"]),
            node("DequantizeLinear", &["xq", "xs", "xz"], &["xd"]),
            node("DequantizeLinear", &["wq", "ws", "wz"], &["wd"]),
            node("DequantizeLinear", &["bq", "bs", "bz"], &["bd"]),
            node("Conv", &["xd", "wd", "bd"], &["c"]),
            node("QuantizeLinear", &["c", "ys", "yz"], &["yq"]),
            node("DequantizeLinear", &["yq", "ys", "yz"], &["y"]),
        ];
        if extra_reader {
            nodes.push(node("Relu", &["c"], &["r"]));
        }
        pb::ModelProto {
            ir_version: 8,
            graph: Some(pb::GraphProto {
                node: nodes,
                initializer: vec![
                    init(
                        "xs",
                        &[],
                        DataType::Float,
                        le(&[0.02f32], |v| v.to_le_bytes()),
                    ),
                    init("xz", &[], DataType::Uint8, vec![128]),
                    init(
                        "wq",
                        &[2, 1, 1, 1],
                        DataType::Int8,
                        le(&[3i8, -5], |v| v.to_le_bytes()),
                    ),
                    init(
                        "ws",
                        &[],
                        DataType::Float,
                        le(&[0.5f32], |v| v.to_le_bytes()),
                    ),
                    init(
                        "wz",
                        &[],
                        DataType::Int8,
                        le(&[w_zero], |v| v.to_le_bytes()),
                    ),
                    init(
                        "bq",
                        &[2],
                        DataType::Int32,
                        le(&[7i32, -9], |v| v.to_le_bytes()),
                    ),
                    init(
                        "bs",
                        &[],
                        DataType::Float,
                        le(&[0.01f32], |v| v.to_le_bytes()),
                    ),
                    init("bz", &[], DataType::Int32, le(&[0i32], |v| v.to_le_bytes())),
                    init(
                        "ys",
                        &[],
                        DataType::Float,
                        le(&[0.1f32], |v| v.to_le_bytes()),
                    ),
                    init("yz", &[], DataType::Uint8, vec![100]),
                ],
                output: vec![pb::ValueInfoProto {
                    name: "y".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_qdq_convolution_becomes_one_qlinearconv() {
        let (fused, n) = fuse(&model(0, false)).expect("fused");
        assert_eq!(n, 1);
        let graph = fused.graph.unwrap();
        let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["QuantizeLinear", "QLinearConv", "DequantizeLinear"]);
        let q = &graph.node[1];
        assert_eq!(
            q.input[..8],
            ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz"]
        );
        assert_eq!(q.output, ["yq"]);
        // The bias keeps its value at the new scale: 7 · 0.01 / (0.02 · 0.5) = 7.
        let bias = graph
            .initializer
            .iter()
            .find(|t| t.name == q.input[8])
            .unwrap();
        assert_eq!(bias.int32_data, [7, -9]);
    }

    #[test]
    fn patterns_the_kernels_do_not_take_are_left_alone() {
        assert!(fuse(&model(1, false)).is_none(), "weight zero point");
        assert!(fuse(&model(0, true)).is_none(), "conv output read twice");
    }
}
