//! Layer-wise sensitivity: which nodes lose the most accuracy when quantized.
//!
//! Each quantizable node is quantized on its own (everything else stays fp32) with the
//! calibrated ranges, the result runs through tern on the evaluation inputs, and its outputs
//! are compared with the fp32 model's. The nodes whose lone quantization costs the most
//! SQNR are the ones to keep in fp32 (`tern-quantize static --keep-fp32 N`).

use prost::Message;
use serde::Serialize;
use tern::{Model, Outputs, Session, Tensor};
use tract_onnx::pb;

use crate::error::Result;
use crate::report::{session_options, AccuracyMeter};
use crate::static_qdq::{self, Ranges, StaticOptions};

/// What quantizing one node alone does to the model's outputs.
#[derive(Debug, Clone, Serialize)]
pub struct NodeSensitivity {
    /// Node name.
    pub node: String,
    /// Its op type.
    pub op: String,
    /// SQNR of the first output against fp32, dB (lower: more sensitive).
    pub sqnr_db: f64,
    /// Cosine similarity of the first output against fp32.
    pub cosine: f64,
}

/// Quantizes each node `options` allows, one at a time, and measures it on `eval`; the
/// result is sorted most sensitive first.
pub fn analyze(
    model: &pb::ModelProto,
    ranges: &Ranges,
    options: &StaticOptions,
    eval: &[Vec<(String, Tensor)>],
) -> Result<Vec<NodeSensitivity>> {
    let run_all = |m: &pb::ModelProto| -> Result<Vec<Outputs>> {
        let model = Model::from_bytes(&m.encode_to_vec())?;
        let session = Session::new(&model, session_options(1))?;
        eval.iter()
            .map(|inputs| Ok(session.run(inputs.clone())?))
            .collect()
    };
    let reference = run_all(model)?;
    let nodes = static_qdq::quantizable_nodes(model, options);
    let progress = indicatif::ProgressBar::new(nodes.len() as u64);
    let mut result = Vec::with_capacity(nodes.len());
    for (node, op) in nodes {
        let mut one = model.clone();
        let only = StaticOptions {
            only_nodes: Some([node.clone()].into()),
            ..options.clone()
        };
        static_qdq::quantize_static(&mut one, ranges, &only)?;
        let mut meter = AccuracyMeter::default();
        for (r, c) in reference.iter().zip(run_all(&one)?) {
            meter.add(r, &c)?;
        }
        let first = meter.finish().into_iter().next();
        result.push(NodeSensitivity {
            node,
            op,
            sqnr_db: first.as_ref().map_or(f64::INFINITY, |a| a.sqnr_db),
            cosine: first.as_ref().map_or(1.0, |a| a.cosine),
        });
        progress.inc(1);
    }
    progress.finish_and_clear();
    result.sort_by(|a, b| a.sqnr_db.total_cmp(&b.sqnr_db));
    Ok(result)
}
