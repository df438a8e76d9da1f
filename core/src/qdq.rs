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
    let producers = crate::onnx::producers(graph);
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
    let mut replaced: HashMap<usize, Vec<pb::NodeProto>> = HashMap::new();
    let mut removed: HashSet<usize> = HashSet::new();
    for f in &fused {
        replaced.insert(f.conv, f.nodes.clone());
        removed.extend(f.quantize);
        graph.initializer.extend(f.initializers.iter().cloned());
    }
    let count = fused.len();
    let nodes = std::mem::take(&mut graph.node);
    graph.node = nodes
        .into_iter()
        .enumerate()
        .filter(|(ix, _)| !removed.contains(ix))
        .flat_map(|(ix, n)| replaced.remove(&ix).unwrap_or_else(|| vec![n]))
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

/// One fusion: the conv node's index, the `QuantizeLinear` it absorbs (if any), the nodes
/// that replace the conv, and the initializers they add.
struct Fused {
    conv: usize,
    quantize: Option<usize>,
    nodes: Vec<pb::NodeProto>,
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
    /// The zero point's name; `None` when the node has none (0 of the quantized type).
    zero: Option<&'g str>,
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

    /// A (de)quantize node's parameters, when its scale and zero point are initializers. A
    /// node without a zero point is read as 0 of its quantized type, which must then be
    /// an initializer's (a dequantized weight).
    fn quant(&self, node: &'g pb::NodeProto, quantized_input: bool) -> Option<Quant<'g>> {
        let (value, scale, zero) = match node.input.as_slice() {
            [value, scale] => (value, scale, None),
            [value, scale, zero] if zero.is_empty() => (value, scale, None),
            [value, scale, zero] => (value, scale, Some(zero.as_str())),
            _ => return None,
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
        let zeros = match zero {
            Some(zero) => self.tensor(zero)?,
            None if quantized_input => {
                let dt = self.tensor(value)?.datum_type();
                Tensor::zero_dt(dt, &[scales.len()]).ok()?
            }
            None => return None,
        };
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

    /// The float bias of a `Conv` (an initializer, or a `DequantizeLinear` of one), if any.
    fn float_bias(&self, b: &str) -> Option<Vec<f32>> {
        let to_vec = |t: Tensor| -> Option<Vec<f32>> {
            let t = t.cast_to::<f32>().ok()?.into_owned();
            Some(t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec())
        };
        match self.producer(b, "DequantizeLinear") {
            Some(dq) => {
                let bq = self.quant(dq, true)?;
                let (q, z) = (to_vec(self.tensor(bq.value)?)?, to_vec(bq.zeros)?);
                let at = |v: &[f32], c: usize| if v.len() == 1 { v[0] } else { v[c] };
                Some(
                    (0..q.len())
                        .map(|c| (q[c] - at(&z, c)) * at(&bq.scales, c))
                        .collect(),
                )
            }
            None => {
                let t = self.tensor(b)?;
                (t.datum_type() == f32::datum_type()).then_some(())?;
                to_vec(t)
            }
        }
    }

    /// The fusion of the `Conv` at `ix`, if its pattern holds: to `QLinearConv` when its
    /// output feeds one `QuantizeLinear` alone, else to `ConvInteger` and a per-channel
    /// rescale to f32 (what a QDQ model that quantizes only the convolutions' inputs, as
    /// tern-quantize's does, is made of).
    fn conv(&self, ix: usize) -> Option<Fused> {
        let conv = &self.nodes[ix];
        let (x, w) = (conv.input.first()?, conv.input.get(1)?);
        let b = conv.input.get(2).filter(|b| !b.is_empty());
        let [y] = conv.output.as_slice() else {
            return None;
        };
        let xq = self.quant(self.producer(x, "DequantizeLinear")?, true)?;
        let wq = self.quant(self.producer(w, "DequantizeLinear")?, true)?;
        if xq.zero_type != u8::datum_type()
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
        let bias = match b {
            Some(b) => Some(self.float_bias(b)?).filter(|v| v.len() == out_channels),
            None => None,
        };
        if b.is_some() && bias.is_none() {
            return None;
        }
        // x_scale · w_scale[c]: the scale of the integer accumulator.
        let acc_scale: Vec<f32> = (0..out_channels)
            .map(|c| xq.scales[0] * wq.scales[if per_channel { c } else { 0 }])
            .collect();
        let name = match conv.name.is_empty() {
            true => y.clone(),
            false => conv.name.clone(),
        };
        let quantized = match self.consumers.get(y.as_str())?.as_slice() {
            [q_ix] if !self.outputs.contains(y.as_str()) => {
                let q_node = &self.nodes[*q_ix];
                (q_node.op_type == "QuantizeLinear" && q_node.domain.is_empty())
                    .then(|| self.quant(q_node, false))
                    .flatten()
                    .filter(|yq| yq.zero_type == u8::datum_type() && yq.scales.len() == 1)
                    .map(|yq| (*q_ix, yq, &q_node.output))
            }
            _ => None,
        };
        let mut initializers = Vec::new();
        let mut inputs = vec![xq.value.to_string()];
        let node =
            |op: &str, suffix: &str, inputs: Vec<String>, outputs: Vec<String>| pb::NodeProto {
                input: inputs,
                output: outputs,
                name: format!("{name}.{suffix}"),
                op_type: op.into(),
                domain: String::new(),
                attribute: match op {
                    "QLinearConv" | "ConvInteger" => conv.attribute.clone(),
                    _ => Vec::new(),
                },
                doc_string: String::new(),
            };
        let Some((q_ix, yq, q_outputs)) = quantized else {
            // ConvInteger → Cast → Mul(acc_scale) [→ Add(bias)], writing the conv's output;
            // one group, or depthwise (one input channel per group, as many groups as
            // output channels): what tern's int8 kernels take with a float epilogue.
            let group = conv
                .attribute
                .iter()
                .find(|a| a.name == "group")
                .map_or(1, |a| a.i);
            let depthwise = group == out_channels as i64 && weights.shape().get(1) == Some(&1);
            if group != 1 && !depthwise {
                return None;
            }
            inputs.extend([wq.value.to_string(), xq.zero?.to_string()]);
            inputs.extend(wq.zero.map(String::from));
            let per_channel_f32 = |suffix: &str, values: Vec<f32>| pb::TensorProto {
                name: format!("{name}.{suffix}"),
                dims: vec![1, values.len() as i64, 1, 1],
                data_type: DataType::Float as i32,
                float_data: values,
                ..Default::default()
            };
            let acc = format!("{name}.tern_acc");
            let accf = format!("{name}.tern_acc_f32");
            let scaled = match bias {
                Some(_) => format!("{name}.tern_scaled"),
                None => y.clone(),
            };
            initializers.push(per_channel_f32("tern_acc_scale", acc_scale));
            let mut nodes = vec![
                node("ConvInteger", "conv_integer", inputs, vec![acc.clone()]),
                pb::NodeProto {
                    attribute: vec![pb::AttributeProto {
                        name: "to".into(),
                        r#type: pb::attribute_proto::AttributeType::Int as i32,
                        i: DataType::Float as i64,
                        ..Default::default()
                    }],
                    ..node("Cast", "tern_cast", vec![acc], vec![accf.clone()])
                },
                node(
                    "Mul",
                    "tern_rescale",
                    vec![accf, format!("{name}.tern_acc_scale")],
                    vec![scaled.clone()],
                ),
            ];
            if let Some(bias) = bias {
                initializers.push(per_channel_f32("tern_bias", bias));
                // Node names must differ from the initializers' (tract names a constant
                // after its initializer).
                nodes.push(node(
                    "Add",
                    "tern_add_bias",
                    vec![scaled, format!("{name}.tern_bias")],
                    vec![y.clone()],
                ));
            }
            return Some(Fused {
                conv: ix,
                quantize: None,
                nodes,
                initializers,
            });
        };
        // QLinearConv: the bias at scale x_scale · w_scale[c], rounded to i32.
        // QLinearConv needs every zero point: a weight without one gets zeros.
        let w_zero = match wq.zero {
            Some(zero) => zero.to_string(),
            None => {
                let name = format!("{name}.tern_w_zero");
                initializers.push(pb::TensorProto {
                    name: name.clone(),
                    dims: vec![wq.scales.len() as i64],
                    data_type: DataType::Int8 as i32,
                    raw_data: vec![0; wq.scales.len()],
                    ..Default::default()
                });
                name
            }
        };
        inputs.extend([xq.scale, xq.zero?, wq.value, wq.scale].map(String::from));
        inputs.extend([w_zero, yq.scale.to_string(), yq.zero?.to_string()]);
        if let Some(bias) = bias {
            let ints = bias
                .iter()
                .zip(&acc_scale)
                .map(|(v, s)| {
                    let q = (v / s).round_ties_even();
                    (q.abs() < (1u32 << 30) as f32).then_some(q as i32)
                })
                .collect::<Option<Vec<i32>>>()?;
            let bias_name = format!("{name}.tern_bias_i32");
            initializers.push(pb::TensorProto {
                name: bias_name.clone(),
                dims: vec![ints.len() as i64],
                data_type: DataType::Int32 as i32,
                int32_data: ints,
                ..Default::default()
            });
            inputs.push(bias_name);
        }
        Some(Fused {
            conv: ix,
            quantize: Some(q_ix),
            nodes: vec![node("QLinearConv", "qlinear", inputs, q_outputs.clone())],
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
    fn an_unquantized_output_makes_conv_integer_and_a_rescale() {
        // The conv's output is read by a Relu too: no QuantizeLinear to absorb.
        let (fused, n) = fuse(&model(0, true)).expect("fused");
        assert_eq!(n, 1);
        let graph = fused.graph.unwrap();
        let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            [
                "QuantizeLinear",
                "ConvInteger",
                "Cast",
                "Mul",
                "Add",
                "QuantizeLinear",
                "DequantizeLinear",
                "Relu"
            ]
        );
        assert_eq!(graph.node[1].input, ["xq", "wq", "xz", "wz"]);
        assert_eq!(graph.node[4].output, ["c"]);
        let value = |name: &str| graph.initializer.iter().find(|t| t.name == name).unwrap();
        // x_scale · w_scale, and the bias dequantized: 7 · 0.01, -9 · 0.01.
        assert_eq!(value(&graph.node[3].input[1]).float_data, [0.01, 0.01]);
        assert_eq!(
            value(&graph.node[4].input[1]).float_data,
            [7.0f32 * 0.01, -9.0 * 0.01]
        );
    }

    #[test]
    fn patterns_the_kernels_do_not_take_are_left_alone() {
        assert!(fuse(&model(1, false)).is_none(), "weight zero point");
    }
}
