//! Dynamic int8 quantization of `MatMul` and `Gemm` with constant weights: weights stored as
//! symmetric int8 (per output column by default), activations quantized at run time.
//!
//! ```text
//! A ─ DynamicQuantizeLinear ─ A_q, A_scale, A_zp ─┐
//!                         W_q (int8, [K, N]), 0 ──┴─ MatMulInteger ─ Cast(f32) ─ Mul ─ (+ bias) ─ Y
//!                              A_scale × W_scale[N] ─────────────────────────────┘
//! ```
//! Only standard ONNX operators (opset ≥ 11), so the result also runs in onnxruntime.

use tract_onnx::pb;

use crate::error::{QuantizeError, Result};
use crate::graph::{self, attr_i, f32_tensor, int_attr, node, tensor, FLOAT, INT8};

/// Options for [`quantize_dynamic`].
#[derive(Debug, Clone)]
pub struct DynamicOptions {
    /// One scale per output column (true, default) or one per tensor.
    pub per_channel: bool,
    /// Nodes (by name or op type) to leave in float.
    pub exclude: graph::Exclusions,
}

impl Default for DynamicOptions {
    fn default() -> Self {
        DynamicOptions {
            per_channel: true,
            exclude: Default::default(),
        }
    }
}

/// Quantizes every eligible `MatMul`/`Gemm`; returns how many were converted.
pub fn quantize_dynamic(model: &mut pb::ModelProto, options: &DynamicOptions) -> Result<usize> {
    graph::ensure_not_quantized(model)?;
    if tern::onnx::default_opset(model) < 11 {
        return Err(QuantizeError::InvalidModel(
            "dynamic quantization needs opset ≥ 11 (DynamicQuantizeLinear); upgrade the model first".into(),
        ));
    }
    let converted = replace_weights(model, &options.exclude, |n, ix, values, k, cols| {
        let mut nodes = Vec::new();
        let mut new_inits = Vec::new();
        let (q, scales) = graph::quantize_symmetric_int8(
            values,
            &[k as i64, cols as i64],
            1,
            options.per_channel,
        );
        let p = format!(
            "{}_dq{ix}",
            if n.name.is_empty() { "node" } else { &n.name }
        );
        let (a, y) = (n.input[0].clone(), n.output[0].clone());
        new_inits.push(tensor(
            &format!("{p}_W_q"),
            INT8,
            &[k as i64, cols as i64],
            q.iter().map(|v| *v as u8).collect(),
        ));
        new_inits.push(tensor(&format!("{p}_W_zp"), INT8, &[], vec![0]));
        new_inits.push(f32_tensor(
            &format!("{p}_W_scale"),
            &[scales.len() as i64],
            &scales,
        ));
        let names = |s: &str| format!("{p}_{s}");
        nodes.push(node(
            "DynamicQuantizeLinear",
            &names("dql"),
            &[&a],
            &[&names("A_q"), &names("A_scale"), &names("A_zp")],
            vec![],
        ));
        nodes.push(node(
            "MatMulInteger",
            &names("mmi"),
            &[
                &names("A_q"),
                &format!("{p}_W_q"),
                &names("A_zp"),
                &format!("{p}_W_zp"),
            ],
            &[&names("Y_i32")],
            vec![],
        ));
        nodes.push(node(
            "Cast",
            &names("cast"),
            &[&names("Y_i32")],
            &[&names("Y_f")],
            vec![int_attr("to", FLOAT as i64)],
        ));
        nodes.push(node(
            "Mul",
            &names("scale"),
            &[&names("A_scale"), &format!("{p}_W_scale")],
            &[&names("S")],
            vec![],
        ));
        let bias = (n.op_type == "Gemm")
            .then(|| n.input.get(2).filter(|b| !b.is_empty()).cloned())
            .flatten();
        match bias {
            Some(b) => {
                nodes.push(node(
                    "Mul",
                    &names("rescale"),
                    &[&names("Y_f"), &names("S")],
                    &[&names("Y_nb")],
                    vec![],
                ));
                nodes.push(node(
                    "Add",
                    &names("bias"),
                    &[&names("Y_nb"), &b],
                    &[&y],
                    vec![],
                ));
            }
            None => nodes.push(node(
                "Mul",
                &names("rescale"),
                &[&names("Y_f"), &names("S")],
                &[&y],
                vec![],
            )),
        }
        (nodes, new_inits)
    })?;
    graph::share_identical_initializers(graph::graph_mut(model));
    Ok(converted)
}

/// Replaces every `MatMul`/`Gemm` whose weight [`matmul_weight`] finds with the nodes and
/// initializers `replace` returns for it (given the node, its index, its `[K, N]` weight,
/// K and N): the loop both weight-only modes share. Returns how many were replaced.
pub(crate) fn replace_weights(
    model: &mut pb::ModelProto,
    exclude: &graph::Exclusions,
    mut replace: impl FnMut(
        &pb::NodeProto,
        usize,
        &[f32],
        usize,
        usize,
    ) -> (Vec<pb::NodeProto>, Vec<pb::TensorProto>),
) -> Result<usize> {
    let g = graph::graph_mut(model);
    graph::constants_to_initializers(g);
    let inits = graph::initializers(g);
    let mut nodes = Vec::with_capacity(g.node.len());
    let mut new_inits = Vec::new();
    let mut converted = 0;
    for (ix, n) in std::mem::take(&mut g.node).into_iter().enumerate() {
        let Some((values, k, cols)) = matmul_weight(&n, &inits, exclude) else {
            nodes.push(n);
            continue;
        };
        let (replaced, added) = replace(&n, ix, &values, k, cols);
        nodes.extend(replaced);
        new_inits.extend(added);
        converted += 1;
    }
    g.node = nodes;
    g.initializer.extend(new_inits);
    graph::prune_initializers(g);
    if converted == 0 {
        return Err(QuantizeError::NothingToDo(
            "no MatMul/Gemm with a constant 2-D weight".into(),
        ));
    }
    Ok(converted)
}

/// The constant weight of a `MatMul`, or of a `Gemm` that is one (no `transA`, `alpha` and
/// `beta` 1), as `[K, N]` row-major values with K and N: what weight-only quantization
/// replaces. `None` for any other node, or one `exclude` keeps in float.
pub(crate) fn matmul_weight(
    n: &pb::NodeProto,
    inits: &std::collections::HashMap<String, pb::TensorProto>,
    exclude: &graph::Exclusions,
) -> Option<(Vec<f32>, usize, usize)> {
    let eligible = matches!(n.op_type.as_str(), "MatMul" | "Gemm")
        && exclude.allows(n)
        && (n.op_type == "MatMul"
            || (attr_i(n, "transA", 0) == 0
                && n.attribute
                    .iter()
                    .all(|a| !matches!(a.name.as_str(), "alpha" | "beta") || a.f == 1.0)));
    let w = n
        .input
        .get(1)
        .and_then(|w| inits.get(w))
        .filter(|t| t.dims.len() == 2 && eligible)?;
    let values = graph::f32_values(w)?;
    let (k, cols) = (w.dims[0] as usize, w.dims[1] as usize);
    if n.op_type == "Gemm" && attr_i(n, "transB", 0) == 1 {
        // Stored [N, K]: transpose to [K, N].
        let t = (0..k * cols)
            .map(|i| values[(i % k) * cols + i / k])
            .collect();
        return Some((t, cols, k));
    }
    Some((values, k, cols))
}

#[cfg(test)]
mod tests {
    use crate::graph;

    #[test]
    fn weights_round_trip_within_half_a_step() {
        let w: Vec<f32> = (0..12)
            .map(|i| (i as f32 - 5.5) * [0.1, 1.0, 10.0][i % 3])
            .collect();
        let (q, s) = graph::quantize_symmetric_int8(&w, &[4, 3], 1, true);
        assert_eq!(s.len(), 3);
        for (i, v) in w.iter().enumerate() {
            let back = f32::from(q[i]) * s[i % 3];
            assert!((back - v).abs() <= s[i % 3] / 2.0 + 1e-6, "{v} -> {back}");
        }
        let (_, s) = graph::quantize_symmetric_int8(&w, &[4, 3], 1, false);
        assert_eq!(s.len(), 1);
    }
}
