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

/// `TensorProto.data_type` of `float`.
const FLOAT: i32 = pb::tensor_proto::DataType::Float as i32;

/// An initializer from raw little-endian bytes.
pub fn tensor(name: &str, data_type: i32, dims: &[i64], raw: Vec<u8>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        data_type,
        dims: dims.to_vec(),
        raw_data: raw,
        ..Default::default()
    }
}

/// An f32 initializer.
pub fn f32_tensor(name: &str, dims: &[i64], values: &[f32]) -> pb::TensorProto {
    tensor(
        name,
        FLOAT,
        dims,
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// An int64 initializer.
pub fn i64_tensor(name: &str, dims: &[i64], values: &[i64]) -> pb::TensorProto {
    let int64 = pb::tensor_proto::DataType::Int64 as i32;
    tensor(
        name,
        int64,
        dims,
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// A node (default domain).
pub fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

/// An integer attribute.
pub fn int_attr(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

/// A float attribute.
pub fn float_attr(name: &str, f: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}

/// An integer-list attribute.
pub fn ints_attr(name: &str, ints: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

/// The attribute `name` of a node, if it has it.
pub fn attr<'n>(node: &'n pb::NodeProto, name: &str) -> Option<&'n pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// The integer attribute `name` of a node, or `default`.
pub fn attr_i(node: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map_or(default, |a| a.i)
}

/// The float attribute `name` of a node, or `default`.
pub fn attr_f(node: &pb::NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name).map_or(default, |a| a.f)
}

/// Sets `metadata_props[key]` to `value`, replacing any previous entry for `key`.
pub fn set_metadata(model: &mut pb::ModelProto, key: &str, value: String) {
    model.metadata_props.retain(|p| p.key != key);
    model.metadata_props.push(pb::StringStringEntryProto {
        key: key.into(),
        value,
    });
}

/// Every tensor of a graph (and of its subgraphs): initializers and attribute values.
fn tensors_mut(
    graph: &mut pb::GraphProto,
    each: &mut dyn FnMut(&mut pb::TensorProto) -> Result<()>,
) -> Result<()> {
    for t in &mut graph.initializer {
        each(t)?;
    }
    for node in &mut graph.node {
        for attr in &mut node.attribute {
            if let Some(t) = &mut attr.t {
                each(t)?;
            }
            for t in &mut attr.tensors {
                each(t)?;
            }
            if let Some(g) = &mut attr.g {
                tensors_mut(g, each)?;
            }
            for g in &mut attr.graphs {
                tensors_mut(g, each)?;
            }
        }
    }
    Ok(())
}

/// Whether a tensor keeps its value in an external data file.
fn is_external(t: &pb::TensorProto) -> bool {
    t.data_location == Some(pb::tensor_proto::DataLocation::External as i32)
}

/// The key `key` of a tensor's external data description.
fn external_entry<'t>(t: &'t pb::TensorProto, key: &str) -> Option<&'t str> {
    t.external_data
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.value.as_str())
}

/// The external data files a serialized model's tensors name, as their `location`s
/// (relative paths next to the model file), sorted. A location that is absolute or climbs
/// out of the model's directory (`..`) is [`Error::InvalidModel`].
pub fn external_locations(bytes: &[u8]) -> Result<Vec<String>> {
    let mut model = decode(bytes)?;
    let mut locations = std::collections::BTreeSet::new();
    if let Some(graph) = &mut model.graph {
        tensors_mut(graph, &mut |t| {
            if is_external(t) {
                locations.insert(check_location(t)?.to_string());
            }
            Ok(())
        })?;
    }
    Ok(locations.into_iter().collect())
}

/// A tensor's external data location, checked to stay inside the model's directory.
fn check_location(t: &pb::TensorProto) -> Result<&str> {
    let bad = |why: &str| Error::InvalidModel {
        reason: format!("external data of tensor {:?}: {why}", t.name),
    };
    let location = external_entry(t, "location").ok_or_else(|| bad("no location"))?;
    let path = std::path::Path::new(location);
    let inside = !location.is_empty()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !inside {
        return Err(bad(&format!(
            "location {location:?} is not a relative path inside the model's directory"
        )));
    }
    Ok(location)
}

/// Moves every external tensor value into the model itself: `data(location)` gives the
/// bytes of an external data file, and each tensor takes its `offset`/`length` window of
/// them (checked against the file's size). A file `data` does not have, or a window past
/// its end, is [`Error::InvalidModel`]; afterwards the model reads no file.
pub fn inline_external_data<'a>(
    model: &mut pb::ModelProto,
    data: &dyn Fn(&str) -> Option<&'a [u8]>,
) -> Result<()> {
    let Some(graph) = &mut model.graph else {
        return Ok(());
    };
    tensors_mut(graph, &mut |t| {
        if !is_external(t) {
            return Ok(());
        }
        let location = check_location(t)?.to_string();
        let bad = |why: String| Error::InvalidModel {
            reason: format!("external data of tensor {:?} ({location:?}): {why}", t.name),
        };
        let number = |key: &str| -> Result<Option<usize>> {
            external_entry(t, key)
                .map(|v| {
                    v.parse::<usize>()
                        .map_err(|e| bad(format!("{key} {v:?}: {e}")))
                })
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let length = number("length")?;
        let file = data(&location).ok_or_else(|| bad("the file is missing".into()))?;
        let end = match length {
            Some(length) => offset.checked_add(length),
            None => Some(file.len()),
        };
        let window = end
            .filter(|&end| offset <= end && end <= file.len())
            .map(|end| &file[offset..end])
            .ok_or_else(|| {
                bad(format!(
                    "offset {offset} length {length:?} is past the end of the {}-byte file",
                    file.len()
                ))
            })?;
        t.raw_data = window.to_vec();
        t.external_data.clear();
        t.data_location = Some(pb::tensor_proto::DataLocation::Default as i32);
        Ok(())
    })
}

/// The node writing each value of `graph`, by value name (as [`producers`], the node
/// itself).
pub(crate) fn producer_nodes(graph: &pb::GraphProto) -> HashMap<&str, &pb::NodeProto> {
    graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect()
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
