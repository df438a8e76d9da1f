//! Static int8 quantization in QDQ form, calibrated by running the fp32 model through tern.
//!
//! For every `Conv` and `MatMul` with a constant weight:
//! - the weight is stored as symmetric int8 — per output channel when the opset allows
//!   (`DequantizeLinear`'s `axis` needs opset ≥ 13), else per tensor — behind a
//!   `DequantizeLinear`;
//! - its activation input gets a `QuantizeLinear → DequantizeLinear` pair with an asymmetric
//!   uint8 scale from the range chosen on the calibration inputs (MinMax, Percentile or
//!   Entropy: see [`crate::calibration`]).
//!
//! Softmax and everything else stay in float (tract mis-runs a quantized Softmax; see
//! docs/MODELS.md). The result is standard ONNX that onnxruntime runs too.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;

use crate::calibration;
pub use crate::calibration::{Calibration, Ranges};
use crate::error::{QuantizeError, Result};
use crate::graph::{self, f32_tensor, int_attr, node, tensor, INT8, UINT8};

/// Options for [`quantize_static`].
#[derive(Debug, Clone, Default)]
pub struct StaticOptions {
    /// Node names to leave in float.
    pub exclude_nodes: HashSet<String>,
    /// Op types to leave in float (`Conv`, `MatMul`).
    pub exclude_ops: HashSet<String>,
    /// When set, quantize only these nodes (the sensitivity analysis quantizes one at a time).
    pub only_nodes: Option<HashSet<String>>,
    /// How activation ranges are chosen from the calibration data.
    pub calibration: Calibration,
}

/// The names of the nodes `options` lets through, in graph order, with their op types.
pub fn quantizable_nodes(model: &pb::ModelProto, options: &StaticOptions) -> Vec<(String, String)> {
    let mut g = model.graph.clone().unwrap_or_default();
    graph::constants_to_initializers(&mut g);
    targets(&g, options)
        .into_iter()
        .map(|(ix, _, _)| (g.node[ix].name.clone(), g.node[ix].op_type.clone()))
        .collect()
}

/// The nodes to quantize: `(node index, activation input, weight initializer)`.
fn targets(g: &pb::GraphProto, options: &StaticOptions) -> Vec<(usize, String, String)> {
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    g.node
        .iter()
        .enumerate()
        .filter(|(_, n)| matches!(n.op_type.as_str(), "Conv" | "MatMul"))
        .filter(|(_, n)| {
            !options.exclude_nodes.contains(&n.name)
                && !options.exclude_ops.contains(&n.op_type)
                && options
                    .only_nodes
                    .as_ref()
                    .is_none_or(|o| o.contains(&n.name))
        })
        .filter(|(_, n)| {
            n.input.len() >= 2
                && !inits.contains(n.input[0].as_str())
                && inits.contains(n.input[1].as_str())
        })
        .map(|(i, n)| (i, n.input[0].clone(), n.input[1].clone()))
        .collect()
}

/// Runs the fp32 model through tern on `samples` and returns, for the input activation of
/// every node to quantize, the range that `options.calibration` chooses.
pub fn calibrate(
    model: &pb::ModelProto,
    samples: &[Vec<(String, tern::Tensor)>],
    options: &StaticOptions,
) -> Result<Ranges> {
    let mut g = model.graph.clone().unwrap_or_default();
    graph::constants_to_initializers(&mut g);
    let mut seen = HashSet::new();
    let wanted: Vec<String> = targets(&g, options)
        .into_iter()
        .map(|(_, a, _)| a)
        .filter(|a| seen.insert(a.clone()))
        .collect();
    if wanted.is_empty() {
        return Err(QuantizeError::NothingToDo(
            "no Conv/MatMul with a constant weight to calibrate".into(),
        ));
    }
    calibration::calibrate(model, &wanted, samples, options.calibration)
}

/// uint8 asymmetric scale and zero point covering `[min, max]` (and 0).
pub fn activation_params(min: f32, max: f32) -> (f32, u8) {
    let (lo, hi) = (min.min(0.0), max.max(0.0));
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    (scale, (-lo / scale).round().clamp(0.0, 255.0) as u8)
}

/// Rewrites `model` to QDQ int8 using calibrated `ranges`; returns how many nodes changed.
pub fn quantize_static(
    model: &mut pb::ModelProto,
    ranges: &Ranges,
    options: &StaticOptions,
) -> Result<usize> {
    graph::ensure_not_quantized(model)?;
    let opset = graph::opset(model);
    if opset < 10 {
        return Err(QuantizeError::InvalidModel(
            "QDQ quantization needs opset ≥ 10".into(),
        ));
    }
    let per_channel = opset >= 13;
    let g = graph::graph_mut(model);
    graph::constants_to_initializers(g);
    let inits = graph::initializers(g);
    let todo = targets(g, options);
    let mut new_nodes: Vec<pb::NodeProto> = Vec::new();
    let mut new_inits = Vec::new();
    let mut activation_dq: HashMap<String, String> = HashMap::new();
    let mut rewired: Vec<(usize, String, String)> = Vec::new();
    for (ix, act, weight) in &todo {
        let Some(&(lo, hi)) = ranges.get(act) else {
            continue;
        };
        let w = &inits[weight];
        let Some(values) = graph::f32_values(w) else {
            continue;
        };
        let op = g.node[*ix].op_type.clone();
        let axis = if op == "Conv" {
            0
        } else {
            w.dims.len().saturating_sub(1)
        };
        let act_dq = activation_dq.entry(act.clone()).or_insert_with(|| {
            let (scale, zp) = activation_params(lo, hi);
            let p = format!("{act}_qdq");
            new_inits.push(f32_tensor(&format!("{p}_scale"), &[], &[scale]));
            new_inits.push(tensor(&format!("{p}_zp"), UINT8, &[], vec![zp]));
            let (s, z, q, dq) = (
                format!("{p}_scale"),
                format!("{p}_zp"),
                format!("{p}_q"),
                format!("{p}_dq"),
            );
            new_nodes.push(node(
                "QuantizeLinear",
                &format!("{p}_Q"),
                &[act, &s, &z],
                &[&q],
                vec![],
            ));
            new_nodes.push(node(
                "DequantizeLinear",
                &format!("{p}_DQ"),
                &[&q, &s, &z],
                &[&dq],
                vec![],
            ));
            dq
        });
        let (q, scales) = graph::quantize_symmetric_int8(&values, &w.dims, axis, per_channel);
        let p = format!("{weight}_qdq{ix}");
        let zp_dims: &[i64] = if per_channel {
            &[scales.len() as i64]
        } else {
            &[]
        };
        new_inits.push(tensor(
            &format!("{p}_q"),
            INT8,
            &w.dims,
            q.iter().map(|v| *v as u8).collect(),
        ));
        new_inits.push(f32_tensor(&format!("{p}_scale"), zp_dims, &scales));
        new_inits.push(tensor(
            &format!("{p}_zp"),
            INT8,
            zp_dims,
            vec![0; scales.len()],
        ));
        let attrs = if per_channel {
            vec![int_attr("axis", axis as i64)]
        } else {
            vec![]
        };
        let dq = format!("{p}_dq");
        new_nodes.push(node(
            "DequantizeLinear",
            &format!("{p}_DQ"),
            &[&format!("{p}_q"), &format!("{p}_scale"), &format!("{p}_zp")],
            &[&dq],
            attrs,
        ));
        rewired.push((*ix, act_dq.clone(), dq));
    }
    if rewired.is_empty() {
        return Err(QuantizeError::NothingToDo(
            "no Conv/MatMul with a constant weight and a calibrated input".into(),
        ));
    }
    for (ix, act, w) in &rewired {
        g.node[*ix].input[0] = act.clone();
        g.node[*ix].input[1] = w.clone();
    }
    // Q/DQ nodes only read graph inputs, initializers and the activations they follow, so
    // placing each right before its first consumer keeps the graph topologically sorted.
    let mut placed: Vec<pb::NodeProto> = Vec::with_capacity(g.node.len() + new_nodes.len());
    let mut pending = new_nodes;
    for n in std::mem::take(&mut g.node) {
        let needed: Vec<usize> = (0..pending.len())
            .filter(|i| pending[*i].output.iter().any(|o| n.input.contains(o)))
            .collect();
        // A DQ consumer needs its Q too: pull in producers of what the needed nodes read.
        let mut take: Vec<usize> = needed.clone();
        for i in &needed {
            for j in 0..pending.len() {
                if pending[j]
                    .output
                    .iter()
                    .any(|o| pending[*i].input.contains(o))
                    && !take.contains(&j)
                {
                    take.push(j);
                }
            }
        }
        take.sort_unstable();
        let mut taken: Vec<pb::NodeProto> = Vec::new();
        for i in take.into_iter().rev() {
            taken.push(pending.remove(i));
        }
        // Producers (Q) before consumers (DQ): Q nodes sort first by op type.
        taken.sort_by_key(|x| x.op_type != "QuantizeLinear");
        placed.extend(taken);
        placed.push(n);
    }
    placed.extend(pending);
    g.node = placed;
    g.initializer.extend(new_inits);
    graph::prune_initializers(g);
    Ok(rewired.len())
}
