//! Reading input tensors from `.npy` / `.json` files and writing outputs as JSON.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tern::{DType, Tensor};

/// A tensor as JSON: `{"dtype": "f32", "shape": [1, 4], "data": [...]}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct JsonTensor {
    /// Element type; `f32` when omitted.
    #[serde(default = "default_dtype")]
    pub dtype: DType,
    /// Shape; `[len(data)]` when omitted.
    #[serde(default)]
    pub shape: Option<Vec<usize>>,
    /// Elements in row-major order.
    pub data: Vec<serde_json::Value>,
}

fn default_dtype() -> DType {
    DType::F32
}

/// The largest input file read: a FIFO, a device or a huge file is refused rather than
/// blocking or exhausting memory.
const MAX_INPUT_BYTES: u64 = 1 << 30;

/// Reads a tensor from a `.npy` file or a `.json` file ([`JsonTensor`], or a nested
/// array of numbers read as f32).
pub fn read_tensor(path: &Path) -> Result<Tensor> {
    let bytes = tern::fs::read_regular(path, MAX_INPUT_BYTES)
        .with_context(|| format!("reading {}", path.display()))?;
    let is_npy = bytes.starts_with(b"\x93NUMPY");
    let tensor = if is_npy {
        Ok(Tensor::from_npy(&bytes)?)
    } else {
        read_json(&bytes)
    };
    tensor.with_context(|| format!("parsing tensor file {}", path.display()))
}

fn read_json(bytes: &[u8]) -> Result<Tensor> {
    let value: serde_json::Value = serde_json::from_slice(bytes)?;
    let jt = if value.is_array() {
        let mut shape = Vec::new();
        let mut data = Vec::new();
        flatten(&value, 0, &mut shape, &mut data)?;
        JsonTensor {
            dtype: DType::F32,
            shape: Some(shape),
            data,
        }
    } else {
        serde_json::from_value(value)?
    };
    let shape = jt.shape.unwrap_or_else(|| vec![jt.data.len()]);
    let floats = || {
        jt.data
            .iter()
            .map(|v| v.as_f64().context("expected a number"))
            .collect::<Result<Vec<f64>>>()
    };
    let ints = || {
        jt.data
            .iter()
            .map(|v| v.as_i64().context("expected an integer"))
            .collect::<Result<Vec<i64>>>()
    };
    let t = match jt.dtype {
        DType::F32 => Tensor::from_vec(&shape, floats()?.into_iter().map(|v| v as f32).collect())?,
        DType::F64 => Tensor::from_vec(&shape, floats()?)?,
        DType::F16 => Tensor::from_vec(
            &shape,
            floats()?.into_iter().map(half::f16::from_f64).collect(),
        )?,
        DType::I64 => Tensor::from_vec(&shape, ints()?)?,
        DType::I32 => Tensor::from_vec(&shape, narrow::<i32>(ints()?)?)?,
        DType::I8 => Tensor::from_vec(&shape, narrow::<i8>(ints()?)?)?,
        DType::U8 => Tensor::from_vec(&shape, narrow::<u8>(ints()?)?)?,
        DType::Bool => Tensor::from_vec(
            &shape,
            jt.data
                .iter()
                .map(|v| v.as_bool().context("expected a bool"))
                .collect::<Result<Vec<_>>>()?,
        )?,
        DType::String => Tensor::from_vec(
            &shape,
            jt.data
                .iter()
                .map(|v| v.as_str().map(str::to_string).context("expected a string"))
                .collect::<Result<Vec<_>>>()?,
        )?,
        other => bail!("JSON tensors of type {other} are not supported; use .npy"),
    };
    Ok(t)
}

fn narrow<T: TryFrom<i64>>(v: Vec<i64>) -> Result<Vec<T>> {
    v.into_iter()
        .map(|x| T::try_from(x).map_err(|_| anyhow::anyhow!("{x} is out of range")))
        .collect()
}

fn flatten(
    v: &serde_json::Value,
    depth: usize,
    shape: &mut Vec<usize>,
    out: &mut Vec<serde_json::Value>,
) -> Result<()> {
    match v {
        serde_json::Value::Array(items) => {
            if shape.len() == depth {
                shape.push(items.len());
            } else if shape[depth] != items.len() {
                bail!("ragged nested array at depth {depth}");
            }
            items
                .iter()
                .try_for_each(|item| flatten(item, depth + 1, shape, out))
        }
        other => {
            if depth != shape.len() {
                bail!("ragged nested array at depth {depth}");
            }
            out.push(other.clone());
            Ok(())
        }
    }
}

/// A tensor converted to JSON.
pub fn tensor_to_json(t: &Tensor) -> Result<serde_json::Value> {
    let data: Vec<serde_json::Value> = if t.dtype() == DType::String {
        t.as_slice::<String>()?
            .iter()
            .map(|s| serde_json::Value::from(s.as_str()))
            .collect()
    } else if t.dtype().is_float() {
        t.to_f32_vec()?
            .into_iter()
            .map(|v| {
                serde_json::Number::from_f64(v as f64).map_or(serde_json::Value::Null, Into::into)
            })
            .collect()
    } else if t.dtype() == DType::Bool {
        t.as_slice::<bool>()?
            .iter()
            .map(|b| serde_json::Value::from(*b))
            .collect()
    } else {
        t.to_f32_vec()?
            .into_iter()
            .map(|v| serde_json::Value::from(v as i64))
            .collect()
    };
    Ok(serde_json::json!({ "dtype": t.dtype(), "shape": t.shape(), "data": data }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_json_arrays_become_f32_tensors() {
        let t = read_json(b"[[1, 2, 3], [4, 5, 6]]").unwrap();
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.as_slice::<f32>().unwrap(), &[1., 2., 3., 4., 5., 6.]);
        assert!(read_json(b"[[1, 2], [3]]").is_err());
    }

    #[test]
    fn typed_json_tensors_keep_their_type() {
        let t = read_json(br#"{"dtype": "i64", "shape": [2], "data": [7, -1]}"#).unwrap();
        assert_eq!(t.as_slice::<i64>().unwrap(), &[7, -1]);
        assert!(read_json(br#"{"dtype": "u8", "data": [300]}"#).is_err());
    }
}
