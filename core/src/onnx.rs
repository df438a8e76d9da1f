//! The ONNX protobuf, for code that reads or rewrites models before tern loads them
//! (`tern-quantize`, the CLI's `baseline`, tern's own load-time fusions).
//!
//! The message types are tract-onnx's prost types, re-exported as [`pb`], so a model decoded
//! here is the model tern runs. The helpers are the few every model editor needs; each
//! answers with tern's typed [`Error`] on bad bytes.

use std::collections::HashMap;

use prost::Message;

pub use tract_onnx::pb;

use crate::error::{Error, Result};

/// Decodes a serialized ONNX model; bytes that are not one are [`Error::InvalidModel`].
pub fn decode(bytes: &[u8]) -> Result<pb::ModelProto> {
    pb::ModelProto::decode(bytes).map_err(|e| Error::InvalidModel {
        reason: format!("not an ONNX protobuf: {e}"),
    })
}

/// Serializes a model.
pub fn encode(model: &pb::ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Whether `domain` names the default operator set (`""` or `ai.onnx`).
pub fn is_default_domain(domain: &str) -> bool {
    domain.is_empty() || domain == "ai.onnx"
}

/// The version of the default-domain operator set the model imports (0 when none).
pub fn default_opset(model: &pb::ModelProto) -> i64 {
    model
        .opset_import
        .iter()
        .find(|o| is_default_domain(&o.domain))
        .map_or(0, |o| o.version)
}

/// A node's op type, prefixed by its domain outside the default one (`Conv`,
/// `com.microsoft.QuickGelu`): the keys of [`crate::ModelInfo::ops`].
pub fn op_key(node: &pb::NodeProto) -> String {
    if is_default_domain(&node.domain) {
        node.op_type.clone()
    } else {
        format!("{}.{}", node.domain, node.op_type)
    }
}

/// Which node (by index) produces each value of `graph`.
pub fn producers(graph: &pb::GraphProto) -> HashMap<&str, usize> {
    graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(ix, n)| n.output.iter().map(move |o| (o.as_str(), ix)))
        .collect()
}

/// Sets `metadata_props[key]` to `value`, replacing any previous entry for `key`.
pub fn set_metadata(model: &mut pb::ModelProto, key: &str, value: String) {
    model.metadata_props.retain(|p| p.key != key);
    model.metadata_props.push(pb::StringStringEntryProto {
        key: key.into(),
        value,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_read_and_write_what_they_say() {
        let mut model = pb::ModelProto {
            opset_import: vec![
                pb::OperatorSetIdProto {
                    domain: "com.microsoft".into(),
                    version: 1,
                },
                pb::OperatorSetIdProto {
                    domain: "".into(),
                    version: 17,
                },
            ],
            graph: Some(pb::GraphProto {
                node: vec![
                    pb::NodeProto {
                        op_type: "Relu".into(),
                        output: vec!["a".into()],
                        ..Default::default()
                    },
                    pb::NodeProto {
                        op_type: "QuickGelu".into(),
                        domain: "com.microsoft".into(),
                        output: vec!["b".into(), "c".into()],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(default_opset(&model), 17);
        let graph = model.graph.as_ref().expect("graph");
        assert_eq!(op_key(&graph.node[0]), "Relu");
        assert_eq!(op_key(&graph.node[1]), "com.microsoft.QuickGelu");
        let p = producers(graph);
        assert_eq!((p["a"], p["b"], p["c"]), (0, 1, 1));
        set_metadata(&mut model, "k", "1".into());
        set_metadata(&mut model, "k", "2".into());
        let back = decode(&encode(&model)).expect("round trip");
        assert_eq!(back.metadata_props.len(), 1);
        assert_eq!(back.metadata_props[0].value, "2");
        assert!(matches!(
            decode(b"\xff\xff"),
            Err(Error::InvalidModel { .. })
        ));
    }
}
