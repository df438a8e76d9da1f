//! Static int8 quantization, calibrated by running the fp32 model through tern, in QDQ form
//! (the default) or QOperator form ([`Format`]).
//!
//! QDQ — for every `Conv`, `ConvTranspose` and `MatMul` with a constant weight:
//! - the weight is stored as symmetric int8 — per output channel (`DequantizeLinear`'s
//!   `axis` needs opset 13, so older models are upgraded to it first), or per tensor on
//!   request — behind a `DequantizeLinear`;
//! - its activation input gets a `QuantizeLinear → DequantizeLinear` pair with an asymmetric
//!   uint8 scale from the range chosen on the calibration inputs (MinMax, Percentile or
//!   Entropy: see [`crate::calibration`]).
//!
//! QOperator — each such node becomes `QLinearConv`/`QLinearMatMul` reading the uint8
//! activation and int8 weights (per channel for `QLinearConv`), with its output quantized by
//! its own calibrated range and dequantized for the float ops after it; a `Conv` bias becomes
//! int32 at scale `x_scale × w_scale`.
//!
//! Identical constants (exporters repeat an activation's `3.0` and `6.0` per layer) are
//! stored once ([`graph::share_identical_initializers`]).
//!
//! Softmax and everything else stay in float (tract mis-runs a quantized Softmax; see
//! docs/MODELS.md). The result is standard ONNX that onnxruntime runs too.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;

use crate::calibration;
pub use crate::calibration::{Calibration, Ranges};
use crate::error::{QuantizeError, Result};
use crate::graph::{self, f32_tensor, int_attr, node, tensor, INT32, INT8, UINT8};

/// Options for [`quantize_static`].
#[derive(Debug, Clone, Default)]
pub struct StaticOptions {
    /// Nodes (by name or op type) to leave in float.
    pub exclude: graph::Exclusions,
    /// When set, quantize only these nodes (the sensitivity analysis quantizes one at a time).
    pub only_nodes: Option<HashSet<String>>,
    /// How activation ranges are chosen from the calibration data.
    pub calibration: Calibration,
    /// The form of the quantized graph.
    pub format: Format,
    /// One weight scale per tensor. By default QDQ weights get one per output channel, and a
    /// model below opset 13 is upgraded to 13 for it ([`graph::upgrade_to_opset13`]).
    pub per_tensor: bool,
}

/// The form of a statically quantized graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// `QuantizeLinear → DequantizeLinear` pairs around float ops: portable, what
    /// onnxruntime prefers, and what tract runs faster (QUANTIZATION.md).
    #[default]
    Qdq,
    /// `QLinearConv` / `QLinearMatMul` with quantized inputs and outputs.
    QOperator,
}

impl std::str::FromStr for Format {
    type Err = QuantizeError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "qdq" => Ok(Self::Qdq),
            "qoperator" | "qop" => Ok(Self::QOperator),
            _ => Err(QuantizeError::BadArgument(format!(
                "format {s:?}: expected qdq or qoperator"
            ))),
        }
    }
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
        .filter(|(_, n)| match n.op_type.as_str() {
            "Conv" | "MatMul" => true,
            // No QLinearConvTranspose exists; in QDQ its weight is stored as int8 like a Conv's.
            "ConvTranspose" => options.format == Format::Qdq,
            _ => false,
        })
        .filter(|(_, n)| {
            options.exclude.allows(n)
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
    // QOperator nodes quantize their outputs too.
    let wanted: Vec<String> = targets(&g, options)
        .into_iter()
        .flat_map(|(ix, a, _)| {
            let out = g.node[ix].output.first().cloned();
            std::iter::once(a).chain(out.filter(|_| options.format == Format::QOperator))
        })
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

/// The names a node's quantized activation input, scale and zero point go by.
struct QuantizedActivation {
    q: String,
    scale: String,
    zp: String,
    dq: String,
}

/// Rewrites `model` to int8 using calibrated `ranges`, in `options.format`; returns how many
/// nodes changed.
pub fn quantize_static(
    model: &mut pb::ModelProto,
    ranges: &Ranges,
    options: &StaticOptions,
) -> Result<usize> {
    graph::ensure_not_quantized(model)?;
    let mut opset = tern::onnx::default_opset(model);
    let qoperator = options.format == Format::QOperator;
    if !options.per_tensor && !qoperator && opset < 13 && graph::upgrade_to_opset13(model).is_ok() {
        opset = 13;
    }
    if opset < 10 {
        return Err(QuantizeError::InvalidModel(
            "static int8 quantization needs opset ≥ 10 (QuantizeLinear, QLinearConv)".into(),
        ));
    }
    let g = graph::graph_mut(model);
    graph::constants_to_initializers(g);
    let inits = graph::initializers(g);
    let todo = targets(g, options);
    let mut new_nodes: Vec<pb::NodeProto> = Vec::new();
    let mut new_inits = Vec::new();
    let mut activations: HashMap<String, QuantizedActivation> = HashMap::new();
    let mut quantized_weights: HashSet<String> = HashSet::new();
    let taken = graph::tensor_names(g);
    let mut changed = 0;
    for (ix, act, weight) in &todo {
        let Some(&(lo, hi)) = ranges.get(act) else {
            continue;
        };
        let out_name = g.node[*ix].output.first().cloned().unwrap_or_default();
        let out_range = ranges.get(&out_name).copied();
        if qoperator && out_range.is_none() {
            continue;
        }
        let w = &inits[weight];
        let Some(values) = graph::f32_values(w) else {
            continue;
        };
        let op = g.node[*ix].op_type.as_str();
        let is_conv = op == "Conv";
        // The output-channel axis of the weight: Conv [O, I/g, k…], ConvTranspose [I, O/g, k…]
        // (whose output channels are only one axis without groups), MatMul [.., K, N].
        let axis = match op {
            "Conv" => Some(0),
            "ConvTranspose" => (graph::attr_i(&g.node[*ix], "group", 1) == 1).then_some(1),
            _ => Some(w.dims.len().saturating_sub(1)),
        };
        // Per-channel scales: DequantizeLinear's `axis` needs opset 13; QLinearConv takes a
        // 1-D weight scale at any opset; QLinearMatMul stays per tensor.
        let per_channel =
            !options.per_tensor && axis.is_some() && if qoperator { is_conv } else { opset >= 13 };
        let axis = axis.unwrap_or(0);
        let number = activations.len();
        let a = activations.entry(act.clone()).or_insert_with(|| {
            let (scale, zp) = activation_params(lo, hi);
            // Scale and zero point are read three times each (initializer, Q, DQ), so they
            // get short numbered names; the quantized tensors keep the activation's name.
            let a = QuantizedActivation {
                q: format!("{act}_q"),
                scale: graph::unused_name(&format!("qs{number}"), &taken),
                zp: graph::unused_name(&format!("qz{number}"), &taken),
                dq: format!("{act}_f"),
            };
            new_inits.push(f32_tensor(&a.scale, &[], &[scale]));
            new_inits.push(tensor(&a.zp, UINT8, &[], vec![zp]));
            let qdq = [&act[..], &a.scale, &a.zp];
            new_nodes.push(node(
                "QuantizeLinear",
                &format!("{act}_Q"),
                &qdq,
                &[&a.q],
                vec![],
            ));
            if !qoperator {
                let dq = [&a.q[..], &a.scale, &a.zp];
                new_nodes.push(node(
                    "DequantizeLinear",
                    &format!("{act}_DQ"),
                    &dq,
                    &[&a.dq],
                    vec![],
                ));
            }
            a
        });
        let (q, scales) = graph::quantize_symmetric_int8(&values, &w.dims, axis, per_channel);
        // Named after the weight: a weight read by several nodes of one kind is quantized
        // once, and its tensors (and DequantizeLinear) are shared.
        let (wq, ws, wz) = (
            format!("{weight}_q"),
            format!("{weight}_s"),
            format!("{weight}_z"),
        );
        let first_use = quantized_weights.insert(weight.clone());
        let zp_dims: &[i64] = if per_channel {
            &[scales.len() as i64]
        } else {
            &[]
        };
        if first_use {
            new_inits.push(tensor(
                &wq,
                INT8,
                &w.dims,
                q.iter().map(|v| *v as u8).collect(),
            ));
            new_inits.push(f32_tensor(&ws, zp_dims, &scales));
            // DequantizeLinear's zero point is optional (0 of the input's type); QLinearConv
            // and QLinearMatMul need it.
            if qoperator {
                new_inits.push(tensor(&wz, INT8, zp_dims, vec![0; scales.len()]));
            }
        }
        let n = &mut g.node[*ix];
        match out_range.filter(|_| qoperator) {
            None => {
                let dq = format!("{weight}_f");
                if first_use {
                    let attrs = if per_channel {
                        vec![int_attr("axis", axis as i64)]
                    } else {
                        vec![]
                    };
                    new_nodes.push(node(
                        "DequantizeLinear",
                        &format!("{weight}_DQ"),
                        &[&wq, &ws],
                        &[&dq],
                        attrs,
                    ));
                }
                n.input[0] = a.dq.clone();
                n.input[1] = dq;
            }
            Some((olo, ohi)) => {
                // QLinearConv / QLinearMatMul: int8 in, uint8 out, then back to float for
                // whatever reads the output.
                let (oscale, ozp) = activation_params(olo, ohi);
                let (oq, os, oz) = (
                    format!("{out_name}_q"),
                    format!("{out_name}_s"),
                    format!("{out_name}_z"),
                );
                new_inits.push(f32_tensor(&os, &[], &[oscale]));
                new_inits.push(tensor(&oz, UINT8, &[], vec![ozp]));
                let mut inputs = vec![
                    a.q.clone(),
                    a.scale.clone(),
                    a.zp.clone(),
                    wq,
                    ws,
                    wz,
                    os.clone(),
                    oz.clone(),
                ];
                if let Some(bias) = n.input.get(2).filter(|b| !b.is_empty()) {
                    // The bias joins the int32 accumulator: scale x_scale × w_scale[c], zero 0.
                    let b = inits.get(bias).and_then(graph::f32_values).ok_or_else(|| {
                        QuantizeError::InvalidModel(format!(
                            "{}: bias {bias} is not a constant",
                            n.name
                        ))
                    })?;
                    let x_scale = activation_params(lo, hi).0;
                    let q: Vec<u8> = b
                        .iter()
                        .enumerate()
                        .flat_map(|(c, v)| {
                            let s = x_scale * scales[if per_channel { c } else { 0 }];
                            ((v / s).round() as i32).to_le_bytes()
                        })
                        .collect();
                    let name = format!("{out_name}_b");
                    new_inits.push(tensor(&name, INT32, &[b.len() as i64], q));
                    inputs.push(name);
                }
                n.op_type = if is_conv {
                    "QLinearConv"
                } else {
                    "QLinearMatMul"
                }
                .into();
                n.input = inputs;
                n.output = vec![oq.clone()];
                new_nodes.push(node(
                    "DequantizeLinear",
                    &format!("{out_name}_DQ"),
                    &[&oq, &os, &oz],
                    &[&out_name],
                    vec![],
                ));
            }
        }
        changed += 1;
    }
    if changed == 0 {
        return Err(QuantizeError::NothingToDo(
            "no Conv/MatMul with a constant weight and a calibrated input".into(),
        ));
    }
    g.node.extend(new_nodes);
    g.initializer.extend(new_inits);
    graph::topological_sort(g);
    graph::prune_initializers(g);
    graph::share_identical_initializers(g);
    Ok(changed)
}
