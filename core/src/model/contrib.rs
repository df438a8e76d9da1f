//! onnxruntime's `com.microsoft` contrib ops that tract does not implement, rewritten at
//! load into the standard ONNX ops they are defined as.
//!
//! onnxruntime's own tools write these ops: its quantizer's QOperator form
//! (`QLinearAdd`, `QLinearMul`, `QLinearSigmoid`, `QLinearLeakyRelu`, `QLinearSoftmax`,
//! `QLinearGlobalAveragePool`, `QLinearAveragePool`, `QLinearConcat`, `QGemm`), its graph
//! optimizer (`FusedConv`, `MatMulIntegerToFloat`, `DynamicQuantizeMatMul`), its dynamic
//! quantizer's `DynamicQuantizeLSTM`, and its
//! transformer optimizer (`Attention`, `MultiHeadAttention`, `EmbedLayerNormalization`). A
//! model saved after any of them would not load on tract.
//!
//! Each is rewritten into the ops its specification defines it by: a quantized op becomes
//! `DequantizeLinear → op → QuantizeLinear`, which tern's int8 rewrites then run on bytes
//! (per-byte tables, byte Add/Mul, byte pooling: `backend::tract::rewrite`), so nothing is
//! lost against a native kernel; attention becomes its matrix products and softmax. Forms
//! of an op the rewrite does not cover (a past key/value cache, a causal flag, channels-
//! last pooling…) are left alone, and the model fails to load with the op named, as before.
//! Like `qdq`, this runs on the protobuf before tract parses it; `ModelInfo` still shows
//! the model's own ops.

use std::collections::HashMap;

use crate::onnx::{attr, attr_f, attr_i, float_attr, i64_tensor, int_attr, ints_attr, node, pb};

/// The contrib domain.
const MS: &str = "com.microsoft";

/// `TensorProto.DataType` codes used here.
const FLOAT: i64 = pb::tensor_proto::DataType::Float as i64;
const INT32: i64 = pb::tensor_proto::DataType::Int32 as i64;

/// Rewrites every contrib node of `proto`'s main graph that this module covers; how many.
pub(crate) fn decompose(proto: &mut pb::ModelProto) -> usize {
    let opset = crate::onnx::default_opset(proto);
    let Some(graph) = proto.graph.as_mut() else {
        return 0;
    };
    if !graph.node.iter().any(|n| n.domain == MS) {
        return 0;
    }
    // Declared ranks (graph inputs, value_info, initializers): what tells a 2-D attention
    // mask from the 1-D lengths form.
    let mut ranks: HashMap<String, usize> = HashMap::new();
    for info in graph.input.iter().chain(&graph.value_info) {
        if let Some(pb::type_proto::Value::TensorType(t)) =
            info.r#type.as_ref().and_then(|t| t.value.as_ref())
        {
            if let Some(shape) = &t.shape {
                ranks.insert(info.name.clone(), shape.dim.len());
            }
        }
    }
    for t in &graph.initializer {
        ranks.insert(t.name.clone(), t.dims.len());
    }
    let mut count = 0;
    let mut nodes = Vec::with_capacity(graph.node.len());
    for n in std::mem::take(&mut graph.node) {
        let mut out = Out::new(&n, opset, &ranks);
        let done = n.domain == MS && rewrite(&n, &mut out).is_some();
        if done {
            count += 1;
            nodes.extend(out.nodes);
            graph.initializer.extend(out.initializers);
        } else {
            nodes.push(n);
        }
    }
    graph.node = nodes;
    count
}

/// Writes `n`'s replacement into `out`; `None` when `n` is not an op (or form) covered.
fn rewrite(n: &pb::NodeProto, out: &mut Out) -> Option<()> {
    match n.op_type.as_str() {
        "QLinearSigmoid" => quantized_unary(n, out, "Sigmoid", vec![]),
        "QLinearLeakyRelu" => {
            let alpha = float_attr("alpha", attr_f(n, "alpha", 0.01));
            quantized_unary(n, out, "LeakyRelu", vec![alpha])
        }
        "QLinearSoftmax" => {
            // The contrib op's `opset` attribute picks the Softmax semantics; the last
            // axis means the same in both.
            (attr_i(n, "axis", -1) == -1).then_some(())?;
            quantized_unary(n, out, "Softmax", vec![int_attr("axis", -1)])
        }
        "QLinearGlobalAveragePool" => {
            (attr_i(n, "channels_last", 0) == 0).then_some(())?;
            quantized_unary(n, out, "GlobalAveragePool", vec![])
        }
        "QLinearAveragePool" => {
            (attr_i(n, "channels_last", 0) == 0).then_some(())?;
            let attrs = copied(
                n,
                &[
                    "auto_pad",
                    "ceil_mode",
                    "count_include_pad",
                    "kernel_shape",
                    "pads",
                    "strides",
                ],
            );
            quantized_unary(n, out, "AveragePool", attrs)
        }
        "QLinearAdd" => quantized_binary(n, out, "Add"),
        "QLinearMul" => quantized_binary(n, out, "Mul"),
        "QLinearConcat" => quantized_concat(n, out),
        "QGemm" => qgemm(n, out),
        "FusedConv" => fused_conv(n, out),
        "MatMulIntegerToFloat" => {
            let [a, b, a_scale, b_scale] = [0, 1, 2, 3].map(|i| input(n, i));
            let product = out.op(
                "MatMulInteger",
                &[a?, b?, input(n, 4).unwrap_or(""), input(n, 5).unwrap_or("")],
                vec![],
            );
            scaled_product(n, out, &product, a_scale?, b_scale?, input(n, 6))
        }
        "DynamicQuantizeMatMul" => {
            let [a, b, b_scale] = [0, 1, 2].map(|i| input(n, i));
            let q = out.fresh();
            let (q_scale, q_zero) = (out.fresh(), out.fresh());
            out.push(node(
                "DynamicQuantizeLinear",
                &out.node_name(),
                &[a?],
                &[&q, &q_scale, &q_zero],
                vec![],
            ));
            let product = out.op(
                "MatMulInteger",
                &[&q, b?, &q_zero, input(n, 3).unwrap_or("")],
                vec![],
            );
            scaled_product(n, out, &product, &q_scale, b_scale?, input(n, 4))
        }
        "DynamicQuantizeLSTM" => dynamic_quantize_lstm(n, out),
        "Attention" => attention(n, out),
        "MultiHeadAttention" => multi_head_attention(n, out),
        "EmbedLayerNormalization" => embed_layer_normalization(n, out),
        _ => None,
    }
}

/// The replacement being built for one node: its nodes and constants, named after the
/// node's first output (unique in the graph) so no name collides.
struct Out<'r> {
    prefix: String,
    opset: i64,
    /// Declared ranks of the graph's values, where known.
    ranks: &'r HashMap<String, usize>,
    next: usize,
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
}

impl<'r> Out<'r> {
    fn new(n: &pb::NodeProto, opset: i64, ranks: &'r HashMap<String, usize>) -> Out<'r> {
        let base = n.output.first().map_or(n.name.as_str(), String::as_str);
        Out {
            prefix: format!("{base}.tern_contrib"),
            opset,
            ranks,
            next: 0,
            nodes: Vec::new(),
            initializers: Vec::new(),
        }
    }

    /// A new value name.
    fn fresh(&mut self) -> String {
        self.next += 1;
        format!("{}.{}", self.prefix, self.next)
    }

    fn node_name(&self) -> String {
        format!("{}.node{}", self.prefix, self.nodes.len())
    }

    fn push(&mut self, n: pb::NodeProto) {
        self.nodes.push(n);
    }

    /// A node with one new output; its name.
    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<pb::AttributeProto>) -> String {
        let y = self.fresh();
        self.op_to(op, inputs, &y, attrs);
        y
    }

    /// A node writing `output`.
    fn op_to(&mut self, op: &str, inputs: &[&str], output: &str, attrs: Vec<pb::AttributeProto>) {
        let name = self.node_name();
        self.push(node(op, &name, inputs, &[output], attrs));
    }

    /// An int64 constant.
    fn ints(&mut self, values: &[i64], dims: &[i64]) -> String {
        let name = self.fresh();
        self.initializers.push(i64_tensor(&name, dims, values));
        name
    }

    /// An f32 scalar constant.
    fn scalar(&mut self, value: f32) -> String {
        let name = self.fresh();
        self.initializers
            .push(crate::onnx::f32_tensor(&name, &[], &[value]));
        name
    }

    /// `Reshape(x, shape)` (a 0 copies the input's dimension).
    fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let shape = self.ints(shape, &[shape.len() as i64]);
        self.op("Reshape", &[x, &shape], vec![])
    }

    fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.op("Transpose", &[x], vec![ints_attr("perm", perm)])
    }
}

/// Input `i` of `n`, if present and not empty.
fn input(n: &pb::NodeProto, i: usize) -> Option<&str> {
    n.input.get(i).map(String::as_str).filter(|s| !s.is_empty())
}

/// Output `i` of `n`, if requested.
fn output(n: &pb::NodeProto, i: usize) -> Option<&str> {
    n.output
        .get(i)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// These attributes of `n`, where it has them.
fn copied(n: &pb::NodeProto, names: &[&str]) -> Vec<pb::AttributeProto> {
    names
        .iter()
        .filter_map(|name| attr(n, name).cloned())
        .collect()
}

/// `DequantizeLinear(x, scale, zero)` (an absent zero point is 0).
fn dequantize(out: &mut Out, x: &str, scale: &str, zero: Option<&str>) -> String {
    match zero {
        Some(zero) => out.op("DequantizeLinear", &[x, scale, zero], vec![]),
        None => out.op("DequantizeLinear", &[x, scale], vec![]),
    }
}

/// `QuantizeLinear(x, scale, zero)` into `y`.
fn quantize_to(out: &mut Out, x: &str, scale: &str, zero: Option<&str>, y: &str) {
    match zero {
        Some(zero) => out.op_to("QuantizeLinear", &[x, scale, zero], y, vec![]),
        None => out.op_to("QuantizeLinear", &[x, scale], y, vec![]),
    }
}

/// `X, X_scale, X_zero, Y_scale, Y_zero` → `Q(op(DQ(X)))`.
fn quantized_unary(
    n: &pb::NodeProto,
    out: &mut Out,
    op: &str,
    attrs: Vec<pb::AttributeProto>,
) -> Option<()> {
    let x = dequantize(out, input(n, 0)?, input(n, 1)?, input(n, 2));
    let y = out.op(op, &[&x], attrs);
    quantize_to(out, &y, input(n, 3)?, input(n, 4), output(n, 0)?);
    Some(())
}

/// `A, A_scale, A_zero, B, B_scale, B_zero, C_scale, C_zero` → `Q(op(DQ(A), DQ(B)))`.
fn quantized_binary(n: &pb::NodeProto, out: &mut Out, op: &str) -> Option<()> {
    let a = dequantize(out, input(n, 0)?, input(n, 1)?, input(n, 2));
    let b = dequantize(out, input(n, 3)?, input(n, 4)?, input(n, 5));
    let c = out.op(op, &[&a, &b], vec![]);
    quantize_to(out, &c, input(n, 6)?, input(n, 7), output(n, 0)?);
    Some(())
}

/// `Y_scale, Y_zero, (X, X_scale, X_zero)…` → `Q(Concat(DQ(X)…))`.
fn quantized_concat(n: &pb::NodeProto, out: &mut Out) -> Option<()> {
    if n.input.len() < 5 || !(n.input.len() - 2).is_multiple_of(3) {
        return None;
    }
    let mut parts = Vec::new();
    for k in (2..n.input.len()).step_by(3) {
        parts.push(dequantize(
            out,
            input(n, k)?,
            input(n, k + 1)?,
            input(n, k + 2),
        ));
    }
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let y = out.op("Concat", &parts, copied(n, &["axis"]));
    quantize_to(out, &y, input(n, 0)?, input(n, 1), output(n, 0)?);
    Some(())
}

/// `QGemm(A, A_scale, A_zero, B, B_scale, B_zero, C?, Y_scale?, Y_zero?)`: the `i32` bias
/// is at scale `A_scale · B_scale`; without `Y_scale` the output stays float.
fn qgemm(n: &pb::NodeProto, out: &mut Out) -> Option<()> {
    let trans_b = attr_i(n, "transB", 0);
    let a = dequantize(out, input(n, 0)?, input(n, 1)?, input(n, 2));
    // A per-column weight scale runs along N: axis 0 of a transposed B, else axis 1.
    let b_zero = input(n, 5);
    let axis = vec![int_attr("axis", if trans_b == 1 { 0 } else { 1 })];
    let b = match b_zero {
        Some(z) => out.op("DequantizeLinear", &[input(n, 3)?, input(n, 4)?, z], axis),
        None => out.op("DequantizeLinear", &[input(n, 3)?, input(n, 4)?], axis),
    };
    let mut inputs = vec![a, b];
    if let Some(c) = input(n, 6) {
        let c = out.op("Cast", &[c], vec![int_attr("to", FLOAT)]);
        let c = out.op("Mul", &[&c, input(n, 1)?], vec![]);
        inputs.push(out.op("Mul", &[&c, input(n, 4)?], vec![]));
    }
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let attrs = copied(n, &["alpha", "transA", "transB"]);
    match input(n, 7) {
        Some(y_scale) => {
            let y = out.op("Gemm", &inputs, attrs);
            quantize_to(out, &y, y_scale, input(n, 8), output(n, 0)?);
        }
        None => out.op_to("Gemm", &inputs, output(n, 0)?, attrs),
    }
    Some(())
}

/// `Cast(product) · a_scale · b_scale (+ bias)` into the node's output.
fn scaled_product(
    n: &pb::NodeProto,
    out: &mut Out,
    product: &str,
    a_scale: &str,
    b_scale: &str,
    bias: Option<&str>,
) -> Option<()> {
    let y = out.op("Cast", &[product], vec![int_attr("to", FLOAT)]);
    let y = out.op("Mul", &[&y, a_scale], vec![]);
    match bias {
        Some(bias) => {
            let y = out.op("Mul", &[&y, b_scale], vec![]);
            out.op_to("Add", &[&y, bias], output(n, 0)?, vec![]);
        }
        None => out.op_to("Mul", &[&y, b_scale], output(n, 0)?, vec![]),
    }
    Some(())
}

/// `FusedConv`: `activation(Conv(X, W, B) + Z)`.
fn fused_conv(n: &pb::NodeProto, out: &mut Out) -> Option<()> {
    let params: Vec<f32> = attr(n, "activation_params").map_or(Vec::new(), |a| a.floats.clone());
    let activation = attr(n, "activation")
        .map(|a| String::from_utf8_lossy(&a.s).into_owned())
        .unwrap_or_default();
    let conv_attrs = copied(
        n,
        &[
            "auto_pad",
            "dilations",
            "group",
            "kernel_shape",
            "pads",
            "strides",
        ],
    );
    let mut conv_inputs = vec![input(n, 0)?, input(n, 1)?];
    conv_inputs.extend(input(n, 2));
    let mut y = out.op("Conv", &conv_inputs, conv_attrs);
    if let Some(z) = input(n, 3) {
        y = out.op("Add", &[&y, z], vec![]);
    }
    let param = |i: usize, default: f32| params.get(i).copied().unwrap_or(default);
    let target = output(n, 0)?;
    match activation.as_str() {
        "" => out.op_to("Identity", &[&y], target, vec![]),
        "Relu" | "Tanh" | "Sigmoid" => out.op_to(&activation, &[&y], target, vec![]),
        "LeakyRelu" => out.op_to(
            "LeakyRelu",
            &[&y],
            target,
            vec![float_attr("alpha", param(0, 0.01))],
        ),
        "HardSigmoid" => out.op_to(
            "HardSigmoid",
            &[&y],
            target,
            vec![
                float_attr("alpha", param(0, 0.2)),
                float_attr("beta", param(1, 0.5)),
            ],
        ),
        "Clip" => {
            let (lo, hi) = (param(0, f32::MIN), param(1, f32::MAX));
            if out.opset >= 11 {
                let (lo, hi) = (out.scalar(lo), out.scalar(hi));
                out.op_to("Clip", &[&y, &lo, &hi], target, vec![]);
            } else {
                let attrs = vec![float_attr("min", lo), float_attr("max", hi)];
                out.op_to("Clip", &[&y], target, attrs);
            }
        }
        _ => return None,
    }
    Some(())
}

/// Contrib `DynamicQuantizeLSTM`: an `LSTM` whose weights are stored in 8 bits, laid out
/// `[directions, input, 4·hidden]` (transposed from `LSTM`'s), with per-direction or per-
/// column scales and zero points. Rewritten to the `LSTM` of the dequantized weights;
/// onnxruntime also quantizes the activations at each step, which this does not (so
/// outputs differ by that rounding).
fn dynamic_quantize_lstm(n: &pb::NodeProto, out: &mut Out) -> Option<()> {
    let dequantized = |out: &mut Out, w: &str, scale: &str, zero: &str| {
        let w = out.op("Cast", &[w], vec![int_attr("to", FLOAT)]);
        let zero = out.op("Cast", &[zero], vec![int_attr("to", FLOAT)]);
        // [D] or [D, 4H] → [D, 1, 1] or [D, 1, 4H], broadcasting over the input axis.
        let zero = out.reshape(&zero, &[0, 1, -1]);
        let scale = out.reshape(scale, &[0, 1, -1]);
        let centred = out.op("Sub", &[&w, &zero], vec![]);
        let w = out.op("Mul", &[&centred, &scale], vec![]);
        out.transpose(&w, &[0, 2, 1])
    };
    let w = dequantized(out, input(n, 1)?, input(n, 8)?, input(n, 9)?);
    let r = dequantized(out, input(n, 2)?, input(n, 10)?, input(n, 11)?);
    let mut inputs: Vec<&str> = vec![input(n, 0)?, &w, &r];
    inputs.extend((3..8).map(|i| input(n, i).unwrap_or("")));
    while inputs.last() == Some(&"") {
        inputs.pop();
    }
    let outputs: Vec<&str> = n.output.iter().map(String::as_str).collect();
    let attrs = copied(
        n,
        &[
            "activation_alpha",
            "activation_beta",
            "activations",
            "clip",
            "direction",
            "hidden_size",
            "input_forget",
        ],
    );
    let name = out.node_name();
    out.push(node("LSTM", &name, &inputs, &outputs, attrs));
    Some(())
}

/// Scaled dot-product attention over heads: `q`, `k`, `v` are `[B, S, N·d]`; writes
/// `[B, S, N·d]` into `target`. `mask_2d` is a `[B, S_kv]` 1/0 key mask (0 masked, adding
/// `mask_filter_value` as onnxruntime does).
fn heads_attention(
    n: &pb::NodeProto,
    out: &mut Out,
    (q, k, v): (&str, &str, &str),
    mask_2d: Option<&str>,
    target: &str,
) -> Option<()> {
    let heads = attr_i(n, "num_heads", 0);
    (heads > 0).then_some(())?;
    let split = |out: &mut Out, x: &str| out.reshape(x, &[0, 0, heads, -1]);
    let (q, k, v) = (split(out, q), split(out, k), split(out, v));
    let q = out.transpose(&q, &[0, 2, 1, 3]);
    let kt = out.transpose(&k, &[0, 2, 3, 1]);
    let v = out.transpose(&v, &[0, 2, 1, 3]);
    let scores = out.op("MatMul", &[&q, &kt], vec![]);
    let scale = match attr(n, "scale").map(|a| a.f).filter(|s| *s != 0.0) {
        Some(s) => out.scalar(s),
        None => {
            // 1/√d, d read from q's shape at run time.
            let shape = out.op("Shape", &[&q], vec![]);
            let last = out.ints(&[3], &[]);
            let d = out.op("Gather", &[&shape, &last], vec![]);
            let d = out.op("Cast", &[&d], vec![int_attr("to", FLOAT)]);
            let root = out.op("Sqrt", &[&d], vec![]);
            out.op("Reciprocal", &[&root], vec![])
        }
    };
    let mut scores = out.op("Mul", &[&scores, &scale], vec![]);
    if let Some(mask) = mask_2d {
        let keep = out.op("Cast", &[mask], vec![int_attr("to", FLOAT)]);
        let one = out.scalar(1.0);
        let dropped = out.op("Sub", &[&one, &keep], vec![]);
        let filter = out.scalar(attr_f(n, "mask_filter_value", -10000.0));
        let bias = out.op("Mul", &[&dropped, &filter], vec![]);
        let bias = out.reshape(&bias, &[0, 1, 1, -1]);
        scores = out.op("Add", &[&scores, &bias], vec![]);
    }
    let weights = out.op("Softmax", &[&scores], vec![int_attr("axis", -1)]);
    let o = out.op("MatMul", &[&weights, &v], vec![]);
    let o = out.transpose(&o, &[0, 2, 1, 3]);
    let shape = out.ints(&[0, 0, -1], &[3]);
    out.op_to("Reshape", &[&o, &shape], target, vec![]);
    Some(())
}

/// A 2-D key mask input, or no mask; `None` for other mask forms (1-D lengths, 3-D/4-D)
/// and for a mask whose rank the model does not declare.
fn mask_2d<'n>(n: &'n pb::NodeProto, at: usize, out: &Out) -> Option<Option<&'n str>> {
    match input(n, at) {
        None => Some(None),
        Some(mask) => (out.ranks.get(mask) == Some(&2)).then_some(Some(mask)),
    }
}

/// Contrib `Attention(input, weights, bias?, mask_index?)`: the packed Q/K/V projection,
/// then attention over `num_heads` heads. Past/present caches, attention bias, causal
/// (`unidirectional`) attention, unequal `qkv_hidden_sizes` and rotary embeddings are not
/// rewritten.
fn attention(n: &pb::NodeProto, out: &mut Out) -> Option<()> {
    let unsupported = attr_i(n, "unidirectional", 0) != 0
        || attr_i(n, "do_rotary", 0) != 0
        || attr(n, "qkv_hidden_sizes").is_some()
        || (4..n.input.len()).any(|i| input(n, i).is_some())
        || (1..n.output.len()).any(|i| output(n, i).is_some());
    if unsupported {
        return None;
    }
    let mask = mask_2d(n, 3, out)?;
    let mut qkv = out.op("MatMul", &[input(n, 0)?, input(n, 1)?], vec![]);
    if let Some(bias) = input(n, 2) {
        qkv = out.op("Add", &[&qkv, bias], vec![]);
    }
    let (q, k, v) = (out.fresh(), out.fresh(), out.fresh());
    let name = out.node_name();
    out.push(node(
        "Split",
        &name,
        &[&qkv],
        &[&q, &k, &v],
        vec![int_attr("axis", -1)],
    ));
    if out.opset >= 18 {
        // Opset 18 requires the number of outputs when no sizes are given.
        if let Some(split) = out.nodes.last_mut() {
            split.attribute.push(int_attr("num_outputs", 3));
        }
    }
    heads_attention(n, out, (&q, &k, &v), mask, output(n, 0)?)
}

/// Contrib `MultiHeadAttention(query, key, value)` with separate `[B, S, H]` projections
/// and no bias, mask, cache or attention bias.
fn multi_head_attention(n: &pb::NodeProto, out: &mut Out) -> Option<()> {
    let unsupported = attr_i(n, "unidirectional", 0) != 0
        || (3..n.input.len()).any(|i| input(n, i).is_some())
        || (1..n.output.len()).any(|i| output(n, i).is_some());
    if unsupported {
        return None;
    }
    let qkv = (input(n, 0)?, input(n, 1)?, input(n, 2)?);
    heads_attention(n, out, qkv, None, output(n, 0)?)
}

/// Contrib `EmbedLayerNormalization`: word + position (+ segment) embeddings, then layer
/// normalization; its `mask_index` output is the mask's row sums (zeros without a mask).
fn embed_layer_normalization(n: &pb::NodeProto, out: &mut Out) -> Option<()> {
    let ids = input(n, 0)?;
    let words = out.op("Gather", &[input(n, 2)?, ids], vec![]);
    let positions = match input(n, 8) {
        Some(position_ids) => out.op("Gather", &[input(n, 3)?, position_ids], vec![]),
        None => {
            let shape = out.op("Shape", &[ids], vec![]);
            let one = out.ints(&[1], &[]);
            let len = out.op("Gather", &[&shape, &one], vec![]);
            let (zero, step) = (out.ints(&[0], &[]), out.ints(&[1], &[]));
            let range = out.op("Range", &[&zero, &len, &step], vec![]);
            out.op("Gather", &[input(n, 3)?, &range], vec![])
        }
    };
    let mut sum = out.op("Add", &[&words, &positions], vec![]);
    if let (Some(segments), Some(table)) = (input(n, 1), input(n, 4)) {
        let seg = out.op("Gather", &[table, segments], vec![]);
        sum = out.op("Add", &[&sum, &seg], vec![]);
    }
    let attrs = vec![
        int_attr("axis", -1),
        float_attr("epsilon", attr_f(n, "epsilon", 1e-12)),
    ];
    out.op_to(
        "LayerNormalization",
        &[&sum, input(n, 5)?, input(n, 6)?],
        output(n, 0)?,
        attrs,
    );
    if let Some(mask_index) = output(n, 1) {
        match input(n, 7) {
            Some(mask) => {
                let mask = out.op("Cast", &[mask], vec![int_attr("to", INT32)]);
                if out.opset >= 13 {
                    let axes = out.ints(&[1], &[1]);
                    let keep = vec![int_attr("keepdims", 0)];
                    out.op_to("ReduceSum", &[&mask, &axes], mask_index, keep);
                } else {
                    let attrs = vec![ints_attr("axes", &[1]), int_attr("keepdims", 0)];
                    out.op_to("ReduceSum", &[&mask], mask_index, attrs);
                }
            }
            None => {
                let shape = out.op("Shape", &[ids], vec![]);
                let (start, end) = (out.ints(&[0], &[1]), out.ints(&[1], &[1]));
                let batch = out.op("Slice", &[&shape, &start, &end], vec![]);
                let zero = pb::AttributeProto {
                    name: "value".into(),
                    r#type: pb::attribute_proto::AttributeType::Tensor as i32,
                    t: Some(crate::onnx::tensor("zero", INT32 as i32, &[1], vec![0; 4])),
                    ..Default::default()
                };
                out.op_to("ConstantOfShape", &[&batch], mask_index, vec![zero]);
            }
        }
    }
    if let Some(embedding_sum) = output(n, 2) {
        out.op_to("Identity", &[&sum], embedding_sum, vec![]);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contrib(op: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
        pb::NodeProto {
            domain: MS.into(),
            ..node(op, "n", inputs, outputs, vec![])
        }
    }

    fn model(nodes: Vec<pb::NodeProto>) -> pb::ModelProto {
        pb::ModelProto {
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(pb::GraphProto {
                node: nodes,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_quantized_add_becomes_dequantize_add_quantize_writing_the_same_output() {
        let mut m = model(vec![contrib(
            "QLinearAdd",
            &["a", "as", "az", "b", "bs", "bz", "cs", "cz"],
            &["c"],
        )]);
        assert_eq!(decompose(&mut m), 1);
        let nodes = &m.graph.as_ref().unwrap().node;
        let ops: Vec<&str> = nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            [
                "DequantizeLinear",
                "DequantizeLinear",
                "Add",
                "QuantizeLinear"
            ]
        );
        assert!(nodes.iter().all(|n| n.domain.is_empty()));
        assert_eq!(nodes.last().unwrap().output, ["c"]);
    }

    #[test]
    fn uncovered_forms_and_other_domains_are_left_alone() {
        let mut causal = contrib("Attention", &["x", "w", "b"], &["y"]);
        causal.attribute = vec![int_attr("num_heads", 2), int_attr("unidirectional", 1)];
        let mut channels_last = contrib(
            "QLinearGlobalAveragePool",
            &["x", "s", "z", "ys", "yz"],
            &["y2"],
        );
        channels_last.attribute = vec![int_attr("channels_last", 1)];
        let plain = node("Add", "add", &["a", "b"], &["c"], vec![]);
        let mut m = model(vec![causal, channels_last, plain]);
        let before = m.clone();
        assert_eq!(decompose(&mut m), 0);
        assert_eq!(m, before);
    }
}
