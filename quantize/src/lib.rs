//! # tern-quantize
//!
//! Shrinks fp32 ONNX models for devices and says what it cost: every transformation writes a
//! standard ONNX model that tern (and onnxruntime) runs, and [`report::evaluate`] measures
//! size, latency through tern and accuracy against the original.
//!
//! - [`dynamic`]: int8 weights for `MatMul`/`Gemm`, activations quantized at run time.
//! - [`fp16`]: fp16 weight storage with fp32 compute.
//! - [`int4`]: blockwise 4-bit weights for `MatMul`/`Gemm` (onnxruntime's `MatMulNBits`).
//! - [`images`]: calibration inputs from a folder of images and a preprocessing spec.
//! - [`prune`]: magnitude (unstructured) and channel (structured) pruning.
//! - [`sensitivity`]: which layers lose most accuracy when quantized.
//! - [`static_qdq`]: static int8 (QDQ form) calibrated through tern ([`calibration`]:
//!   MinMax, Percentile, Entropy).

pub mod calibration;
pub mod dynamic;
pub mod error;
pub mod fp16;
pub mod graph;
pub mod images;
pub mod int4;
pub mod prune;
pub mod report;
pub mod sensitivity;
pub mod static_qdq;

pub use error::{QuantizeError, Result};
