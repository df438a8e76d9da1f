//! # tern-flows — serving patterns over [`tern::Session`], on the device
//!
//! The patterns server-side inference uses for throughput and for stateful models, as small
//! types that wrap a shared session without changing how it runs:
//!
//! - [`Batcher`] (micro-batching): concurrent callers' requests are coalesced for at most
//!   [`BatchOptions::max_wait`] into one run along the model's batch axis and split back;
//!   each caller gets what an unbatched run would have given it (its own error included).
//! - [`Stream`] (streaming sessions): a stateful model (an LSTM's `h`/`c`, a VAD's state) run
//!   chunk by chunk, the app naming which outputs feed which inputs on the next chunk
//!   ([`StreamOptions::carry`]) and, for sliding-window audio models, how much of the
//!   previous chunk each chunk is prefixed with ([`StreamOptions::context`]).
//!
//! - [`JobQueue`] (background jobs): inference accepted now and run later — when the
//!   platform lets the app run ([`JobQueue::run_pending`] with a time budget) — in a
//!   directory that survives process death: at-least-once runs, exactly-once results,
//!   priorities, retries with backoff, a bounded size.
//!
//! - Request-path patterns: a [`Step`] (a session or an app callback) with a latency
//!   budget, a circuit [`Breaker`], a shared [`ResultCache`] and [`Fallback`]s that say
//!   which [`Source`] answered; a [`Cascade`] whose cheap stages answer when confident
//!   ([`Exit`], [`Confidence`], threshold [`Calibration`]); a [`FanOut`] of parallel steps
//!   merged under a deadline ([`Merge`]) that says which steps were missing. Each request
//!   is one telemetry span with a stage per step. A [`Pipeline`] runs steps in sequence,
//!   each fed by what came before it. [`Flow`] is any of the three, and a flow can be a
//!   step of another ([`Step::flow`]).
//! - Flow files ([`FlowFile`]): sessions, caches, steps and flows described in TOML or
//!   JSON, checked as a whole when built (unknown names, cycles, mismatched steps) into
//!   [`Flows`] run by name — what `tern flow` and the bindings load.
//!
//! All check their configuration against the session when built (a model without a batch
//! axis, a state name that is not an output/input pair) and fail with a typed [`Error`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use tern_flows::{Batcher, BatchOptions, Stream, StreamOptions};
//! # fn main() -> Result<(), tern_flows::Error> {
//! let model = tern::Model::load("classifier.onnx")?;
//! let session = Arc::new(tern::Session::new(&model, tern::SessionOptions::default())?);
//! let batcher = Batcher::new(session.clone(), BatchOptions::default().max_batch(8))?;
//! // From any number of threads:
//! let x = tern::Tensor::zeros(tern::DType::F32, &[1, 3, 48, 192])?;
//! let outputs = batcher.run([("x", x)])?;
//!
//! let vad = tern::Model::load("silero_vad_16k_sequence.onnx")?;
//! let vad = Arc::new(tern::Session::new(&vad, tern::SessionOptions::default())?);
//! let mut stream = Stream::new(
//!     vad,
//!     StreamOptions::new().carry("hn", "h").carry("cn", "c").context("input", 64),
//! )?;
//! let window = tern::Tensor::zeros(tern::DType::F32, &[1, 512])?;
//! let probability = stream.push([("input", window)])?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod batch;
pub mod breaker;
pub mod cache;
pub mod cascade;
pub mod error;
pub mod fanout;
pub mod file;
pub mod flow;
pub mod jobs;
pub mod pipeline;
mod rows;
pub mod step;
pub mod stream;

pub use batch::{BatchOptions, BatchStats, Batcher};
pub use breaker::{Breaker, BreakerOptions, BreakerState};
pub use cache::{CacheKey, CacheOptions, CacheStats, ResultCache};
pub use cascade::{
    Calibration, CalibrationPoint, Cascade, CascadeAnswer, CascadeBuilder, CascadeStats,
    Confidence, ConfidenceFn, Exit,
};
pub use error::{Error, ErrorKind, Result};
pub use fanout::{FanOut, FanOutAnswer, FanOutBuilder, Merge, MergeFn, Missing};
pub use file::{BuildOptions, FlowFile, Flows};
pub use flow::{Flow, FlowAnswer};
pub use jobs::{
    JobError, JobOptions, JobOutcome, JobQueue, JobStatus, Priority, Recovery, RunReport,
};
pub use pipeline::{Pipeline, PipelineAnswer, PipelineBuilder};
pub use step::{Answer, Compute, Failure, Fallback, Inputs, Source, Step, StepBuilder, StepStats};
pub use stream::{Stream, StreamOptions};
