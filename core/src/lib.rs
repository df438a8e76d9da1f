//! # tern — on-device ONNX inference
//!
//! Load an ONNX model, build a [`Session`], run it with named [`Tensor`]s:
//!
//! ```no_run
//! use tern::{Model, Session, SessionOptions, Tensor};
//! # fn main() -> tern::Result<()> {
//! let model = Model::load("model.onnx")?;
//! let session = Session::new(&model, SessionOptions::default().threads(2))?;
//! let x = Tensor::from_vec(&[1, 4], vec![0.1f32, 0.2, 0.3, 0.4])?;
//! let outputs = session.run([("x", x)])?;
//! println!("{:?}", outputs[0].to_f32_vec()?);
//! # Ok(()) }
//! ```
//!
//! The pipeline is a chain of small stages, following tract: [`model`] decodes the protobuf
//! and describes the model, [`options`] names the choices, [`session`] validates options
//! and inputs, and a backend in [`backend`] turns the graph into something runnable
//! (tract's optimized plan on CPU).
#![warn(missing_docs)]

pub mod backend;
pub mod baseline;
pub mod error;
pub mod fs;
pub mod kinds;
pub mod model;
pub mod onnx;
pub mod options;
mod qdq;
pub mod session;
pub mod sync;
pub mod telemetry;
pub mod tensor;

pub use backend::{NodeTime, PlanReport, Specialisation};
pub use error::{Error, ErrorKind, Result};
pub use kinds::{Backend, Resource, TensorRole};
pub use model::{Dim, Model, ModelFiles, ModelInfo, Opset, TensorInfo};
pub use options::{
    CpuOptions, GpuOptions, GpuPrecision, InputOptions, LimitOptions, NanPolicy, OptLevel,
    SessionOptions, ShapePolicy, TelemetryChoice, TelemetryOptions, ThreadPolicy, MAX_THREADS,
};
pub use session::{Outputs, Session, Trace};
pub use telemetry::Telemetry;
pub use tensor::{DType, Element, Tensor};

/// This library's version (semver): what a bundle's `min_tern` is compared with.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
