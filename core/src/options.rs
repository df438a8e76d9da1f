//! How a session is built: the options every other module reads and none writes back.
//!
//! This module is a leaf of the crate: it names choices (which device, how many threads,
//! which shapes to plan for, what to do with NaN, where to record) and depends on nothing
//! but the error type and the telemetry handle it may carry. Backends, the session and the
//! skins (CLI, FFI) all read [`SessionOptions`]; only [`crate::session`] checks them
//! against a model.
//!
//! The options are grouped by the concern that reads them — [`CpuOptions`] for the tract
//! backend, [`GpuOptions`] for the burn backend, [`InputOptions`] for validation and
//! planning, [`TelemetryOptions`] for recording — and every struct is `#[non_exhaustive]`:
//! build them with [`SessionOptions::new`] and the builder methods, so new options never
//! break an app.

use std::collections::BTreeMap;

use crate::baseline::Baseline;
use crate::error::{parse_choice, Error, Result};
use crate::telemetry::Telemetry;

impl std::str::FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Backend> {
        parse_choice(
            s,
            "backend",
            &[
                (Backend::Cpu, &["cpu"]),
                (Backend::Gpu, &["gpu"]),
                (Backend::Auto, &["auto"]),
            ],
        )
    }
}

/// How much graph optimisation to do when the session is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptLevel {
    /// Simplify the graph only (faster to build, slower to run; useful for debugging).
    Declutter,
    /// Full optimisation to the backend's kernels (the default).
    #[default]
    Full,
}

// `Backend` and `NanPolicy` are defined in the leaf `kinds` (errors and telemetry records
// carry them too); they are options like the others, parsed here.
pub use crate::kinds::{Backend, NanPolicy};

impl std::str::FromStr for NanPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<NanPolicy> {
        parse_choice(
            s,
            "NaN policy",
            &[
                (NanPolicy::Allow, &["allow"]),
                (NanPolicy::RejectInputs, &["reject-inputs", "reject_inputs"]),
                (NanPolicy::Reject, &["reject"]),
            ],
        )
    }
}

/// The float precision the GPU backend computes in. The CPU backend always computes a
/// model in its own types (f16 models in f32 on CPUs without f16 arithmetic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuPrecision {
    /// f16 on a hardware adapter with shader-f16 (half the memory traffic, about 3 decimal
    /// digits), f32 elsewhere (the default).
    #[default]
    Auto,
    /// Always f32: outputs match the CPU backend to rounding.
    F32,
    /// f16 storage and arithmetic, with reductions, softmax, `exp` and `pow` kept in f32.
    /// An adapter without shader-f16 makes the GPU backend unavailable.
    F16,
}

impl std::str::FromStr for GpuPrecision {
    type Err = Error;
    fn from_str(s: &str) -> Result<GpuPrecision> {
        parse_choice(
            s,
            "GPU precision",
            &[
                (GpuPrecision::Auto, &["auto"]),
                (GpuPrecision::F32, &["f32", "fp32"]),
                (GpuPrecision::F16, &["f16", "fp16"]),
            ],
        )
    }
}

/// How the CPU backend uses a session's threads when there are more than one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThreadPolicy {
    /// Each plan times its first runs with the thread pool and on the calling thread alone,
    /// and keeps the faster (the pool only if it is clearly faster). Handing small
    /// convolutions to other threads can cost more than it saves: PP-OCR's classifier runs
    /// 1.5× slower on 2 threads than on 1, a transformer 1.2× faster.
    #[default]
    Measure,
    /// Every run may use all the threads.
    Always,
}

impl std::str::FromStr for ThreadPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<ThreadPolicy> {
        parse_choice(
            s,
            "thread policy",
            &[
                (ThreadPolicy::Measure, &["measure"]),
                (ThreadPolicy::Always, &["always"]),
            ],
        )
    }
}

/// Which plans the CPU backend builds for a model whose input shapes are not all fixed
/// (a symbolic `batch`, `height`, `sequence`…). Pinned inputs count as fixed.
///
/// One plan for symbolic shapes serves every run, but tract's kernels are much faster when
/// they know the sizes (a depthwise convolution on a symbolic batch ran 20–40× slower than
/// on a concrete one). A plan for one concrete shape costs a compilation (tens to hundreds
/// of milliseconds) and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShapePolicy {
    /// The default: the first shape a session sees gets a concrete plan, and its first
    /// runs are timed against the symbolic plan. If the concrete plan is clearly faster,
    /// later shapes get one too once they have recurred often enough to repay its
    /// compilation (so a stream of ever-changing widths stays on the symbolic plan);
    /// otherwise every run uses the symbolic plan.
    #[default]
    Measure,
    /// One symbolic plan for every run (least memory, no compilation after creation).
    Symbolic,
    /// A concrete plan for every new shape, on its first run.
    PerShape,
}

impl std::str::FromStr for ShapePolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<ShapePolicy> {
        parse_choice(
            s,
            "shape policy",
            &[
                (ShapePolicy::Measure, &["measure"]),
                (ShapePolicy::Symbolic, &["symbolic"]),
                (ShapePolicy::PerShape, &["per-shape", "per_shape"]),
            ],
        )
    }
}

/// Which telemetry buffer a session records into.
#[derive(Debug, Clone, Default)]
pub enum TelemetryChoice {
    /// The process-wide buffer set by [`crate::telemetry::init`], if any (the default).
    #[default]
    Global,
    /// This buffer.
    To(Telemetry),
    /// Record nothing.
    Off,
}

/// The most threads a session may ask for: more is a typo, not a machine (creating them
/// would take minutes and gigabytes before the first run).
pub const MAX_THREADS: usize = 256;

/// Options read by the CPU backend.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CpuOptions {
    /// Threads for the kernels (1 = run on the calling thread, 0 = one per core, at most
    /// [`MAX_THREADS`]): the most a run may use; see [`ThreadPolicy`].
    pub threads: usize,
    /// Whether the backend checks that its threads pay off.
    pub thread_policy: ThreadPolicy,
    /// Graph optimisation level.
    pub optimization: OptLevel,
    /// Which plans to build for inputs whose shapes are not fixed.
    pub shape_policy: ShapePolicy,
    /// Let tern's own kernels (`tern-kernels`) take over the layers they implement — int8
    /// convolutions (depthwise and one-group), the quantize/dequantize passes, and QDQ
    /// convolutions fused to integer ones where the CPU multiplies bytes natively — the
    /// default; `false` leaves every layer to tract (and QDQ models unfused).
    pub tern_kernels: bool,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            threads: 1,
            thread_policy: ThreadPolicy::Measure,
            optimization: OptLevel::Full,
            shape_policy: ShapePolicy::Measure,
            tern_kernels: true,
        }
    }
}

/// Options read by the GPU backend.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct GpuOptions {
    /// Let [`Backend::Auto`] pick a software GPU adapter (e.g. Mesa's llvmpipe/lavapipe).
    /// Off by default: on the CPU, tract is faster than a software rasteriser.
    /// [`Backend::Gpu`] always accepts one.
    pub allow_software: bool,
    /// The float precision programs compute in.
    pub precision: GpuPrecision,
}

/// Options about the inputs: what a run must pass and what it may contain.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct InputOptions {
    /// NaN handling (inputs and outputs).
    pub nan_policy: NanPolicy,
    /// Input shapes pinned to fixed sizes, by input name. Pinning symbolic dimensions lets
    /// the backend specialise its kernels at creation; runs must then use exactly these
    /// shapes.
    pub pinned_shapes: BTreeMap<String, Vec<usize>>,
}

/// Options about recording.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct TelemetryOptions {
    /// Where runs are recorded.
    pub buffer: TelemetryChoice,
    /// Drift baseline for health samples; `None` uses the one the model ships, if any.
    pub baseline: Option<Baseline>,
    /// The name and version spans and metrics give the model; `None` keeps the model's own
    /// (its graph name and `version` metadata). A model store sets its bundle's.
    pub identity: Option<(String, String)>,
    /// Attributes every span of the session carries, after tern's own (e.g. a rollout's
    /// `tern.rollout.arm`).
    pub span_labels: Vec<(String, String)>,
}

/// Bounds a session keeps to whatever the model asks for: a hostile or broken model gets a
/// typed [`Error::ResourceLimit`](crate::Error::ResourceLimit) instead of taking the app's
/// memory.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LimitOptions {
    /// Most bytes a run's values may hold at once (tensors computed and inputs, weights not
    /// counted), checked for each input shape before the run; `None` (the default): half
    /// the device's memory ([`LimitOptions::device_memory`]), 2 GiB where it is unknown.
    pub memory_bytes: Option<u64>,
    /// Most nodes plus node inputs a model's graph may have (default
    /// [`LimitOptions::GRAPH_SIZE`]): session creation on tract grows faster than linearly
    /// with graph size (tract's typing scans the graph for every node it adds), so a
    /// graph past this is refused rather than taking minutes.
    pub graph_size: usize,
}

impl Default for LimitOptions {
    fn default() -> Self {
        LimitOptions {
            memory_bytes: None,
            graph_size: Self::GRAPH_SIZE,
        }
    }
}

impl LimitOptions {
    /// The default graph size limit: 40,000 nodes and node inputs (a 20,000-node chain of
    /// one-input ops; on-device transformer exports have a few thousand nodes). Up to this
    /// size session creation stays within about 3x onnxruntime's; past it tract's typing
    /// (quadratic in graph size) makes it grow faster. Raise it for bigger graphs.
    pub const GRAPH_SIZE: usize = 40_000;

    /// The memory limit in force.
    pub fn memory_limit(&self) -> u64 {
        self.memory_bytes
            .unwrap_or_else(|| Self::device_memory().map_or(2 << 30, |m| m / 2))
    }

    /// The device's physical memory, where the OS says (Linux and Android: `MemTotal` of
    /// `/proc/meminfo`), read once per process.
    pub fn device_memory() -> Option<u64> {
        static MEMORY: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
        *MEMORY.get_or_init(|| {
            let path = std::path::Path::new("/proc/meminfo");
            let info = String::from_utf8(crate::fs::read_regular(path, 1 << 20).ok()?).ok()?;
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib.saturating_mul(1024))
        })
    }
}

/// How to build a [`Session`](crate::Session).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SessionOptions {
    /// The device to run on.
    pub backend: Backend,
    /// CPU backend options.
    pub cpu: CpuOptions,
    /// GPU backend options.
    pub gpu: GpuOptions,
    /// Input validation and pinned shapes.
    pub inputs: InputOptions,
    /// Telemetry buffer and drift baseline.
    pub telemetry: TelemetryOptions,
    /// Resource limits.
    pub limits: LimitOptions,
}

impl SessionOptions {
    /// The defaults: `Auto` backend, 1 thread, full optimisation, measured shape
    /// specialisation, reject NaN, the global telemetry buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the backend.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Sets the thread count (0 means all available cores).
    pub fn threads(mut self, threads: usize) -> Self {
        self.cpu.threads = threads;
        self
    }

    /// Sets the thread policy.
    pub fn thread_policy(mut self, policy: ThreadPolicy) -> Self {
        self.cpu.thread_policy = policy;
        self
    }

    /// Sets the optimisation level.
    pub fn optimization(mut self, level: OptLevel) -> Self {
        self.cpu.optimization = level;
        self
    }

    /// Sets which plans the CPU backend builds for inputs whose shapes are not fixed.
    pub fn shape_policy(mut self, policy: ShapePolicy) -> Self {
        self.cpu.shape_policy = policy;
        self
    }

    /// Lets tern's own kernels take over the layers they implement (on by default).
    pub fn tern_kernels(mut self, enabled: bool) -> Self {
        self.cpu.tern_kernels = enabled;
        self
    }

    /// Sets the most bytes a run's values may hold at once (see [`LimitOptions`]).
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.limits.memory_bytes = Some(bytes);
        self
    }

    /// Sets the most nodes plus node inputs a model may have (see [`LimitOptions`]).
    pub fn max_graph_size(mut self, size: usize) -> Self {
        self.limits.graph_size = size;
        self
    }

    /// Sets the NaN policy.
    pub fn nan_policy(mut self, policy: NanPolicy) -> Self {
        self.inputs.nan_policy = policy;
        self
    }

    /// Pins an input to a fixed shape.
    pub fn pin_input_shape(mut self, input: impl Into<String>, shape: &[usize]) -> Self {
        self.inputs
            .pinned_shapes
            .insert(input.into(), shape.to_vec());
        self
    }

    /// Records runs into this telemetry buffer instead of the global one.
    pub fn telemetry(mut self, telemetry: Telemetry) -> Self {
        self.telemetry.buffer = TelemetryChoice::To(telemetry);
        self
    }

    /// Records nothing for this session.
    pub fn without_telemetry(mut self) -> Self {
        self.telemetry.buffer = TelemetryChoice::Off;
        self
    }

    /// Measures drift of sampled runs against this baseline (instead of the model's own).
    pub fn baseline(mut self, baseline: Baseline) -> Self {
        self.telemetry.baseline = Some(baseline);
        self
    }

    /// Names the model in this session's spans and metrics as `name` at `version`
    /// (instead of the model's own name and metadata version).
    pub fn model_identity(mut self, name: impl Into<String>, version: impl Into<String>) -> Self {
        self.telemetry.identity = Some((name.into(), version.into()));
        self
    }

    /// Adds an attribute to every span of this session (a later one with the same key
    /// replaces it).
    pub fn span_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        self.telemetry.span_labels.retain(|(k, _)| *k != key);
        self.telemetry.span_labels.push((key, value.into()));
        self
    }

    /// Lets [`Backend::Auto`] choose a software GPU adapter (for testing the GPU path on
    /// machines without one).
    pub fn allow_software_gpu(mut self, allow: bool) -> Self {
        self.gpu.allow_software = allow;
        self
    }

    /// Sets the GPU backend's float precision.
    pub fn gpu_precision(mut self, precision: GpuPrecision) -> Self {
        self.gpu.precision = precision;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_choice_parses_from_its_names_and_rejects_others() {
        assert_eq!("cpu".parse::<Backend>().unwrap(), Backend::Cpu);
        assert_eq!("fp16".parse::<GpuPrecision>().unwrap(), GpuPrecision::F16);
        assert_eq!(
            "always".parse::<ThreadPolicy>().unwrap(),
            ThreadPolicy::Always
        );
        assert_eq!(
            "per-shape".parse::<ShapePolicy>().unwrap(),
            ShapePolicy::PerShape
        );
        assert_eq!(
            "reject-inputs".parse::<NanPolicy>().unwrap(),
            NanPolicy::RejectInputs
        );
        for bad in ["", "CPU2", "f8"] {
            assert_eq!(bad.parse::<Backend>().unwrap_err().kind(), "invalid_option");
            assert_eq!(
                bad.parse::<GpuPrecision>().unwrap_err().kind(),
                "invalid_option"
            );
            assert_eq!(
                bad.parse::<ShapePolicy>().unwrap_err().kind(),
                "invalid_option"
            );
        }
    }
}
