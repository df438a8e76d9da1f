//! Small ONNX models built in code with tract-onnx's protobuf types, for error tests.

use prost::Message;
use tract_onnx::pb;

/// ONNX element type codes.
pub const FLOAT: i32 = 1;
/// int64
pub const INT64: i32 = 7;

/// A graph input/output declaration; `dims` entries are sizes or symbolic names.
pub fn value(name: &str, elem_type: i32, dims: &[&str]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d.parse::<i64>() {
                Ok(n) => Value::DimValue(n),
                Err(_) => Value::DimParam(d.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A node.
pub fn node(
    name: &str,
    op_type: &str,
    domain: &str,
    inputs: &[&str],
    outputs: &[&str],
) -> pb::NodeProto {
    pb::NodeProto {
        name: name.into(),
        op_type: op_type.into(),
        domain: domain.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A serialized opset-17 model of these nodes.
pub fn model(
    nodes: Vec<pb::NodeProto>,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
) -> Vec<u8> {
    let proto = pb::ModelProto {
        ir_version: 8,
        producer_name: "tern-tests".into(),
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(pb::GraphProto {
            name: "fixture".into(),
            node: nodes,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    };
    proto.encode_to_vec()
}

/// `z = x / y` over `[batch, 3]` f32 tensors: 0/0 gives NaN outputs on demand.
pub fn div_model() -> Vec<u8> {
    model(
        vec![node("div", "Div", "", &["x", "y"], &["z"])],
        vec![
            value("x", FLOAT, &["batch", "3"]),
            value("y", FLOAT, &["batch", "3"]),
        ],
        vec![value("z", FLOAT, &["batch", "3"])],
    )
}

/// `y = x + x` over `[batch, n]` f32 tensors: any batch, any row width.
pub fn double_model() -> Vec<u8> {
    model(
        vec![node("add", "Add", "", &["x", "x"], &["y"])],
        vec![value("x", FLOAT, &["batch", "n"])],
        vec![value("y", FLOAT, &["batch", "n"])],
    )
}

/// `bytes` with one more `metadata_props` entry.
pub fn with_metadata(bytes: &[u8], key: &str, value: &str) -> Vec<u8> {
    let mut proto = pb::ModelProto::decode(bytes).expect("fixture model");
    proto.metadata_props.push(pb::StringStringEntryProto {
        key: key.into(),
        value: value.into(),
    });
    proto.encode_to_vec()
}

/// `bytes` with one more initializer.
pub fn with_initializer(bytes: &[u8], tensor: pb::TensorProto) -> Vec<u8> {
    let mut proto = pb::ModelProto::decode(bytes).expect("fixture model");
    if let Some(graph) = proto.graph.as_mut() {
        graph.initializer.push(tensor);
    }
    proto.encode_to_vec()
}
