//! # tern-ffi: the tern SDK for Kotlin, Swift and Python
//!
//! A thin UniFFI skin over the `tern` crate, in the style of Glean: all logic stays in Rust;
//! the platform supplies only what it must (the telemetry [`TelemetryUploader`]).
//!
//! - [`TernModel`] loads a model (path or bytes) and describes it; [`TernSession`] runs it,
//!   with [`TernSession::run`] (blocking) and [`TernSession::run_async`] (a `suspend fun` in
//!   Kotlin, `async` in Swift, run on a tern thread so the UI thread never blocks).
//! - Tensors cross as [`TensorData`]: dtype, shape and little-endian bytes (a `ByteArray` in
//!   Kotlin, `Data` in Swift: one copy, no boxing), with helpers for f32/i64/i32 data.
//! - Every entry point returns `Result<_, TernError>`: an exception of a sealed hierarchy on
//!   the foreign side. tern itself catches backend panics; UniFFI catches any other.
//! - Serving patterns from `tern-flows`: [`TernBatcher`] coalesces concurrent callers'
//!   requests into batched runs; [`TernStream`] runs a stateful model chunk by chunk with
//!   its state carried; [`TernFlows`] runs the cascades, fan-outs and pipelines of a flow
//!   file, its callback steps served by the app's [`FlowCallback`] objects.
//! - Telemetry: [`init_telemetry`] opens the on-device buffer that every session feeds;
//!   [`TernTelemetry`] records app events and uploads through the platform's uploader.
//! - The model lifecycle from `tern-bundle`: [`TernModelStore`] (install, update through
//!   the app's [`ModelFetcher`], load under the crash breadcrumb) and [`TernRollout`]
//!   (shadow, canary, A/B with promotion and rollback by itself, heard by the app's
//!   [`RolloutListener`]).

use std::collections::HashMap;
use std::sync::Arc;

use tern::telemetry::{self as tel, Signal, TelemetryStats};
use tern::{Backend, DType, ErrorKind, GpuPrecision, NanPolicy, ShapePolicy, ThreadPolicy};
use tern_flows::{ErrorKind as FlowErrorKind, Priority};

uniffi::setup_scaffolding!();

mod flow;
mod lifecycle;
pub use flow::{FlowCallback, FlowResult, MissingStep, StepAnswer, StepFailure, TernFlows};
pub use lifecycle::{
    FetchResult, InstallResult, LoadedModel, ModelFetcher, ModelStatus, QuarantinedVersion,
    RolloutConfig, RolloutEvent, RolloutHealth, RolloutListener, RolloutStage, RolloutVerdict,
    Served, StoreConfig, TernModelStore, TernRollout, Tolerances, UpdateResult,
};

/// Everything that can go wrong, as one exception hierarchy on the foreign side.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum TernError {
    /// A file could not be read or written.
    #[error("{detail}")]
    Io {
        /// Description.
        detail: String,
    },
    /// The bytes are not a valid ONNX model.
    #[error("{detail}")]
    InvalidModel {
        /// Description.
        detail: String,
    },
    /// The model uses an operator no backend implements.
    #[error("{detail}")]
    UnsupportedOp {
        /// The ONNX op type.
        op_type: String,
        /// The node using it.
        node: String,
        /// Description.
        detail: String,
    },
    /// An input is wrong: unknown, missing or duplicate name, dtype, shape, NaN, or a tensor
    /// whose bytes do not match its shape.
    #[error("{detail}")]
    InvalidInput {
        /// Which input failure (`ShapeMismatch`, `DtypeMismatch`, `Nan`, …).
        kind: ErrorKind,
        /// Description.
        detail: String,
    },
    /// A session option is invalid, or the asked-for backend is unavailable.
    #[error("{detail}")]
    InvalidOption {
        /// `InvalidOption` or `BackendUnavailable`.
        kind: ErrorKind,
        /// Description.
        detail: String,
    },
    /// The backend failed to prepare or run the model.
    #[error("{detail}")]
    Inference {
        /// `Compile`, `Inference` or `Panic`.
        kind: ErrorKind,
        /// Description.
        detail: String,
    },
    /// A batcher or stream refused its configuration or a request (not the model's own
    /// failures, which keep their kinds above).
    #[error("{detail}")]
    Flow {
        /// Which refusal (`NotBatchable`, `BadState`, `Overloaded`, …).
        kind: FlowErrorKind,
        /// Description.
        detail: String,
    },
    /// A model bundle, store, update or rollout refused something (a bad signature, an
    /// expired or rolled-back version, a golden mismatch, a quarantined version…; the
    /// model's own failures keep their kinds above).
    #[error("{detail}")]
    Bundle {
        /// Which refusal.
        kind: tern_bundle::ErrorKind,
        /// Description.
        detail: String,
    },
}

impl From<tern_flows::Error> for TernError {
    fn from(e: tern_flows::Error) -> Self {
        match e {
            tern_flows::Error::Model(e) => e.into(),
            e => TernError::Flow {
                kind: e.kind(),
                detail: e.to_string(),
            },
        }
    }
}

impl From<tern::Error> for TernError {
    fn from(e: tern::Error) -> Self {
        let detail = e.to_string();
        let kind = e.error_kind();
        match e {
            tern::Error::Io { .. } => TernError::Io { detail },
            tern::Error::InvalidModel { .. } => TernError::InvalidModel { detail },
            tern::Error::UnsupportedOp { op_type, node, .. } => TernError::UnsupportedOp {
                op_type,
                node,
                detail,
            },
            tern::Error::UnknownInput { .. }
            | tern::Error::MissingInput { .. }
            | tern::Error::DuplicateInput { .. }
            | tern::Error::DTypeMismatch { .. }
            | tern::Error::ShapeMismatch { .. }
            | tern::Error::ShapeConflict { .. }
            | tern::Error::ResourceLimit { .. }
            | tern::Error::InvalidValue { .. }
            | tern::Error::NanValues { .. }
            | tern::Error::Tensor { .. } => TernError::InvalidInput { kind, detail },
            tern::Error::InvalidOption { .. } | tern::Error::BackendUnavailable { .. } => {
                TernError::InvalidOption { kind, detail }
            }
            _ => TernError::Inference { kind, detail },
        }
    }
}

type Result<T> = std::result::Result<T, TernError>;

// tern's own types, exposed as they are (UniFFI mirrors them from these definitions; a
// variant tern adds and these lack is a compile error here, not a silent gap).

#[uniffi::remote(Enum)]
pub enum ErrorKind {
    Io,
    InvalidModel,
    UnsupportedOp,
    Compile,
    UnknownInput,
    MissingInput,
    DuplicateInput,
    DtypeMismatch,
    ShapeMismatch,
    ShapeConflict,
    InvalidValue,
    Nan,
    Tensor,
    BackendUnavailable,
    ResourceLimit,
    InvalidOption,
    Inference,
    Panic,
}

#[uniffi::remote(Enum)]
pub enum FlowErrorKind {
    Model,
    NotBatchable,
    BadState,
    BadChunk,
    InvalidOption,
    Overloaded,
    Closed,
    QueueFull,
    QueueInUse,
    Io,
    Timeout,
    BreakerOpen,
    Busy,
    Callback,
    BadFlow,
    TooFewAnswers,
}

#[uniffi::remote(Enum)]
pub enum Backend {
    Cpu,
    Gpu,
    Auto,
}

#[uniffi::remote(Enum)]
pub enum GpuPrecision {
    Auto,
    F32,
    F16,
}

#[uniffi::remote(Enum)]
pub enum ThreadPolicy {
    Measure,
    Always,
}

#[uniffi::remote(Enum)]
pub enum ShapePolicy {
    Measure,
    Symbolic,
    PerShape,
}

#[uniffi::remote(Enum)]
pub enum NanPolicy {
    Allow,
    RejectInputs,
    Reject,
}

#[uniffi::remote(Enum)]
#[non_exhaustive]
pub enum DType {
    F32,
    F16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
    String,
}

/// A named tensor: dtype, shape and the elements as little-endian bytes, row-major.
#[derive(Debug, Clone, uniffi::Record)]
pub struct TensorData {
    /// Input or output name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Elements, little-endian.
    pub data: Vec<u8>,
}

impl TensorData {
    fn to_tern(&self) -> Result<tern::Tensor> {
        let shape: Vec<usize> = self.shape.iter().map(|d| *d as usize).collect();
        Ok(tern::Tensor::from_bytes(self.dtype, &shape, &self.data)?)
    }

    fn from_tern(name: &str, t: &tern::Tensor) -> Result<TensorData> {
        Ok(TensorData {
            name: name.to_string(),
            dtype: t.dtype(),
            shape: t.shape().iter().map(|d| *d as u64).collect(),
            // String outputs have no raw bytes: a typed `InvalidInput { kind: Tensor }`.
            data: t.as_bytes()?.to_vec(),
        })
    }
}

/// A tensor from f32 values (convenience; for large data pass bytes directly).
#[uniffi::export]
pub fn tensor_f32(name: String, shape: Vec<u64>, values: Vec<f32>) -> TensorData {
    TensorData {
        name,
        dtype: DType::F32,
        shape,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// A tensor from i64 values.
#[uniffi::export]
pub fn tensor_i64(name: String, shape: Vec<u64>, values: Vec<i64>) -> TensorData {
    TensorData {
        name,
        dtype: DType::I64,
        shape,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// A tensor from i32 values.
#[uniffi::export]
pub fn tensor_i32(name: String, shape: Vec<u64>, values: Vec<i32>) -> TensorData {
    TensorData {
        name,
        dtype: DType::I32,
        shape,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// The elements of an f32 tensor.
#[uniffi::export]
pub fn tensor_to_f32(tensor: TensorData) -> Result<Vec<f32>> {
    Ok(tensor.to_tern()?.to_f32_vec()?)
}

/// Name, dtype and shape of a model input or output (symbolic dimensions by name).
#[derive(Debug, Clone, uniffi::Record)]
pub struct TensorInfo {
    /// Name.
    pub name: String,
    /// Element type name (`f32`, `i64`…), or `?`.
    pub dtype: String,
    /// Dimensions: a number, or a symbol such as `batch`.
    pub shape: Vec<String>,
}

/// What a model is.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ModelInfo {
    /// Model name.
    pub name: String,
    /// Model version (metadata `version`), or empty.
    pub version: String,
    /// Inputs.
    pub inputs: Vec<TensorInfo>,
    /// Outputs.
    pub outputs: Vec<TensorInfo>,
    /// Default-domain opset.
    pub opset: i64,
    /// Producer.
    pub producer: String,
    /// Weight elements.
    pub parameter_count: u64,
    /// Whether the model is quantized.
    pub quantized: bool,
}

fn info_of(t: &tern::TensorInfo) -> TensorInfo {
    TensorInfo {
        name: t.name.clone(),
        dtype: t.dtype.map_or("?".into(), |d| d.to_string()),
        shape: t.shape.iter().flatten().map(|d| d.to_string()).collect(),
    }
}

/// A loaded ONNX model.
#[derive(uniffi::Object)]
pub struct TernModel {
    inner: tern::Model,
}

#[uniffi::export]
impl TernModel {
    /// Loads a model file.
    #[uniffi::constructor]
    pub fn from_path(path: String) -> Result<Arc<Self>> {
        Ok(Arc::new(TernModel {
            inner: tern::Model::load(path)?,
        }))
    }

    /// Loads a model from bytes (e.g. an app asset).
    #[uniffi::constructor]
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Arc<Self>> {
        Ok(Arc::new(TernModel {
            inner: tern::Model::from_bytes(&bytes)?,
        }))
    }

    /// The model's interface and provenance.
    pub fn info(&self) -> ModelInfo {
        let i = self.inner.info();
        ModelInfo {
            name: self.inner.name().to_string(),
            version: i.version.clone(),
            inputs: i.inputs.iter().map(info_of).collect(),
            outputs: i.outputs.iter().map(info_of).collect(),
            opset: i.default_opset(),
            producer: i.producer.clone(),
            parameter_count: i.parameter_count,
            quantized: i.quantized,
        }
    }
}

/// Session options; every field but `backend` has a default (the SDK's own). A `None`
/// policy means tern's default for it.
#[derive(Debug, Clone, uniffi::Record)]
pub struct SessionConfig {
    /// Device.
    pub backend: Backend,
    /// CPU threads (0 = all cores): the most a run may use.
    #[uniffi(default = 1)]
    pub threads: u32,
    /// With more than one thread: measure (keep the pool only for plans whose first runs
    /// show it is faster than one thread, the default) or always use it.
    #[uniffi(default = None)]
    pub thread_policy: Option<ThreadPolicy>,
    /// Which plans to build for inputs with symbolic dimensions (default: measure).
    #[uniffi(default = None)]
    pub shape_policy: Option<ShapePolicy>,
    /// NaN in inputs and outputs (default: reject both).
    #[uniffi(default = None)]
    pub nan_policy: Option<NanPolicy>,
    /// Record runs in the process-wide telemetry buffer (when one was initialised).
    #[uniffi(default = true)]
    pub telemetry: bool,
    /// The GPU backend's float precision (default: auto).
    #[uniffi(default = None)]
    pub gpu_precision: Option<GpuPrecision>,
    /// Let tern's own kernels take over the layers they implement.
    #[uniffi(default = true)]
    pub tern_kernels: bool,
}

impl SessionConfig {
    /// The session options this config asks for: tern's builders, with tern's defaults
    /// where the config says nothing.
    fn options(&self) -> tern::SessionOptions {
        let defaults = tern::SessionOptions::new();
        let options = defaults
            .clone()
            .backend(self.backend)
            .threads(self.threads as usize)
            .thread_policy(self.thread_policy.unwrap_or(defaults.cpu.thread_policy))
            .shape_policy(self.shape_policy.unwrap_or(defaults.cpu.shape_policy))
            .nan_policy(self.nan_policy.unwrap_or(defaults.inputs.nan_policy))
            .gpu_precision(self.gpu_precision.unwrap_or(defaults.gpu.precision))
            .tern_kernels(self.tern_kernels);
        match self.telemetry {
            true => options,
            false => options.without_telemetry(),
        }
    }
}

/// The backend a session runs on, and why it was chosen.
#[derive(Debug, Clone, uniffi::Record)]
pub struct BackendInfo {
    /// `Cpu` or `Gpu` (never `Auto`).
    pub backend: Backend,
    /// Why (e.g. why `Auto` used the CPU).
    pub reason: String,
}

/// A model prepared to run; share it across threads.
#[derive(uniffi::Object)]
pub struct TernSession {
    inner: Arc<tern::Session>,
}

fn run_session(session: &tern::Session, inputs: Vec<TensorData>) -> Result<Vec<TensorData>> {
    let outputs = session.run(to_tern(&inputs)?)?;
    from_tern(&outputs)
}

/// Named tensors across the FFI → tern's.
fn to_tern(inputs: &[TensorData]) -> Result<Vec<(String, tern::Tensor)>> {
    inputs
        .iter()
        .map(|t| Ok((t.name.clone(), t.to_tern()?)))
        .collect()
}

/// tern's outputs → named tensors across the FFI.
fn from_tern(outputs: &tern::Outputs) -> Result<Vec<TensorData>> {
    outputs
        .iter()
        .map(|(name, t)| TensorData::from_tern(name, t))
        .collect()
}

#[uniffi::export]
impl TernSession {
    /// Prepares `model` with `config`.
    #[uniffi::constructor]
    pub fn new(model: Arc<TernModel>, config: SessionConfig) -> Result<Arc<Self>> {
        let options = config.options();
        Ok(Arc::new(TernSession {
            inner: Arc::new(tern::Session::new(&model.inner, options)?),
        }))
    }

    /// Runs the model on named inputs; returns the named outputs.
    pub fn run(&self, inputs: Vec<TensorData>) -> Result<Vec<TensorData>> {
        run_session(&self.inner, inputs)
    }

    /// Like `run`, on tern's worker pool (as many threads as cores, shared by every
    /// session): a `suspend fun` in Kotlin, `async` in Swift.
    pub async fn run_async(&self, inputs: Vec<TensorData>) -> Result<Vec<TensorData>> {
        let session = self.inner.clone();
        on_worker(move || run_session(&session, inputs)).await
    }

    /// The backend in use and why it was chosen.
    pub fn backend(&self) -> BackendInfo {
        BackendInfo {
            backend: self.inner.backend(),
            reason: self.inner.backend_reason().to_string(),
        }
    }
}

/// Runs `call` on tern's worker pool and awaits its result.
async fn on_worker<T: Send + 'static>(
    call: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = futures_channel::oneshot::channel();
    let pool = workers().ok_or_else(|| TernError::Inference {
        kind: ErrorKind::Inference,
        detail: "tern's worker threads could not be started".into(),
    })?;
    pool.spawn(move || {
        let _ = tx.send(call());
    });
    rx.await.unwrap_or_else(|_| {
        Err(TernError::Inference {
            kind: ErrorKind::Panic,
            detail: "the worker running this call stopped".into(),
        })
    })
}

/// The pool `run_async` calls run on: bounded, so a burst of calls queues instead of
/// starting a thread each. `None` if the OS would not start its threads.
fn workers() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("tern-run-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

#[uniffi::remote(Enum)]
pub enum Signal {
    Traces,
    Metrics,
    Logs,
}

/// One OTLP request of an upload batch.
#[derive(Debug, Clone, uniffi::Record)]
pub struct UploadPayload {
    /// Which signal it carries.
    pub signal: Signal,
    /// Collector path, e.g. `/v1/metrics`.
    pub path: String,
    /// OTLP/JSON body.
    pub json: String,
}

/// A batch to upload.
#[derive(Debug, Clone, uniffi::Record)]
pub struct UploadBatch {
    /// Stable id (kept across retries).
    pub id: u64,
    /// Records in the batch.
    pub records: u64,
    /// The requests to send.
    pub payloads: Vec<UploadPayload>,
}

/// What the platform's uploader did with a batch.
#[derive(Debug, Clone, uniffi::Enum)]
pub enum UploadResult {
    /// Accepted by the collector: delete it.
    Accepted,
    /// Keep it and retry later.
    Retry {
        /// Why.
        reason: String,
    },
    /// The collector will never take it: delete it and count it as dropped.
    Rejected {
        /// Why.
        reason: String,
    },
}

/// Implemented by the app (Kotlin/Swift): sends one batch, e.g. with OkHttp or URLSession.
#[uniffi::export(foreign)]
pub trait TelemetryUploader: Send + Sync {
    /// Sends `batch`; see [`UploadResult`].
    fn upload(&self, batch: UploadBatch) -> UploadResult;
}

struct ForeignUploader(Arc<dyn TelemetryUploader>);

impl tel::Uploader for ForeignUploader {
    fn upload(&self, batch: &tel::UploadBatch) -> tel::UploadResult {
        let batch = UploadBatch {
            id: batch.id,
            records: batch.records,
            payloads: batch
                .payloads
                .iter()
                .map(|p| UploadPayload {
                    signal: p.signal,
                    path: p.signal.path().into(),
                    json: p.json.clone(),
                })
                .collect(),
        };
        match self.0.upload(batch) {
            UploadResult::Accepted => tel::UploadResult::Accepted,
            UploadResult::Retry { reason } => tel::UploadResult::Retry(reason),
            UploadResult::Rejected { reason } => tel::UploadResult::Rejected(reason),
        }
    }
}

/// Telemetry buffer settings.
#[derive(Debug, Clone, uniffi::Record)]
pub struct TelemetryConfig {
    /// Most bytes on disk.
    #[uniffi(default = 8388608)]
    pub max_bytes: u64,
    /// Oldest record kept, in seconds.
    #[uniffi(default = 604800)]
    pub max_age_seconds: u64,
    /// Fraction of runs sampled for model-health statistics.
    #[uniffi(default = 0.01)]
    pub health_sample_rate: f64,
    /// Least seconds between uploads.
    #[uniffi(default = 10)]
    pub min_upload_interval_seconds: u64,
    /// OTLP `service.name`.
    #[uniffi(default = "tern")]
    pub service_name: String,
}

#[uniffi::remote(Record)]
pub struct TelemetryStats {
    bytes_on_disk: u64,
    pending_batches: u64,
    dropped: u64,
    upload_failures: u32,
    recovered_skipped_bytes: u64,
}

/// What an upload pass did.
#[derive(Debug, Clone, uniffi::Record)]
pub struct UploadReport {
    /// Batches accepted.
    pub batches_accepted: u64,
    /// Records in them.
    pub records_accepted: u64,
    /// Batches rejected.
    pub batches_rejected: u64,
    /// Whether to try again later.
    pub retry_later: bool,
}

/// The on-device telemetry buffer.
#[derive(uniffi::Object)]
pub struct TernTelemetry {
    inner: tel::Telemetry,
}

/// Opens the telemetry buffer in `dir` (an app-private folder) and makes it the one every
/// session created afterwards records into.
#[uniffi::export]
pub fn init_telemetry(dir: String, config: TelemetryConfig) -> Result<Arc<TernTelemetry>> {
    let config = tel::TelemetryConfig {
        max_bytes: config.max_bytes,
        max_age: std::time::Duration::from_secs(config.max_age_seconds),
        health_sample_rate: config.health_sample_rate,
        min_upload_interval: std::time::Duration::from_secs(config.min_upload_interval_seconds),
        service_name: config.service_name,
        ..Default::default()
    };
    Ok(Arc::new(TernTelemetry {
        inner: tel::init(dir, config)?,
    }))
}

fn attrs(a: &HashMap<String, String>) -> Vec<(&str, tel::AttrValue)> {
    a.iter()
        .map(|(k, v)| (k.as_str(), tel::AttrValue::from(v.as_str())))
        .collect()
}

#[uniffi::export]
impl TernTelemetry {
    /// Records an app event.
    pub fn event(&self, name: String, attributes: HashMap<String, String>) {
        self.inner.event(&name, &attrs(&attributes));
    }

    /// Adds `n` to an app counter.
    pub fn counter(&self, name: String, n: u64, attributes: HashMap<String, String>) {
        self.inner.counter(&name, n, &attrs(&attributes));
    }

    /// Makes every record so far durable.
    pub fn flush(&self) -> Result<()> {
        Ok(self.inner.flush()?)
    }

    /// Uploads pending batches now through `uploader`.
    pub fn upload_pending(&self, uploader: Arc<dyn TelemetryUploader>) -> Result<UploadReport> {
        let r = self.inner.upload_pending(&ForeignUploader(uploader))?;
        Ok(UploadReport {
            batches_accepted: r.batches_accepted,
            records_accepted: r.records_accepted,
            batches_rejected: r.batches_rejected,
            retry_later: r.retry_later,
        })
    }

    /// Sets the uploader used in the background when the network is available.
    pub fn set_uploader(&self, uploader: Arc<dyn TelemetryUploader>) {
        self.inner.set_uploader(Arc::new(ForeignUploader(uploader)));
    }

    /// Tells the buffer whether the network is there (from the platform's connectivity
    /// callback).
    pub fn set_network_available(&self, available: bool) {
        self.inner.set_network_available(available);
    }

    /// Counters describing the buffer now.
    pub fn stats(&self) -> TelemetryStats {
        self.inner.stats()
    }
}

/// How a [`TernBatcher`] coalesces requests (`tern_flows::BatchOptions`).
#[derive(Debug, Clone, uniffi::Record)]
pub struct BatchConfig {
    /// At most this many rows (batch entries over all requests) per run.
    #[uniffi(default = 8)]
    pub max_batch: u32,
    /// At most this long (ms) from a request's arrival until its batch starts.
    #[uniffi(default = 2.0)]
    pub max_wait_ms: f64,
    /// At most this many requests waiting; beyond, `run` fails with `Flow(Overloaded)`.
    #[uniffi(default = 256)]
    pub queue_capacity: u32,
    /// Run as soon as every waiting request is in the batch (true), or hold the window
    /// open for requests not yet made (false).
    #[uniffi(default = true)]
    pub eager: bool,
    /// Worker threads, each running one batch at a time.
    #[uniffi(default = 1)]
    pub workers: u32,
}

impl BatchConfig {
    fn options(&self) -> Result<tern_flows::BatchOptions> {
        if !(self.max_wait_ms.is_finite() && self.max_wait_ms >= 0.0) {
            return Err(TernError::Flow {
                kind: FlowErrorKind::InvalidOption,
                detail: format!("max_wait_ms {} is not a duration", self.max_wait_ms),
            });
        }
        Ok(tern_flows::BatchOptions::default()
            .max_batch(self.max_batch as usize)
            .max_wait(std::time::Duration::from_secs_f64(self.max_wait_ms / 1e3))
            .queue_capacity(self.queue_capacity as usize)
            .eager(self.eager)
            .workers(self.workers as usize))
    }
}

/// What a batcher has done so far.
#[derive(Debug, Clone, uniffi::Record)]
pub struct BatchStats {
    /// Requests answered.
    pub requests: u64,
    /// Runs of the session.
    pub runs: u64,
    /// Runs that carried more than one request.
    pub batched_runs: u64,
    /// Requests re-run alone after their batch failed.
    pub rerun_alone: u64,
}

/// Concurrent callers' requests to one session, coalesced into batched runs: call `run`
/// from many threads (or coroutines); each gets what an unbatched run would give it.
#[derive(uniffi::Object)]
pub struct TernBatcher {
    inner: Arc<tern_flows::Batcher>,
}

#[uniffi::export]
impl TernBatcher {
    /// Starts batching `session`'s runs; fails with `Flow(NotBatchable)` for a model whose
    /// inputs have no common batch axis.
    #[uniffi::constructor]
    pub fn new(session: Arc<TernSession>, config: BatchConfig) -> Result<Arc<Self>> {
        let batcher = tern_flows::Batcher::new(session.inner.clone(), config.options()?)?;
        Ok(Arc::new(TernBatcher {
            inner: Arc::new(batcher),
        }))
    }

    /// Runs one request (one or more rows) in the next batch; blocks until it is answered.
    pub fn run(&self, inputs: Vec<TensorData>) -> Result<Vec<TensorData>> {
        let outputs = self.inner.run(to_tern(&inputs)?)?;
        from_tern(&outputs)
    }

    /// Like `run`, waiting on a tern thread: a `suspend fun` in Kotlin, `async` in Swift.
    pub async fn run_async(&self, inputs: Vec<TensorData>) -> Result<Vec<TensorData>> {
        let batcher = self.inner.clone();
        on_worker(move || {
            let outputs = batcher.run(to_tern(&inputs)?)?;
            from_tern(&outputs)
        })
        .await
    }

    /// What the batcher has done so far.
    pub fn stats(&self) -> BatchStats {
        let s = self.inner.stats();
        BatchStats {
            requests: s.requests,
            runs: s.runs,
            batched_runs: s.batched_runs,
            rerun_alone: s.rerun_alone,
        }
    }
}

/// One output → input pair a stream carries to the next chunk.
#[derive(Debug, Clone, uniffi::Record)]
pub struct StreamCarry {
    /// The output of one chunk…
    pub output: String,
    /// …fed to this input of the next.
    pub input: String,
}

/// A context: each chunk of `input` is prefixed along its last axis with the last
/// `length` elements the model saw in the previous chunk (zeros first).
#[derive(Debug, Clone, uniffi::Record)]
pub struct StreamContext {
    /// The input.
    pub input: String,
    /// Elements of context.
    pub length: u32,
}

/// What a [`TernStream`] carries between chunks.
#[derive(Debug, Clone, uniffi::Record)]
pub struct StreamConfig {
    /// State pairs.
    pub carries: Vec<StreamCarry>,
    /// Sliding-window contexts.
    #[uniffi(default = [])]
    pub contexts: Vec<StreamContext>,
    /// Initial values of carried inputs (named by input); zeros of the declared shape
    /// otherwise.
    #[uniffi(default = [])]
    pub initial: Vec<TensorData>,
}

/// A stateful model run chunk by chunk (an LSTM, a voice-activity detector): the carried
/// outputs of each chunk become inputs of the next.
#[derive(uniffi::Object)]
pub struct TernStream {
    inner: std::sync::Mutex<tern_flows::Stream>,
}

#[uniffi::export]
impl TernStream {
    /// Checks `config` against `session`'s inputs and outputs (`Flow(BadState)`,
    /// `Flow(BadChunk)` otherwise).
    #[uniffi::constructor]
    pub fn new(session: Arc<TernSession>, config: StreamConfig) -> Result<Arc<Self>> {
        let mut options = tern_flows::StreamOptions::new();
        for c in &config.carries {
            options = options.carry(&c.output, &c.input);
        }
        for c in &config.contexts {
            options = options.context(&c.input, c.length as usize);
        }
        for t in &config.initial {
            options = options.initial(&t.name, t.to_tern()?);
        }
        let stream = tern_flows::Stream::new(session.inner.clone(), options)?;
        Ok(Arc::new(TernStream {
            inner: std::sync::Mutex::new(stream),
        }))
    }

    /// Runs one chunk (every input but the carried ones); returns all outputs.
    pub fn push(&self, inputs: Vec<TensorData>) -> Result<Vec<TensorData>> {
        let inputs = to_tern(&inputs)?;
        let outputs = tern::sync::lock(&self.inner).push(inputs)?;
        from_tern(&outputs)
    }

    /// Starts over from the initial state.
    pub fn reset(&self) {
        tern::sync::lock(&self.inner).reset();
    }

    /// Chunks run since the start or the last reset.
    pub fn chunks(&self) -> u64 {
        tern::sync::lock(&self.inner).chunks()
    }
}

#[uniffi::remote(Enum)]
pub enum Priority {
    High,
    Normal,
    Low,
}

/// Why a job failed for good.
#[derive(Debug, Clone, uniffi::Enum)]
pub enum JobFailure {
    /// The session refused or failed the run, with tern's own kind.
    Model {
        /// tern's kind (`ShapeMismatch`, `Inference`, …).
        kind: ErrorKind,
    },
    /// No session is registered under the job's model name.
    UnknownModel,
    /// The process died during each of the job's attempts.
    Crashed,
    /// The job's file was damaged.
    Corrupt,
}

/// Where a job is.
#[derive(Debug, Clone, uniffi::Enum)]
pub enum JobState {
    /// Waiting to run, `attempts` used.
    Pending {
        /// Attempts used so far.
        attempts: u32,
    },
    /// Being run now.
    Running,
    /// Finished: collect it with `take_result`.
    Finished,
    /// No such job (or its result was collected).
    Unknown,
}

/// A finished job's result.
#[derive(Debug, Clone, uniffi::Enum)]
pub enum JobResult {
    /// The run's outputs.
    Done {
        /// Named outputs.
        outputs: Vec<TensorData>,
    },
    /// Why it failed.
    Failed {
        /// The kind of failure.
        failure: JobFailure,
        /// The error's description.
        message: String,
    },
}

/// How a job queue bounds and retries its jobs.
#[derive(Debug, Clone, uniffi::Record)]
pub struct JobConfig {
    /// At most this many jobs pending, running or uncollected.
    #[uniffi(default = 1024)]
    pub capacity: u32,
    /// Attempts a job may take before it fails for good.
    #[uniffi(default = 3)]
    pub max_attempts: u32,
    /// Seconds before the second attempt, doubled for each further one.
    #[uniffi(default = 30.0)]
    pub backoff_seconds: f64,
}

/// What one `run_pending` call did.
#[derive(Debug, Clone, uniffi::Record)]
pub struct JobRunReport {
    /// Jobs that ran to a result.
    pub succeeded: u32,
    /// Jobs that failed for good.
    pub failed: u32,
    /// Jobs that wait for a later attempt.
    pub retried: u32,
    /// Jobs still pending.
    pub pending: u32,
    /// Whether the budget ran out with jobs still due.
    pub out_of_time: bool,
}

/// A persistent queue of inference jobs in a directory of the app's: accepted now, run
/// when the platform lets the app work (`run_pending(maxMillis)` from a WorkManager
/// `Worker` or a `BGProcessingTask`), surviving process death.
#[derive(uniffi::Object)]
pub struct TernJobQueue {
    inner: tern_flows::JobQueue,
}

#[uniffi::export]
impl TernJobQueue {
    /// Opens (or creates) the queue in `dir`, repairing what a killed process left.
    #[uniffi::constructor]
    pub fn open(dir: String, config: JobConfig) -> Result<Arc<Self>> {
        if !(config.backoff_seconds.is_finite() && config.backoff_seconds >= 0.0) {
            return Err(TernError::Flow {
                kind: FlowErrorKind::InvalidOption,
                detail: format!(
                    "backoff_seconds {} is not a duration",
                    config.backoff_seconds
                ),
            });
        }
        let options = tern_flows::JobOptions::default()
            .capacity(config.capacity as usize)
            .max_attempts(config.max_attempts)
            .backoff(std::time::Duration::from_secs_f64(config.backoff_seconds));
        Ok(Arc::new(TernJobQueue {
            inner: tern_flows::JobQueue::open(dir, options)?,
        }))
    }

    /// Serves jobs naming `model` with `session`.
    pub fn register(&self, model: String, session: Arc<TernSession>) {
        self.inner.register(&model, session.inner.clone());
    }

    /// Accepts a job; with an idempotency `key`, the key is its id and a second submission
    /// is the same job. Returns the job's id once it is on disk.
    pub fn submit(
        &self,
        model: String,
        inputs: Vec<TensorData>,
        priority: Priority,
        key: Option<String>,
    ) -> Result<String> {
        Ok(self
            .inner
            .submit(&model, to_tern(&inputs)?, priority, key.as_deref())?)
    }

    /// Runs due jobs until none is due or `max_millis` is spent.
    pub fn run_pending(&self, max_millis: u64) -> Result<JobRunReport> {
        let r = self
            .inner
            .run_pending(std::time::Duration::from_millis(max_millis))?;
        Ok(JobRunReport {
            succeeded: r.succeeded,
            failed: r.failed,
            retried: r.retried,
            pending: r.pending,
            out_of_time: r.out_of_time,
        })
    }

    /// Where job `id` is.
    pub fn status(&self, id: String) -> Result<JobState> {
        Ok(match self.inner.status(&id)? {
            tern_flows::JobStatus::Pending { attempts } => JobState::Pending { attempts },
            tern_flows::JobStatus::Running => JobState::Running,
            tern_flows::JobStatus::Finished => JobState::Finished,
            tern_flows::JobStatus::Unknown => JobState::Unknown,
        })
    }

    /// Collects job `id`'s result (removing it), or `null` if it has none yet.
    pub fn take_result(&self, id: String) -> Result<Option<JobResult>> {
        Ok(match self.inner.take_result(&id)? {
            None => None,
            Some(tern_flows::JobOutcome::Done(outputs)) => Some(JobResult::Done {
                outputs: from_tern(&outputs)?,
            }),
            Some(tern_flows::JobOutcome::Failed { error, message }) => Some(JobResult::Failed {
                failure: match error {
                    tern_flows::JobError::Model(kind) => JobFailure::Model { kind },
                    tern_flows::JobError::UnknownModel => JobFailure::UnknownModel,
                    tern_flows::JobError::Crashed => JobFailure::Crashed,
                    tern_flows::JobError::Corrupt => JobFailure::Corrupt,
                },
                message,
            }),
        })
    }
}
