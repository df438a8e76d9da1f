//! The Open Inference Protocol (KServe v2) over HTTP: its JSON documents, and the codec
//! between an infer request's body and tern tensors, with the binary tensor data extension.
//!
//! An infer request is a JSON document, optionally followed by raw tensor bytes: the
//! `Inference-Header-Content-Length` header then says how long the JSON part is, and each
//! input whose `parameters.binary_data_size` is set takes that many bytes from what
//! follows, in order. Outputs come back as JSON `data`, or as raw bytes after the JSON
//! when the request asks for it (`binary_data` on an output, `binary_data_output` on the
//! request) — what Triton's clients (`tritonclient`) do by default.
//!
//! Everything a client sends is checked before a tensor is built: shapes against overflow
//! and against the bytes or elements actually present, every byte of the binary part
//! accounted for, numbers against their datatype's range.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tern::{DType, Dim, Tensor, TensorInfo};

/// The header that carries the JSON part's length when binary tensor data follows it.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// A tensor element type as the protocol names it (`"FP32"`, `"INT64"`…).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Datatype {
    /// Boolean, one byte in binary form.
    Bool,
    /// 8-bit unsigned integer.
    Uint8,
    /// 16-bit unsigned integer.
    Uint16,
    /// 32-bit unsigned integer.
    Uint32,
    /// 64-bit unsigned integer.
    Uint64,
    /// 8-bit signed integer.
    Int8,
    /// 16-bit signed integer.
    Int16,
    /// 32-bit signed integer.
    Int32,
    /// 64-bit signed integer.
    Int64,
    /// IEEE half precision float.
    Fp16,
    /// 32-bit float.
    Fp32,
    /// 64-bit float.
    Fp64,
    /// Byte strings (UTF-8 here); in binary form each is a 4-byte little-endian length
    /// followed by its bytes.
    Bytes,
}

impl Datatype {
    /// The protocol's name for a tern element type.
    pub fn of(dtype: DType) -> Option<Datatype> {
        Some(match dtype {
            DType::Bool => Datatype::Bool,
            DType::U8 => Datatype::Uint8,
            DType::U16 => Datatype::Uint16,
            DType::U32 => Datatype::Uint32,
            DType::U64 => Datatype::Uint64,
            DType::I8 => Datatype::Int8,
            DType::I16 => Datatype::Int16,
            DType::I32 => Datatype::Int32,
            DType::I64 => Datatype::Int64,
            DType::F16 => Datatype::Fp16,
            DType::F32 => Datatype::Fp32,
            DType::F64 => Datatype::Fp64,
            DType::String => Datatype::Bytes,
            _ => return None,
        })
    }

    /// The tern element type this datatype is read into.
    pub fn dtype(self) -> DType {
        match self {
            Datatype::Bool => DType::Bool,
            Datatype::Uint8 => DType::U8,
            Datatype::Uint16 => DType::U16,
            Datatype::Uint32 => DType::U32,
            Datatype::Uint64 => DType::U64,
            Datatype::Int8 => DType::I8,
            Datatype::Int16 => DType::I16,
            Datatype::Int32 => DType::I32,
            Datatype::Int64 => DType::I64,
            Datatype::Fp16 => DType::F16,
            Datatype::Fp32 => DType::F32,
            Datatype::Fp64 => DType::F64,
            Datatype::Bytes => DType::String,
        }
    }
}

/// A request the protocol layer refuses: the client's fault, answered with HTTP 400.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The JSON part does not parse as an infer request.
    #[error("malformed request: {0}")]
    Json(String),
    /// `Inference-Header-Content-Length` is not a number or exceeds the body.
    #[error("bad {HEADER_LENGTH}: {0}")]
    HeaderLength(String),
    /// A dimension is negative, or the element count overflows.
    #[error("input '{input}': bad shape {shape:?}")]
    Shape {
        /// The input.
        input: String,
        /// The shape as sent.
        shape: Vec<i64>,
    },
    /// An input has neither `data` nor `binary_data_size`, or has both.
    #[error("input '{input}': {reason}")]
    Data {
        /// The input.
        input: String,
        /// What is wrong.
        reason: String,
    },
    /// The binary part is shorter or longer than the inputs' `binary_data_size` say.
    #[error("binary tensor data: {0}")]
    Binary(String),
    /// A requested output the model does not have.
    #[error("unknown output '{0}'")]
    UnknownOutput(String),
    /// A parameter this server does not implement (e.g. `classification`).
    #[error("unsupported parameter '{0}'")]
    UnsupportedParameter(String),
}

/// `GET /v2`: what the server is.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServerMetadata {
    /// The server's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The protocol extensions it implements.
    pub extensions: Vec<String>,
}

/// One tensor in a model's metadata.
#[derive(Debug, Serialize, Deserialize)]
pub struct TensorMetadata {
    /// The tensor's name.
    pub name: String,
    /// Its datatype (`null` for an element type the protocol cannot carry).
    pub datatype: Option<Datatype>,
    /// Its shape, `-1` where a dimension is symbolic (an empty list when the rank is
    /// unknown).
    pub shape: Vec<i64>,
}

impl TensorMetadata {
    /// The metadata of a model input or output.
    pub fn of(info: &TensorInfo) -> TensorMetadata {
        TensorMetadata {
            name: info.name.clone(),
            datatype: info.dtype.and_then(Datatype::of),
            shape: info
                .shape
                .iter()
                .flatten()
                .map(|d| match d {
                    Dim::Fixed(n) => i64::try_from(*n).unwrap_or(-1),
                    Dim::Symbolic(_) => -1,
                })
                .collect(),
        }
    }
}

/// `GET /v2/models/{name}`: a model's versions and signature.
#[derive(Debug, Serialize, Deserialize)]
pub struct ModelMetadata {
    /// The model's name.
    pub name: String,
    /// The versions served.
    pub versions: Vec<String>,
    /// The model format (`onnx`).
    pub platform: String,
    /// Its inputs.
    pub inputs: Vec<TensorMetadata>,
    /// Its outputs.
    pub outputs: Vec<TensorMetadata>,
}

/// One entry of `POST /v2/repository/index` (Triton's model repository extension).
#[derive(Debug, Serialize, Deserialize)]
pub struct IndexEntry {
    /// The model's name.
    pub name: String,
    /// The version served.
    pub version: String,
    /// `READY` for a model being served.
    pub state: String,
}

/// An input tensor of an infer request.
#[derive(Debug, Deserialize)]
pub struct RequestInput {
    /// The model input it is for.
    pub name: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Its element type.
    pub datatype: Datatype,
    /// `binary_data_size` when its data is in the binary part.
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// The elements in row-major order (flat, or nested arrays).
    #[serde(default)]
    pub data: Option<Value>,
}

/// An output an infer request asks for.
#[derive(Debug, Deserialize)]
pub struct RequestOutput {
    /// The model output.
    pub name: String,
    /// `binary_data: true` to receive it as raw bytes.
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// `POST /v2/models/{name}/infer`: the JSON part of an infer request.
#[derive(Debug, Deserialize)]
pub struct InferRequest {
    /// An id echoed in the response.
    #[serde(default)]
    pub id: Option<String>,
    /// `binary_data_output: true` to receive every output as raw bytes.
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// The inputs.
    pub inputs: Vec<RequestInput>,
    /// The outputs wanted (all of them when absent or empty).
    #[serde(default)]
    pub outputs: Vec<RequestOutput>,
}

/// An output tensor of an infer response.
#[derive(Debug, Serialize, Deserialize)]
pub struct ResponseOutput {
    /// The model output.
    pub name: String,
    /// Its element type.
    pub datatype: Datatype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// `binary_data_size` when its data is in the binary part.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub parameters: Map<String, Value>,
    /// The elements in row-major order, when sent as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Vec<Value>>,
}

/// The JSON part of an infer response.
#[derive(Debug, Serialize, Deserialize)]
pub struct InferResponse {
    /// The model that answered.
    pub model_name: String,
    /// Its version.
    pub model_version: String,
    /// The request's id, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// What the server says about the answer (a flow: which steps answered).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub parameters: Map<String, Value>,
    /// The outputs.
    pub outputs: Vec<ResponseOutput>,
}

/// An infer request decoded: its tensors, and which outputs to return and how.
#[derive(Debug)]
pub struct Decoded {
    /// The request's id.
    pub id: Option<String>,
    /// The inputs by name, as tern tensors.
    pub inputs: Vec<(String, Tensor)>,
    /// The outputs to return (`None`: all), each with whether it goes as binary.
    pub outputs: Option<Vec<(String, bool)>>,
    /// Whether outputs not named in `outputs` go as binary.
    pub binary_by_default: bool,
}

fn flag(parameters: &Map<String, Value>, name: &str) -> bool {
    parameters.get(name).and_then(Value::as_bool) == Some(true)
}

/// Parameters that change what an output means, which this server does not implement: a
/// request using one is refused rather than answered differently from what it asked.
const UNSUPPORTED: [&str; 2] = ["classification", "shared_memory_region"];

fn refuse_unsupported(parameters: &Map<String, Value>) -> Result<(), ProtocolError> {
    match UNSUPPORTED.iter().find(|p| parameters.contains_key(**p)) {
        Some(p) => Err(ProtocolError::UnsupportedParameter((*p).to_string())),
        None => Ok(()),
    }
}

/// Decodes an infer request's body. `header_length` is the value of the
/// `Inference-Header-Content-Length` header, if any.
pub fn decode_request(body: &[u8], header_length: Option<&str>) -> Result<Decoded, ProtocolError> {
    let split = match header_length {
        None => body.len(),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n <= body.len() => n,
            Ok(n) => {
                return Err(ProtocolError::HeaderLength(format!(
                    "{n} exceeds the body's {} bytes",
                    body.len()
                )))
            }
            Err(e) => return Err(ProtocolError::HeaderLength(e.to_string())),
        },
    };
    let (json, mut binary) = body.split_at(split);
    let request: InferRequest =
        serde_json::from_slice(json).map_err(|e| ProtocolError::Json(e.to_string()))?;
    refuse_unsupported(&request.parameters)?;
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        refuse_unsupported(&input.parameters)?;
        let bad_shape = || ProtocolError::Shape {
            input: input.name.clone(),
            shape: input.shape.clone(),
        };
        let shape = input
            .shape
            .iter()
            .map(|d| usize::try_from(*d).map_err(|_| bad_shape()))
            .collect::<Result<Vec<usize>, _>>()?;
        let count = shape
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(*d))
            .ok_or_else(bad_shape)?;
        let data_error = |reason: String| ProtocolError::Data {
            input: input.name.clone(),
            reason,
        };
        let dtype = input.datatype.dtype();
        let binary_size = input.parameters.get("binary_data_size");
        let tensor = match (binary_size, input.data) {
            (Some(size), None) => {
                let size = size
                    .as_u64()
                    .and_then(|s| usize::try_from(s).ok())
                    .ok_or_else(|| data_error(format!("binary_data_size {size} is not a size")))?;
                if size > binary.len() {
                    return Err(ProtocolError::Binary(format!(
                        "input '{}' needs {size} bytes, {} are left",
                        input.name,
                        binary.len()
                    )));
                }
                let (bytes, rest) = binary.split_at(size);
                binary = rest;
                if dtype == DType::String {
                    Tensor::from_vec(&shape, read_strings(bytes, count).map_err(data_error)?)
                } else {
                    Tensor::from_bytes(dtype, &shape, bytes)
                }
                .map_err(|e| data_error(e.to_string()))?
            }
            (None, Some(data)) => {
                let mut flat = Vec::new();
                flatten(data, &mut flat);
                if flat.len() != count {
                    return Err(data_error(format!(
                        "shape {shape:?} holds {count} elements, data has {}",
                        flat.len()
                    )));
                }
                Tensor::from_json_data(dtype, &shape, &flat)
                    .map_err(|e| data_error(e.to_string()))?
            }
            (Some(_), Some(_)) => {
                return Err(data_error(
                    "both data and binary_data_size are given".into(),
                ))
            }
            (None, None) => return Err(data_error("no data".into())),
        };
        inputs.push((input.name, tensor));
    }
    if !binary.is_empty() {
        return Err(ProtocolError::Binary(format!(
            "{} bytes after the last input's data",
            binary.len()
        )));
    }
    let binary_by_default = flag(&request.parameters, "binary_data_output");
    let outputs = if request.outputs.is_empty() {
        None
    } else {
        let mut wanted = Vec::with_capacity(request.outputs.len());
        for o in request.outputs {
            refuse_unsupported(&o.parameters)?;
            let binary = match o.parameters.get("binary_data") {
                Some(v) => v.as_bool() == Some(true),
                None => binary_by_default,
            };
            wanted.push((o.name, binary));
        }
        Some(wanted)
    };
    Ok(Decoded {
        id: request.id,
        inputs,
        outputs,
        binary_by_default,
    })
}

/// Nested arrays flattened in row-major order (the protocol allows both forms), the
/// elements moved, not copied.
fn flatten(value: Value, out: &mut Vec<Value>) {
    match value {
        Value::Array(items) => items.into_iter().for_each(|v| flatten(v, out)),
        v => out.push(v),
    }
}

/// `count` length-prefixed strings, exactly filling `bytes`.
fn read_strings(mut bytes: &[u8], count: usize) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(count.min(bytes.len() / 4));
    for i in 0..count {
        let (len, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or_else(|| format!("element {i}: no length prefix"))?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return Err(format!("element {i}: {len} bytes, {} left", rest.len()));
        }
        let (s, rest) = rest.split_at(len);
        out.push(
            std::str::from_utf8(s)
                .map_err(|e| format!("element {i}: {e}"))?
                .to_string(),
        );
        bytes = rest;
    }
    if !bytes.is_empty() {
        return Err(format!("{} bytes after element {count}", bytes.len()));
    }
    Ok(out)
}

/// A tensor's bytes in the binary extension's form.
fn tensor_bytes(tensor: &Tensor) -> Result<Vec<u8>, EncodeError> {
    if tensor.dtype() == DType::String {
        let mut out = Vec::new();
        for s in tensor.as_slice::<String>()? {
            let len = u32::try_from(s.len()).map_err(|_| EncodeError::StringTooLong)?;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Ok(out)
    } else {
        Ok(tensor.as_bytes()?.to_vec())
    }
}

/// An encoded infer response: the body, and the JSON part's length when binary data
/// follows it (for the `Inference-Header-Content-Length` header).
#[derive(Debug)]
pub struct Encoded {
    /// The whole body.
    pub body: Vec<u8>,
    /// The JSON part's length, when there is a binary part.
    pub header_length: Option<usize>,
}

/// Encodes the outputs of a run as the response to `decoded`.
pub fn encode_response(
    model_name: &str,
    model_version: &str,
    decoded: &Decoded,
    outputs: &BTreeMap<String, Tensor>,
    order: &[String],
    parameters: Map<String, Value>,
) -> Result<Encoded, EncodeError> {
    let wanted: Vec<(String, bool)> = match &decoded.outputs {
        Some(w) => w.clone(),
        None => order
            .iter()
            .map(|n| (n.clone(), decoded.binary_by_default))
            .collect(),
    };
    let mut response = InferResponse {
        model_name: model_name.to_string(),
        model_version: model_version.to_string(),
        id: decoded.id.clone(),
        parameters,
        outputs: Vec::with_capacity(wanted.len()),
    };
    let mut binary = Vec::new();
    for (name, as_binary) in wanted {
        let tensor = outputs
            .get(&name)
            .ok_or_else(|| EncodeError::Protocol(ProtocolError::UnknownOutput(name.clone())))?;
        let datatype = Datatype::of(tensor.dtype()).ok_or(EncodeError::Datatype(tensor.dtype()))?;
        let mut out = ResponseOutput {
            name,
            datatype,
            shape: tensor.shape().to_vec(),
            parameters: Map::new(),
            data: None,
        };
        if as_binary {
            let bytes = tensor_bytes(tensor)?;
            out.parameters
                .insert("binary_data_size".into(), Value::from(bytes.len()));
            binary.push(bytes);
        } else {
            out.data = Some(tensor.json_data()?);
        }
        response.outputs.push(out);
    }
    let mut body = serde_json::to_vec(&response).map_err(|e| EncodeError::Json(e.to_string()))?;
    let header_length = (!binary.is_empty()).then_some(body.len());
    for b in binary {
        body.extend_from_slice(&b);
    }
    Ok(Encoded {
        body,
        header_length,
    })
}

/// Why a response could not be encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The request named an output the model does not have.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// An output's element type has no protocol datatype.
    #[error("output type {0} cannot be sent")]
    Datatype(DType),
    /// Reading an output tensor failed.
    #[error(transparent)]
    Tensor(#[from] tern::Error),
    /// A string output of 4 GiB or more (its length prefix is 32 bits).
    #[error("a string output of 4 GiB or more")]
    StringTooLong,
    /// Serialising the JSON part failed.
    #[error("encoding the response: {0}")]
    Json(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_json(v: Value) -> Result<Decoded, ProtocolError> {
        decode_request(&serde_json::to_vec(&v).unwrap(), None)
    }

    #[test]
    fn json_inputs_flat_or_nested_become_tensors() {
        let d = decode_json(serde_json::json!({
            "id": "7",
            "inputs": [
                {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4.5]]},
                {"name": "n", "shape": [1], "datatype": "INT64", "data": [9007199254740993i64]}
            ]
        }))
        .unwrap();
        assert_eq!(d.id.as_deref(), Some("7"));
        assert_eq!(d.inputs[0].1.as_slice::<f32>().unwrap(), &[1., 2., 3., 4.5]);
        assert_eq!(
            d.inputs[1].1.as_slice::<i64>().unwrap(),
            &[9007199254740993]
        );
        assert!(d.outputs.is_none());
    }

    #[test]
    fn binary_inputs_are_cut_from_the_tail_in_order() {
        let header = serde_json::to_vec(&serde_json::json!({
            "inputs": [
                {"name": "a", "shape": [2], "datatype": "INT32", "parameters": {"binary_data_size": 8}},
                {"name": "s", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 11}}
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": true}}, {"name": "z"}]
        }))
        .unwrap();
        let mut body = header.clone();
        body.extend_from_slice(&7i32.to_le_bytes());
        body.extend_from_slice(&(-1i32).to_le_bytes());
        body.extend_from_slice(&3u32.to_le_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(&0u32.to_le_bytes());
        let len = header.len().to_string();
        let d = decode_request(&body, Some(&len)).unwrap();
        assert_eq!(d.inputs[0].1.as_slice::<i32>().unwrap(), &[7, -1]);
        assert_eq!(
            d.inputs[1].1.as_slice::<String>().unwrap(),
            &["abc".to_string(), String::new()]
        );
        assert_eq!(
            d.outputs,
            Some(vec![("y".into(), true), ("z".into(), false)])
        );
        // One byte short, one byte extra, a header length past the end.
        assert!(matches!(
            decode_request(&body[..body.len() - 1], Some(&len)),
            Err(ProtocolError::Binary(_) | ProtocolError::Data { .. })
        ));
        let mut longer = body.clone();
        longer.push(0);
        assert!(matches!(
            decode_request(&longer, Some(&len)),
            Err(ProtocolError::Binary(_))
        ));
        assert!(matches!(
            decode_request(&body, Some("99999")),
            Err(ProtocolError::HeaderLength(_))
        ));
    }

    #[test]
    fn bad_requests_are_typed_errors() {
        let one = |input: Value| decode_json(serde_json::json!({ "inputs": [input] }));
        assert!(matches!(
            decode_request(b"{not json", None),
            Err(ProtocolError::Json(_))
        ));
        assert!(matches!(
            one(serde_json::json!({"name": "x", "shape": [-1], "datatype": "FP32", "data": []})),
            Err(ProtocolError::Shape { .. })
        ));
        assert!(matches!(
            one(
                serde_json::json!({"name": "x", "shape": [4611686018427387904i64, 8], "datatype": "FP32", "data": []})
            ),
            Err(ProtocolError::Shape { .. })
        ));
        assert!(matches!(
            one(serde_json::json!({"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]})),
            Err(ProtocolError::Data { .. })
        ));
        assert!(matches!(
            one(serde_json::json!({"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]})),
            Err(ProtocolError::Data { .. })
        ));
        assert!(matches!(
            one(serde_json::json!({"name": "x", "shape": [1], "datatype": "FP32"})),
            Err(ProtocolError::Data { .. })
        ));
        assert!(matches!(
            one(serde_json::json!({"name": "x", "shape": [1], "datatype": "FP8", "data": [1]})),
            Err(ProtocolError::Json(_))
        ));
        assert!(matches!(
            decode_json(
                serde_json::json!({"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": 3}}]})
            ),
            Err(ProtocolError::UnsupportedParameter(_))
        ));
    }

    #[test]
    fn responses_mix_json_and_binary_outputs() {
        let decoded = Decoded {
            id: Some("r".into()),
            inputs: vec![],
            outputs: Some(vec![("b".into(), true), ("a".into(), false)]),
            binary_by_default: false,
        };
        let mut outputs = BTreeMap::new();
        outputs.insert(
            "a".to_string(),
            Tensor::from_vec(&[2], vec![1i64 << 60, 2]).unwrap(),
        );
        outputs.insert(
            "b".to_string(),
            Tensor::from_vec(&[1, 2], vec![0.5f32, -1.0]).unwrap(),
        );
        let order = vec!["a".to_string(), "b".to_string()];
        let e = encode_response("m", "3", &decoded, &outputs, &order, Map::new()).unwrap();
        let n = e.header_length.unwrap();
        let r: InferResponse = serde_json::from_slice(&e.body[..n]).unwrap();
        assert_eq!(r.id.as_deref(), Some("r"));
        assert_eq!(r.outputs[0].name, "b");
        assert_eq!(r.outputs[0].parameters["binary_data_size"], 8);
        assert_eq!(&e.body[n..n + 4], &0.5f32.to_le_bytes());
        assert_eq!(
            r.outputs[1].data.as_ref().unwrap()[0],
            Value::from(1i64 << 60)
        );
        // All outputs as JSON by default, in the model's order.
        let all = Decoded {
            outputs: None,
            ..decoded
        };
        let e = encode_response("m", "3", &all, &outputs, &order, Map::new()).unwrap();
        assert!(e.header_length.is_none());
        let r: InferResponse = serde_json::from_slice(&e.body).unwrap();
        assert_eq!(r.outputs[0].name, "a");
    }
}
