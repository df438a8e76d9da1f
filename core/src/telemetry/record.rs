//! What the buffer stores: one [`Record`] per inference span, app event, health sample or
//! drop notice, serialized as JSON inside a checksummed frame (see [`super::store`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;
use crate::kinds::{Backend, TensorRole};

/// An attribute value on an app event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttrValue {
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
}

impl From<&str> for AttrValue {
    fn from(s: &str) -> Self {
        AttrValue::Str(s.to_string())
    }
}
impl From<String> for AttrValue {
    fn from(s: String) -> Self {
        AttrValue::Str(s)
    }
}
impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        AttrValue::Int(v)
    }
}
impl From<f64> for AttrValue {
    fn from(v: f64) -> Self {
        AttrValue::Float(v)
    }
}
impl From<bool> for AttrValue {
    fn from(v: bool) -> Self {
        AttrValue::Bool(v)
    }
}

/// How an inference ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It returned outputs.
    Ok,
    /// It failed with this kind of [`crate::Error`].
    Error(ErrorKind),
    /// The app gave up waiting.
    Timeout,
    /// The preferred backend failed and another one produced the result, or (in a flow) a
    /// step failed and its fallback (the last good result, a rule, a default) answered.
    Fallback,
    /// A flow answered from its result cache without running the model.
    CacheHit,
}

impl Outcome {
    /// Short label: `ok`, `error`, `timeout`, `fallback`, `cache_hit`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error(_) => "error",
            Outcome::Timeout => "timeout",
            Outcome::Fallback => "fallback",
            Outcome::CacheHit => "cache_hit",
        }
    }
}

/// One inference: its stages and their durations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpanRecord {
    /// Random 128-bit trace id, hex.
    pub trace_id: String,
    /// Start, Unix nanoseconds.
    pub start_ns: u64,
    /// Model name.
    pub model: String,
    /// Model version (from the model's metadata, or the app).
    pub version: String,
    /// Backend that ran it (`cpu`, `gpu`).
    pub backend: Backend,
    /// `(stage, duration in ns)` in order: e.g. `preprocess`, `model`, `postprocess`.
    pub stages: Vec<(String, u64)>,
    /// How it ended.
    pub outcome: Outcome,
    /// The session's own span attributes (e.g. `tern.rollout.arm`), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<(String, String)>,
}

impl SpanRecord {
    /// A span starting now with a fresh trace id, no stages and outcome `ok`: for code
    /// that records its own spans (a flow of several sessions and callbacks).
    pub fn starting_now(model: &str, version: &str, backend: Backend) -> SpanRecord {
        SpanRecord {
            trace_id: random_trace_id(),
            start_ns: now_ns(),
            model: model.to_string(),
            version: version.to_string(),
            backend,
            stages: Vec::new(),
            outcome: Outcome::Ok,
            labels: Vec::new(),
        }
    }

    /// Total duration in nanoseconds.
    pub fn duration_ns(&self) -> u64 {
        self.stages.iter().map(|(_, d)| d).sum()
    }
}

/// A named app event or counter increment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Unix nanoseconds.
    pub at_ns: u64,
    /// Event or counter name.
    pub name: String,
    /// `Some(n)`: a counter increment by `n`; `None`: an event.
    pub increment: Option<u64>,
    /// Attributes.
    pub attributes: BTreeMap<String, AttrValue>,
}

/// Summary statistics of one input or output tensor in one sampled inference. No raw
/// values leave the device: only these aggregates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorStats {
    /// Tensor name.
    pub name: String,
    /// Whether it is an input or an output.
    pub io: TensorRole,
    /// Elements.
    pub count: u64,
    /// NaN elements.
    pub nan: u64,
    /// Mean of the finite elements.
    pub mean: f64,
    /// Minimum finite element.
    pub min: f64,
    /// Maximum finite element.
    pub max: f64,
    /// For outputs: the largest value (the top score of a classifier).
    pub top: f64,
    /// Bin counts against the model's baseline, when it has one for this tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftCounts>,
}

/// Values of one sampled tensor counted in its baseline's bins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftCounts {
    /// Counts per feature and bin.
    pub counts: Vec<Vec<u64>>,
    /// The baseline's expected shares per feature and bin (carried so that drift can be
    /// computed at upload even in a later process).
    pub expected: Vec<Vec<f64>>,
}

/// A sampled model-health observation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthRecord {
    /// Unix nanoseconds.
    pub at_ns: u64,
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// Per-tensor statistics.
    pub tensors: Vec<TensorStats>,
}

/// One entry of the buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// An inference span.
    Span(SpanRecord),
    /// An app event or counter.
    Event(EventRecord),
    /// A model-health sample.
    Health(HealthRecord),
    /// Records lost before they could be stored or uploaded, and why.
    Dropped {
        /// Unix nanoseconds.
        at_ns: u64,
        /// How many.
        count: u64,
        /// Why.
        reason: DropReason,
    },
}

impl Record {
    /// A notice that `count` records were lost for `reason`, now.
    pub(crate) fn dropped(count: u64, reason: DropReason) -> Record {
        Record::Dropped {
            at_ns: now_ns(),
            count,
            reason,
        }
    }
}

/// Why records were lost (a [`Record::Dropped`]'s reason; the `reason` attribute of the
/// uploaded `tern.telemetry.dropped` metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The in-memory queue was full when the record was made.
    QueueFull,
    /// The oldest segment was evicted to stay under the byte cap.
    ByteCap,
    /// The segment was older than the age cap.
    AgeCap,
    /// Writing the records to disk failed.
    IoError,
    /// The uploader said the collector will never take the batch.
    RejectedByUploader,
    /// The record could not be serialized.
    Unencodable,
    /// A stored frame was intact but its record could not be read back.
    Undecodable,
}

impl DropReason {
    /// The name stored and uploaded, e.g. `queue_full`.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::ByteCap => "byte_cap",
            DropReason::AgeCap => "age_cap",
            DropReason::IoError => "io_error",
            DropReason::RejectedByUploader => "rejected_by_uploader",
            DropReason::Unencodable => "unencodable",
            DropReason::Undecodable => "undecodable",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Now, in Unix nanoseconds.
pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A random 128-bit id as 32 hex digits (std's randomly keyed SipHash; not cryptographic,
/// unique enough for trace ids).
pub(crate) fn random_trace_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let state = std::collections::hash_map::RandomState::new();
    let mut a = state.build_hasher();
    a.write_u64(n);
    let mut b = state.build_hasher();
    b.write_u64(!n);
    format!("{:016x}{:016x}", a.finish(), b.finish())
}
