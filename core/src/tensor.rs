//! Typed, shaped tensors: what goes into a session and what comes out.
//!
//! A [`Tensor`] owns its data behind an `Arc`, in the SIMD-aligned storage the CPU kernels
//! need, so cloning is cheap and handing it to the CPU backend copies nothing.
//!
//! - Zero-copy input: allocate with [`Tensor::zeros`] and fill [`Tensor::as_mut_slice`]
//!   in place (e.g. decode an image straight into it).
//! - One copy: [`Tensor::from_vec`] / [`Tensor::from_slice`] copy the data once into aligned
//!   storage (a `Vec` from the allocator is not aligned for the kernels).
//! - Zero-copy output: [`Tensor::as_slice`] borrows the backend's buffer.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use tract_onnx::prelude::{DatumType, Tensor as TractTensor};
use tract_onnx::tract_core::ndarray::{ArrayD, IxDyn};

use crate::error::Error;
use crate::error::Result;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// 64-bit float.
    F64,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 16-bit signed integer.
    I16,
    /// 8-bit signed integer.
    I8,
    /// 64-bit unsigned integer.
    U64,
    /// 32-bit unsigned integer.
    U32,
    /// 16-bit unsigned integer.
    U16,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean.
    Bool,
    /// UTF-8 string.
    String,
}

impl DType {
    /// Every dtype, in declaration order.
    pub const ALL: [DType; 13] = [
        DType::F32,
        DType::F16,
        DType::F64,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U64,
        DType::U32,
        DType::U16,
        DType::U8,
        DType::Bool,
        DType::String,
    ];

    /// Short lowercase name: `f32`, `i64`, `bool`, `string`…
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I16 => "i16",
            DType::I8 => "i8",
            DType::U64 => "u64",
            DType::U32 => "u32",
            DType::U16 => "u16",
            DType::U8 => "u8",
            DType::Bool => "bool",
            DType::String => "string",
        }
    }

    /// Size of one element in bytes (`None` for strings).
    pub fn size_of(self) -> Option<usize> {
        match self {
            DType::F64 | DType::I64 | DType::U64 => Some(8),
            DType::F32 | DType::I32 | DType::U32 => Some(4),
            DType::F16 | DType::I16 | DType::U16 => Some(2),
            DType::I8 | DType::U8 | DType::Bool => Some(1),
            DType::String => None,
        }
    }

    /// Whether this is a floating-point type (the ones that can hold NaN).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::F64)
    }

    /// The dtype of an ONNX `TensorProto.DataType` code, if tern supports it.
    pub fn from_onnx(code: i32) -> Option<DType> {
        Some(match code {
            1 => DType::F32,
            2 => DType::U8,
            3 => DType::I8,
            4 => DType::U16,
            5 => DType::I16,
            6 => DType::I32,
            7 => DType::I64,
            8 => DType::String,
            9 => DType::Bool,
            10 => DType::F16,
            11 => DType::F64,
            12 => DType::U32,
            13 => DType::U64,
            _ => return None,
        })
    }

    pub(crate) fn from_tract(dt: DatumType) -> Option<DType> {
        Some(match dt.unquantized() {
            DatumType::F32 => DType::F32,
            DatumType::F16 => DType::F16,
            DatumType::F64 => DType::F64,
            DatumType::I64 => DType::I64,
            DatumType::I32 => DType::I32,
            DatumType::I16 => DType::I16,
            DatumType::I8 => DType::I8,
            DatumType::U64 => DType::U64,
            DatumType::U32 => DType::U32,
            DatumType::U16 => DType::U16,
            DatumType::U8 => DType::U8,
            DatumType::Bool => DType::Bool,
            DatumType::String => DType::String,
            _ => return None,
        })
    }

    pub(crate) fn to_tract(self) -> DatumType {
        match self {
            DType::F32 => DatumType::F32,
            DType::F16 => DatumType::F16,
            DType::F64 => DatumType::F64,
            DType::I64 => DatumType::I64,
            DType::I32 => DatumType::I32,
            DType::I16 => DatumType::I16,
            DType::I8 => DatumType::I8,
            DType::U64 => DatumType::U64,
            DType::U32 => DatumType::U32,
            DType::U16 => DatumType::U16,
            DType::U8 => DatumType::U8,
            DType::Bool => DatumType::Bool,
            DType::String => DatumType::String,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<DType> {
        let s = s.to_ascii_lowercase();
        let alias = match s.as_str() {
            "float" | "float32" => "f32",
            "float16" | "half" => "f16",
            "double" | "float64" => "f64",
            "int64" => "i64",
            "int32" => "i32",
            "int16" => "i16",
            "int8" => "i8",
            "uint64" => "u64",
            "uint32" => "u32",
            "uint16" => "u16",
            "uint8" => "u8",
            "str" => "string",
            other => other,
        };
        DType::ALL
            .into_iter()
            .find(|d| d.name() == alias)
            .ok_or_else(|| Error::tensor(format!("unknown dtype {s:?}")))
    }
}

mod sealed {
    /// Ties a Rust element type to tract's datum machinery; private so the set stays closed.
    pub trait Sealed: tract_onnx::prelude::Datum {}
}

/// A Rust type that can be the element of a [`Tensor`]: `f32`, `half::f16`, `f64`, the
/// integer types, `bool` and `String`.
pub trait Element: sealed::Sealed {
    /// The matching [`DType`].
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t { const DTYPE: DType = DType::$d; }
    )*};
}
element!(
    f32 => F32, half::f16 => F16, f64 => F64,
    i64 => I64, i32 => I32, i16 => I16, i8 => I8,
    u64 => U64, u32 => U32, u16 => U16, u8 => U8,
    bool => Bool, String => String,
);

/// An n-dimensional array with a [`DType`] and a shape. Cheap to clone (shared data).
#[derive(Clone)]
pub struct Tensor {
    inner: Arc<TractTensor>,
    dtype: DType,
}

impl Tensor {
    /// Builds a tensor from a `Vec` (one copy into aligned storage). Fails if `data.len()`
    /// is not the product of `shape`.
    pub fn from_vec<T: Element>(shape: &[usize], data: Vec<T>) -> Result<Tensor> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(Error::tensor(format!(
                "shape {shape:?} holds {expected} elements but {} were given",
                data.len()
            )));
        }
        let array = ArrayD::from_shape_vec(IxDyn(shape), data)
            .map_err(|e| Error::tensor(format!("cannot shape data as {shape:?}: {e}")))?;
        Ok(Tensor {
            inner: Arc::new(TractTensor::from(array)),
            dtype: T::DTYPE,
        })
    }

    /// Builds a tensor by copying a slice once into aligned storage.
    pub fn from_slice<T: Element + Copy>(shape: &[usize], data: &[T]) -> Result<Tensor> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(Error::tensor(format!(
                "shape {shape:?} holds {expected} elements but {} were given",
                data.len()
            )));
        }
        let t =
            TractTensor::from_shape(shape, data).map_err(|e| Error::tensor(format!("{e:#}")))?;
        Ok(Tensor {
            inner: Arc::new(t),
            dtype: T::DTYPE,
        })
    }

    /// A zero-filled (false, empty-string) tensor, to be filled in place through
    /// [`Tensor::as_mut_slice`] with no further copy.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let t = TractTensor::zero_dt(dtype.to_tract(), shape)
            .map_err(|e| Error::tensor(format!("{e:#}")))?;
        Ok(Tensor {
            inner: Arc::new(t),
            dtype,
        })
    }

    /// A rank-0 tensor holding one value.
    pub fn scalar<T: Element>(value: T) -> Tensor {
        let array = ArrayD::from_elem(IxDyn(&[]), value);
        Tensor {
            inner: Arc::new(TractTensor::from(array)),
            dtype: T::DTYPE,
        }
    }

    /// Builds a tensor of `dtype` from raw little-endian bytes (as found in `.npy` files or
    /// ONNX `raw_data`). Not for strings.
    pub fn from_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor> {
        let size = dtype
            .size_of()
            .ok_or_else(|| Error::tensor("string tensors cannot be built from raw bytes"))?;
        let needed = shape
            .iter()
            .try_fold(size, |n, d| n.checked_mul(*d))
            .ok_or_else(|| {
                Error::tensor(format!("{dtype} tensor of shape {shape:?} is too large"))
            })?;
        if needed != bytes.len() {
            return Err(Error::tensor(format!(
                "{dtype} tensor of shape {shape:?} needs {needed} bytes, got {}",
                bytes.len()
            )));
        }
        if dtype == DType::Bool && bytes.iter().any(|b| *b > 1) {
            return Err(Error::tensor("bool tensor bytes must be 0 or 1"));
        }
        // SAFETY: the byte length matches shape × element size (checked above), every bit
        // pattern is valid for the numeric types, and bools were checked to be 0 or 1.
        let t = unsafe { TractTensor::from_raw_dt(dtype.to_tract(), shape, bytes) }
            .map_err(|e| Error::tensor(e.to_string()))?;
        Ok(Tensor {
            inner: Arc::new(t),
            dtype,
        })
    }

    /// The largest tensor file [`Tensor::read_file`] reads.
    pub const MAX_FILE_BYTES: u64 = 1 << 30;

    /// Reads a tensor from a `.npy` file or a JSON file ([`Tensor::from_json`]), told apart
    /// by the NumPy magic bytes. A FIFO, a device or a file over
    /// [`Tensor::MAX_FILE_BYTES`] is refused with [`Error::Io`] rather than blocking or
    /// exhausting memory.
    pub fn read_file(path: &std::path::Path) -> Result<Tensor> {
        let bytes =
            crate::fs::read_regular(path, Self::MAX_FILE_BYTES).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if bytes.starts_with(b"\x93NUMPY") {
            Tensor::from_npy(&bytes)
        } else {
            Tensor::from_json(&bytes)
        }
    }

    /// Reads a NumPy `.npy` file's bytes (little-endian, C order, numeric or bool dtypes).
    pub fn from_npy(bytes: &[u8]) -> Result<Tensor> {
        check_npy_header(bytes)?;
        let npy = npyz::NpyFile::new(bytes)
            .map_err(|e| Error::tensor(format!("not a .npy file: {e}")))?;
        if npy.order() == npyz::Order::Fortran {
            return Err(Error::tensor(
                "Fortran-ordered .npy arrays are not supported",
            ));
        }
        let shape: Vec<usize> = npy.shape().iter().map(|d| *d as usize).collect();
        let npyz::DType::Plain(ts) = npy.dtype() else {
            return Err(Error::tensor("structured .npy dtypes are not supported"));
        };
        if ts.endianness() == npyz::Endianness::Big && ts.size_field() > 1 {
            return Err(Error::tensor("big-endian .npy arrays are not supported"));
        }
        use npyz::TypeChar::{Bool, Float, Int, Uint};
        let dtype = match (ts.type_char(), ts.size_field()) {
            (Float, 4) => DType::F32,
            (Float, 2) => DType::F16,
            (Float, 8) => DType::F64,
            (Int, 8) => DType::I64,
            (Int, 4) => DType::I32,
            (Int, 2) => DType::I16,
            (Int, 1) => DType::I8,
            (Uint, 8) => DType::U64,
            (Uint, 4) => DType::U32,
            (Uint, 2) => DType::U16,
            (Uint, 1) => DType::U8,
            (Bool, 1) => DType::Bool,
            _ => return Err(Error::tensor(format!("unsupported .npy dtype {ts}"))),
        };
        Tensor::from_bytes(dtype, &shape, npy.into_inner())
    }

    /// The tensor as a NumPy `.npy` file (version 1.0, little-endian, C order): what
    /// [`Tensor::from_npy`] reads back. Not for strings.
    pub fn to_npy(&self) -> Result<Vec<u8>> {
        let descr = match self.dtype {
            DType::F32 => "<f4",
            DType::F16 => "<f2",
            DType::F64 => "<f8",
            DType::I64 => "<i8",
            DType::I32 => "<i4",
            DType::I16 => "<i2",
            DType::I8 => "|i1",
            DType::U64 => "<u8",
            DType::U32 => "<u4",
            DType::U16 => "<u2",
            DType::U8 => "|u1",
            DType::Bool => "|b1",
            DType::String => return Err(Error::tensor("string tensors have no .npy form")),
        };
        let dims: String = self.shape().iter().map(|d| format!("{d}, ")).collect();
        let mut header = format!(
            "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}), }}",
            match self.shape().len() {
                1 => dims.trim_end().to_string(),
                _ => dims.trim_end_matches(", ").to_string(),
            }
        );
        // Magic (6) + version (2) + header length (2) + header + '\n', padded to 64 bytes.
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let header_len = u16::try_from(header.len())
            .map_err(|_| Error::tensor("rank too large for a .npy header"))?;
        let data = self.as_bytes()?;
        let mut bytes = Vec::with_capacity(10 + header.len() + data.len());
        bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
        bytes.extend_from_slice(&header_len.to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        Ok(bytes)
    }

    /// Decodes a serialized ONNX `TensorProto` (e.g. the `input_0.pb` files of the ONNX
    /// test suites). External data is not supported here.
    pub fn from_onnx_proto(bytes: &[u8]) -> Result<Tensor> {
        use prost::Message;
        let proto = tract_onnx::pb::TensorProto::decode(bytes)
            .map_err(|e| Error::tensor(format!("not an ONNX TensorProto: {e}")))?;
        let tensor =
            tract_onnx::tensor::load_tensor(&*tract_onnx::data_resolver::default(), &proto, None)
                .map_err(|e| Error::tensor(format!("{e:#}")))?;
        Tensor::from_tract(Arc::new(tensor))
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape (empty for a scalar).
    pub fn shape(&self) -> &[usize] {
        self.inner.shape()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements in row-major order, without copying. Fails if `T` is not the dtype.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        if T::DTYPE != self.dtype {
            return Err(Error::tensor(format!(
                "tensor is {}, read as {}",
                self.dtype,
                T::DTYPE
            )));
        }
        let view = self
            .inner
            .to_plain_array_view::<T>()
            .map_err(|e| Error::tensor(format!("{e:#}")))?;
        view.to_slice()
            .ok_or_else(|| Error::tensor("tensor is not contiguous"))
    }

    /// The elements, mutably, in row-major order. Copies the data first only if this tensor
    /// shares it with a clone.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        if T::DTYPE != self.dtype {
            return Err(Error::tensor(format!(
                "tensor is {}, written as {}",
                self.dtype,
                T::DTYPE
            )));
        }
        let view = Arc::make_mut(&mut self.inner)
            .to_plain_array_view_mut::<T>()
            .map_err(|e| Error::tensor(format!("{e:#}")))?;
        view.into_slice()
            .ok_or_else(|| Error::tensor("tensor is not contiguous"))
    }

    /// The elements copied into a `Vec`.
    pub fn to_vec<T: Element + Clone>(&self) -> Result<Vec<T>> {
        self.as_slice::<T>().map(<[T]>::to_vec)
    }

    /// The elements converted to `f32` (any numeric or bool dtype); handy for printing
    /// and comparing.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        if self.dtype == DType::String {
            return Err(Error::tensor("string tensors have no numeric value"));
        }
        let cast = self
            .inner
            .cast_to::<f32>()
            .map_err(|e| Error::tensor(format!("{e:#}")))?;
        let view = cast
            .to_plain_array_view::<f32>()
            .map_err(|e| Error::tensor(format!("{e:#}")))?;
        Ok(view.iter().copied().collect())
    }

    /// The raw little-endian bytes of a numeric tensor.
    pub fn as_bytes(&self) -> Result<&[u8]> {
        if self.dtype == DType::String {
            return Err(Error::tensor("string tensors have no raw bytes"));
        }
        Ok(self.inner.as_bytes())
    }

    /// How many elements are NaN (0 for non-float dtypes). Infinities are not counted:
    /// they are legitimate values (attention masks, log-probabilities).
    pub fn count_nan(&self) -> usize {
        fn count<T: Element + Copy>(t: &Tensor, is_nan: impl Fn(T) -> bool) -> usize {
            t.as_slice::<T>()
                .map(|s| s.iter().filter(|v| is_nan(**v)).count())
                .unwrap_or(0)
        }
        match self.dtype {
            DType::F32 => count::<f32>(self, f32::is_nan),
            DType::F64 => count::<f64>(self, f64::is_nan),
            DType::F16 => count::<half::f16>(self, half::f16::is_nan),
            _ => 0,
        }
    }

    /// Wraps a tensor that came out of tract. Fails for dtypes tern does not expose.
    pub(crate) fn from_tract(inner: Arc<TractTensor>) -> Result<Tensor> {
        let dt = inner.datum_type();
        if dt == DatumType::TDim {
            // tract's symbolic-integer type (e.g. the output of `Shape`): concrete by now.
            let ints = inner
                .cast_to::<i64>()
                .map_err(|e| Error::tensor(format!("{e:#}")))?;
            return Ok(Tensor {
                inner: Arc::new(ints.into_owned()),
                dtype: DType::I64,
            });
        }
        let dtype = DType::from_tract(dt)
            .ok_or_else(|| Error::tensor(format!("backend produced unsupported type {dt:?}")))?;
        if dt.is_quantized() {
            // Quantized outputs are exposed as their storage type.
            let mut t = (*inner).clone();
            // SAFETY: same storage, only the quantization parameters are dropped.
            unsafe { t.set_datum_type(dt.unquantized()) };
            return Ok(Tensor {
                inner: Arc::new(t),
                dtype,
            });
        }
        Ok(Tensor { inner, dtype })
    }

    pub(crate) fn tract(&self) -> &Arc<TractTensor> {
        &self.inner
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor<{}>{:?}", self.dtype, self.shape())
    }
}

/// Checks that a `.npy` header's declared length fits in `bytes`: npyz allocates the
/// declared length before reading it, so a 4-byte length of `0xffffffff` in a 20-byte
/// file would allocate 4 GiB (found by the `tensor_parse` fuzz target).
fn check_npy_header(bytes: &[u8]) -> Result<()> {
    let bad = |why: &str| Err(Error::tensor(format!("not a .npy file: {why}")));
    if bytes.len() < 10 || !bytes.starts_with(b"\x93NUMPY") {
        return bad("no .npy magic");
    }
    let (len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return bad(&format!("format version {v}")),
    };
    if len > bytes.len() - start {
        return bad(&format!(
            "header of {len} bytes in a file of {} bytes",
            bytes.len()
        ));
    }
    // The header is a Python literal; npyz's parser backtracks on every nested bracket, so
    // a header of a few dozen `[` takes minutes (found by fuzzing). A real header nests a
    // dict, a shape tuple and at most a few levels of structured dtype.
    let mut depth = 0usize;
    for &b in &bytes[start..start + len] {
        match b {
            b'{' | b'[' | b'(' => depth += 1,
            b'}' | b']' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > MAX_NPY_HEADER_NESTING {
            return bad("header nests too deep");
        }
    }
    Ok(())
}

/// How deep brackets may nest in a `.npy` header (a plain array's header nests two levels).
const MAX_NPY_HEADER_NESTING: usize = 8;

/// A tensor as JSON: `{"dtype": "f32", "shape": [1, 4], "data": [...]}`.
#[derive(Debug, serde::Deserialize)]
struct JsonTensor {
    /// Element type; `f32` when omitted.
    #[serde(default = "f32_dtype")]
    dtype: DType,
    /// Shape; `[len(data)]` when omitted.
    #[serde(default)]
    shape: Option<Vec<usize>>,
    /// Elements in row-major order.
    data: Vec<serde_json::Value>,
}

fn f32_dtype() -> DType {
    DType::F32
}

impl Tensor {
    /// Parses a tensor from JSON: `{"dtype": "i64", "shape": [2], "data": [7, -1]}` (dtype
    /// `f32` and shape `[len(data)]` when omitted), or a nested array of numbers read as
    /// f32 (`[[1, 2], [3, 4]]`). Numbers must fit the dtype; float16, float32/64, the
    /// integer types up to 64 bits, bool and string are supported.
    pub fn from_json(bytes: &[u8]) -> Result<Tensor> {
        let bad = |what: &dyn std::fmt::Display| Error::tensor(format!("JSON tensor: {what}"));
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(&e))?;
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
            serde_json::from_value(value).map_err(|e| bad(&e))?
        };
        let shape = jt.shape.unwrap_or_else(|| vec![jt.data.len()]);
        Tensor::from_json_data(jt.dtype, &shape, &jt.data)
    }

    /// Builds a tensor of `dtype` and `shape` from its elements as JSON values, in row-major
    /// order (what [`Tensor::from_json`] reads in `data`, and what the Open Inference
    /// Protocol sends). Numbers must fit the dtype; float16, float32/64, the integer types,
    /// bool and string are supported.
    pub fn from_json_data(
        dtype: DType,
        shape: &[usize],
        data: &[serde_json::Value],
    ) -> Result<Tensor> {
        let bad = |what: &dyn std::fmt::Display| Error::tensor(format!("JSON tensor: {what}"));
        let each = |what: &'static str, f: &dyn Fn(&serde_json::Value) -> bool| match data
            .iter()
            .find(|v| !f(v))
        {
            Some(v) => Err(bad(&format!("expected {what}, got {v}"))),
            None => Ok(()),
        };
        let floats = || -> Result<Vec<f64>> {
            each("a number", &|v| v.is_number())?;
            Ok(data.iter().filter_map(|v| v.as_f64()).collect())
        };
        let ints = || -> Result<Vec<i64>> {
            each("an integer", &|v| v.is_i64())?;
            Ok(data.iter().filter_map(|v| v.as_i64()).collect())
        };
        match dtype {
            DType::F32 => {
                Tensor::from_vec(shape, floats()?.into_iter().map(|v| v as f32).collect())
            }
            DType::F64 => Tensor::from_vec(shape, floats()?),
            DType::F16 => Tensor::from_vec(
                shape,
                floats()?.into_iter().map(half::f16::from_f64).collect(),
            ),
            DType::I64 => Tensor::from_vec(shape, ints()?),
            DType::I32 => Tensor::from_vec(shape, narrow::<i32>(ints()?)?),
            DType::I16 => Tensor::from_vec(shape, narrow::<i16>(ints()?)?),
            DType::I8 => Tensor::from_vec(shape, narrow::<i8>(ints()?)?),
            DType::U64 => {
                each("an unsigned integer", &|v| v.is_u64())?;
                Tensor::from_vec(shape, data.iter().filter_map(|v| v.as_u64()).collect())
            }
            DType::U32 => Tensor::from_vec(shape, narrow::<u32>(ints()?)?),
            DType::U16 => Tensor::from_vec(shape, narrow::<u16>(ints()?)?),
            DType::U8 => Tensor::from_vec(shape, narrow::<u8>(ints()?)?),
            DType::Bool => {
                each("a bool", &|v| v.is_boolean())?;
                Tensor::from_vec(shape, data.iter().filter_map(|v| v.as_bool()).collect())
            }
            DType::String => {
                each("a string", &|v| v.is_string())?;
                let strings = data.iter().filter_map(|v| v.as_str().map(str::to_string));
                Tensor::from_vec(shape, strings.collect())
            }
        }
    }

    /// The tensor as JSON, in the form [`Tensor::from_json`] reads (non-finite floats
    /// become `null`).
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let data = self.json_data()?;
        Ok(serde_json::json!({ "dtype": self.dtype(), "shape": self.shape(), "data": data }))
    }

    /// The elements as JSON values in row-major order, exactly (integers are not rounded
    /// through floats; non-finite floats become `null`): the inverse of
    /// [`Tensor::from_json_data`].
    pub fn json_data(&self) -> Result<Vec<serde_json::Value>> {
        fn all<T: Element + Copy>(
            t: &Tensor,
            f: impl Fn(T) -> serde_json::Value,
        ) -> Result<Vec<serde_json::Value>> {
            Ok(t.as_slice::<T>()?.iter().map(|v| f(*v)).collect())
        }
        let float =
            |v: f64| serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into);
        match self.dtype() {
            DType::String => Ok(self
                .as_slice::<String>()?
                .iter()
                .map(|s| serde_json::Value::from(s.as_str()))
                .collect()),
            DType::F32 => all(self, |v: f32| float(f64::from(v))),
            DType::F16 => all(self, |v: half::f16| float(f64::from(v))),
            DType::F64 => all(self, float),
            DType::I64 => all(self, <serde_json::Value as From<i64>>::from),
            DType::I32 => all(self, <serde_json::Value as From<i32>>::from),
            DType::I16 => all(self, <serde_json::Value as From<i16>>::from),
            DType::I8 => all(self, <serde_json::Value as From<i8>>::from),
            DType::U64 => all(self, <serde_json::Value as From<u64>>::from),
            DType::U32 => all(self, <serde_json::Value as From<u32>>::from),
            DType::U16 => all(self, <serde_json::Value as From<u16>>::from),
            DType::U8 => all(self, <serde_json::Value as From<u8>>::from),
            DType::Bool => all(self, <serde_json::Value as From<bool>>::from),
        }
    }
}

fn narrow<T: TryFrom<i64>>(v: Vec<i64>) -> Result<Vec<T>> {
    v.into_iter()
        .map(|x| {
            T::try_from(x).map_err(|_| Error::tensor(format!("JSON tensor: {x} is out of range")))
        })
        .collect()
}

/// A nested JSON array's shape and elements; ragged arrays are refused.
fn flatten(
    v: &serde_json::Value,
    depth: usize,
    shape: &mut Vec<usize>,
    out: &mut Vec<serde_json::Value>,
) -> Result<()> {
    let ragged = || Error::tensor(format!("JSON tensor: ragged nested array at depth {depth}"));
    match v {
        serde_json::Value::Array(items) => {
            if shape.len() == depth {
                shape.push(items.len());
            } else if shape.get(depth) != Some(&items.len()) {
                return Err(ragged());
            }
            items
                .iter()
                .try_for_each(|item| flatten(item, depth + 1, shape, out))
        }
        other => {
            if depth != shape.len() {
                return Err(ragged());
            }
            out.push(other.clone());
            Ok(())
        }
    }
}

/// How far a tensor is from an expected one ([`compare_close`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Closeness {
    /// The largest `|actual − expected|`.
    pub max_abs: f64,
    /// The largest `|actual − expected| / |expected|` over elements with `|expected| > 1e-6`.
    pub max_rel: f64,
    /// The largest difference as a share of what the tolerance allows (≤ 1 passes).
    pub worst_share: f64,
}

impl Closeness {
    /// The larger of each figure.
    pub fn worst(self, other: Closeness) -> Closeness {
        Closeness {
            max_abs: self.max_abs.max(other.max_abs),
            max_rel: self.max_rel.max(other.max_rel),
            worst_share: self.worst_share.max(other.worst_share),
        }
    }
}

/// Compares like `numpy.testing.assert_allclose`: each element must satisfy
/// `|actual − expected| ≤ atol + rtol·|expected|`; NaN matches only NaN and infinities must
/// be equal; integers, bools and strings must match exactly; dtypes and shapes must match.
/// The error says which element differs and by how much. Used by golden-sample checks and
/// by the test suites against onnxruntime.
pub fn compare_close(
    actual: &Tensor,
    expected: &Tensor,
    atol: f64,
    rtol: f64,
) -> std::result::Result<Closeness, String> {
    if actual.dtype() != expected.dtype() {
        return Err(format!(
            "dtype {} where {} is expected",
            actual.dtype(),
            expected.dtype()
        ));
    }
    if actual.shape() != expected.shape() {
        return Err(format!(
            "shape {:?} where {:?} is expected",
            actual.shape(),
            expected.shape()
        ));
    }
    if actual.dtype() == DType::String {
        let (a, e) = (
            actual.as_slice::<String>().map_err(|e| e.to_string())?,
            expected.as_slice::<String>().map_err(|e| e.to_string())?,
        );
        return match a.iter().zip(e).position(|(x, y)| x != y) {
            None => Ok(Closeness::default()),
            Some(i) => Err(format!(
                "element {i}: {:?} where {:?} is expected",
                a[i], e[i]
            )),
        };
    }
    let as_f64 = |t: &Tensor| -> std::result::Result<Vec<f64>, String> {
        let err = |e: Error| e.to_string();
        Ok(match t.dtype() {
            DType::F64 => t.to_vec::<f64>().map_err(err)?,
            DType::I64 => t
                .as_slice::<i64>()
                .map_err(err)?
                .iter()
                .map(|&v| v as f64)
                .collect(),
            DType::U64 => t
                .as_slice::<u64>()
                .map_err(err)?
                .iter()
                .map(|&v| v as f64)
                .collect(),
            _ => t
                .to_f32_vec()
                .map_err(err)?
                .into_iter()
                .map(f64::from)
                .collect(),
        })
    };
    let (a, e) = (as_f64(actual)?, as_f64(expected)?);
    let exact = !actual.dtype().is_float();
    let mut c = Closeness::default();
    for (i, (&x, &y)) in a.iter().zip(&e).enumerate() {
        if x.is_nan() && y.is_nan() || x == y {
            continue;
        }
        let d = (x - y).abs();
        let allowed = atol + rtol * y.abs();
        // NaN against a number, or a difference at an infinity, fails `d <= allowed`.
        let within = d <= allowed;
        if exact || !within || !x.is_finite() || !y.is_finite() {
            return Err(format!(
                "element {i}: {x} where {y} is expected (|diff| {d:.3e}, atol {atol:e}, rtol {rtol:e})"
            ));
        }
        c.max_abs = c.max_abs.max(d);
        if y.abs() > 1e-6 {
            c.max_rel = c.max_rel.max(d / y.abs());
        }
        if allowed > 0.0 {
            c.worst_share = c.worst_share.max(d / allowed);
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_vec_checks_length() {
        let err = Tensor::from_vec(&[2, 3], vec![1.0f32; 5]).unwrap_err();
        assert_eq!(err.kind(), "tensor");
        let t = Tensor::from_vec(&[2, 3], vec![1.0f32; 6]).unwrap();
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.dtype(), DType::F32);
    }

    #[test]
    fn compare_close_applies_atol_plus_rtol_and_exact_integers() {
        let t = |v: &[f32]| Tensor::from_slice(&[v.len()], v).unwrap();
        let c = compare_close(&t(&[1.001, 100.9]), &t(&[1.0, 100.0]), 1e-3, 1e-2).unwrap();
        assert!((c.max_abs - 0.9).abs() < 1e-4, "{c:?}");
        assert!(c.worst_share > 0.89 && c.worst_share <= 1.0, "{c:?}");
        assert!((c.max_rel - 0.009).abs() < 1e-5, "{c:?}");
        assert!(compare_close(&t(&[101.1]), &t(&[100.0]), 1e-3, 1e-2).is_err());
        assert!(compare_close(&t(&[f32::NAN]), &t(&[f32::NAN]), 0.0, 0.0).is_ok());
        assert!(compare_close(&t(&[f32::NAN]), &t(&[1.0]), 1.0, 1.0).is_err());
        assert!(compare_close(&t(&[1.0]), &t(&[f32::NAN]), 1.0, 1.0).is_err());
        assert!(compare_close(&t(&[f32::INFINITY]), &t(&[f32::INFINITY]), 0.0, 0.0).is_ok());
        assert!(compare_close(&t(&[1e30]), &t(&[f32::INFINITY]), 1.0, 1.0).is_err());
        assert!(compare_close(&t(&[1.0]), &t(&[1.0, 2.0]), 1.0, 1.0).is_err());
        let ints = |v: &[i64]| Tensor::from_slice(&[v.len()], v).unwrap();
        assert!(compare_close(&ints(&[1, 2]), &t(&[1.0, 2.0]), 1.0, 1.0).is_err());
        assert!(compare_close(&ints(&[1, 3]), &ints(&[1, 2]), 10.0, 10.0).is_err());
        // i64 beyond f32's precision still compares exactly.
        assert!(compare_close(&ints(&[1 << 40]), &ints(&[(1 << 40) + 1]), 0.0, 0.0).is_err());
        assert_eq!(
            compare_close(&ints(&[7]), &ints(&[7]), 0.0, 0.0).unwrap(),
            Closeness::default()
        );
    }

    #[test]
    fn npy_round_trips_every_numeric_dtype_and_rank() {
        let cases = [
            Tensor::from_vec(&[2, 3], vec![1.5f32, -2.0, 0.0, 3.25, 7.0, -0.5]).unwrap(),
            Tensor::from_vec(&[4], vec![1i64, -2, 3, i64::MAX]).unwrap(),
            Tensor::from_vec(&[1, 2, 1], vec![-128i8, 127]).unwrap(),
            Tensor::from_vec(&[3], vec![0u8, 128, 255]).unwrap(),
            Tensor::from_vec(&[2], vec![true, false]).unwrap(),
            Tensor::from_vec(&[1], vec![half::f16::from_f32(0.5)]).unwrap(),
            Tensor::scalar(2.5f64),
            Tensor::from_vec(&[0, 3], Vec::<i32>::new()).unwrap(),
        ];
        for t in cases {
            let bytes = t.to_npy().unwrap();
            assert_eq!((bytes.len() - t.as_bytes().unwrap().len()) % 64, 0);
            let back = Tensor::from_npy(&bytes).unwrap();
            assert_eq!(back.dtype(), t.dtype());
            assert_eq!(back.shape(), t.shape());
            assert_eq!(back.as_bytes().unwrap(), t.as_bytes().unwrap());
        }
        let s = Tensor::from_vec(&[1], vec!["a".to_string()]).unwrap();
        assert_eq!(s.to_npy().unwrap_err().kind(), "tensor");
    }

    #[test]
    fn as_slice_does_not_copy_and_checks_type() {
        let t = Tensor::from_vec(&[3, 2], (0..6).collect::<Vec<i64>>()).unwrap();
        let clone = t.clone();
        assert_eq!(
            t.as_slice::<i64>().unwrap().as_ptr(),
            clone.as_slice::<i64>().unwrap().as_ptr()
        );
        assert_eq!(t.as_slice::<i64>().unwrap(), &[0, 1, 2, 3, 4, 5]);
        assert_eq!(t.as_slice::<f32>().unwrap_err().kind(), "tensor");
    }

    #[test]
    fn zeros_filled_in_place_and_copy_on_write() {
        let mut t = Tensor::zeros(DType::F32, &[2, 2]).unwrap();
        let ptr = t.as_slice::<f32>().unwrap().as_ptr();
        t.as_mut_slice::<f32>()
            .unwrap()
            .copy_from_slice(&[1., 2., 3., 4.]);
        assert_eq!(
            t.as_slice::<f32>().unwrap().as_ptr(),
            ptr,
            "unshared tensor written in place"
        );
        let shared = t.clone();
        t.as_mut_slice::<f32>().unwrap()[0] = 9.;
        assert_eq!(
            shared.as_slice::<f32>().unwrap(),
            &[1., 2., 3., 4.],
            "clone unaffected"
        );
        assert_eq!(t.as_slice::<f32>().unwrap(), &[9., 2., 3., 4.]);
        assert!(t.as_mut_slice::<i32>().is_err());
        let s = Tensor::from_slice(&[3], &[1u8, 2, 3]).unwrap();
        assert_eq!(s.as_slice::<u8>().unwrap(), &[1, 2, 3]);
        assert!(Tensor::from_slice(&[2], &[1u8, 2, 3]).is_err());
    }

    #[test]
    fn from_bytes_round_trips_and_validates() {
        let t = Tensor::from_bytes(DType::F32, &[2], &[0, 0, 128, 63, 0, 0, 0, 64]).unwrap();
        assert_eq!(t.as_slice::<f32>().unwrap(), &[1.0, 2.0]);
        assert!(Tensor::from_bytes(DType::F32, &[3], &[0; 8]).is_err());
        assert!(Tensor::from_bytes(DType::Bool, &[1], &[7]).is_err());
    }

    #[test]
    fn counts_nan_but_not_infinity() {
        let t = Tensor::from_vec(&[4], vec![1.0f32, f32::NAN, f32::INFINITY, 0.0]).unwrap();
        assert_eq!(t.count_nan(), 1);
        assert_eq!(Tensor::from_vec(&[1], vec![1i32]).unwrap().count_nan(), 0);
    }

    #[test]
    fn npy_files_are_read_without_reinterpretation() {
        // np.save of np.arange(3, dtype='<i4').reshape(1, 3), header padded to 64 bytes.
        let mut bytes = b"\x93NUMPY\x01\x00v\x00".to_vec();
        let mut header = "{'descr': '<i4', 'fortran_order': False, 'shape': (1, 3), }".to_string();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        bytes[8] = header.len() as u8;
        bytes.extend_from_slice(header.as_bytes());
        for v in [0i32, 1, 2] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let t = Tensor::from_npy(&bytes).unwrap();
        assert_eq!(t.shape(), &[1, 3]);
        assert_eq!(t.as_slice::<i32>().unwrap(), &[0, 1, 2]);
    }

    #[test]
    fn deeply_nested_npy_headers_are_refused_without_parsing() {
        // The fuzzer's slow input: a header opening 40 brackets took npyz minutes.
        let header = format!("{{{}'shape': (1,), }}\n", "[".repeat(40));
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        let err = Tensor::from_npy(&bytes).unwrap_err();
        assert!(err.to_string().contains("nests too deep"), "{err}");
    }

    #[test]
    fn dtype_names_parse() {
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
        }
        assert_eq!("float32".parse::<DType>().unwrap(), DType::F32);
        assert!("complex".parse::<DType>().is_err());
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;

    #[test]
    fn nested_json_arrays_become_f32_tensors() {
        let t = Tensor::from_json(b"[[1, 2, 3], [4, 5, 6]]").unwrap();
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.as_slice::<f32>().unwrap(), &[1., 2., 3., 4., 5., 6.]);
        assert!(Tensor::from_json(b"[[1, 2], [3]]").is_err());
        assert!(Tensor::from_json(b"[[1, 2], 3]").is_err());
    }

    #[test]
    fn typed_json_tensors_keep_their_type_and_round_trip() {
        let t = Tensor::from_json(br#"{"dtype": "i64", "shape": [2], "data": [7, -1]}"#).unwrap();
        assert_eq!(t.as_slice::<i64>().unwrap(), &[7, -1]);
        let back = serde_json::to_vec(&t.to_json().unwrap()).unwrap();
        assert_eq!(
            Tensor::from_json(&back).unwrap().as_slice::<i64>().unwrap(),
            &[7, -1]
        );
        assert!(Tensor::from_json(br#"{"dtype": "u8", "data": [300]}"#).is_err());
        assert!(Tensor::from_json(br#"{"dtype": "i32", "data": [1.5]}"#).is_err());
        assert!(Tensor::from_json(br#"{"dtype": "f32", "shape": [3], "data": [1]}"#).is_err());
    }

    #[test]
    fn every_dtype_round_trips_through_json_data_exactly() {
        let big = (1i64 << 53) + 1; // not representable in f32 or f64
        let cases: Vec<Tensor> = vec![
            Tensor::from_vec(&[2], vec![big, -big]).unwrap(),
            Tensor::from_vec(&[2], vec![u64::MAX, 0]).unwrap(),
            Tensor::from_vec(&[2], vec![i32::MIN, i32::MAX]).unwrap(),
            Tensor::from_vec(&[2], vec![u8::MAX, 0]).unwrap(),
            Tensor::from_vec(&[2], vec![0.1f64, -3.5]).unwrap(),
            Tensor::from_vec(&[2], vec![half::f16::from_f32(0.5), half::f16::MAX]).unwrap(),
            Tensor::from_vec(&[1, 2], vec![true, false]).unwrap(),
            Tensor::from_vec(&[1], vec!["é".to_string()]).unwrap(),
        ];
        for t in cases {
            let data = t.json_data().unwrap();
            let back = Tensor::from_json_data(t.dtype(), t.shape(), &data).unwrap();
            assert_eq!(back.dtype(), t.dtype());
            assert_eq!(back.shape(), t.shape());
            assert_eq!(back.json_data().unwrap(), data, "{:?}", t.dtype());
        }
        assert_eq!(
            Tensor::from_vec(&[1], vec![big])
                .unwrap()
                .json_data()
                .unwrap(),
            vec![serde_json::Value::from(big)]
        );
        assert!(Tensor::from_json_data(DType::U64, &[1], &[serde_json::json!(-1)]).is_err());
    }
}

#[cfg(test)]
mod npy_tests {
    use super::*;

    /// The `tensor_parse` fuzz target's find: a v3 header declaring 0xffffffff bytes made
    /// npyz allocate 4 GiB; it is refused before npyz sees it.
    #[test]
    fn a_header_longer_than_the_file_is_refused_without_allocating_it() {
        let bytes = b"\x93NUMPY\x03\x00\xff\xff\xff\xff\xff\xff\xff\x17[3";
        let err = Tensor::from_npy(bytes).unwrap_err();
        assert!(
            err.to_string().contains("header of 4294967295 bytes"),
            "{err}"
        );
        assert!(Tensor::from_npy(b"\x93NUMPY\x01\x00\xff\xff").is_err());
        assert!(Tensor::from_npy(b"\x93NUM").is_err());
    }
}
