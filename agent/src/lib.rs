//! # tern-agent — `tern agent`, the on-device inference service
//!
//! On an IoT Linux device several processes need the same models. The agent loads a
//! directory of models once and serves them over the **Open Inference Protocol** (KServe
//! v2) — the protocol Triton, KServe and Seldon speak — over HTTP/JSON with the binary
//! tensor extension, on loopback or a Unix socket, so existing clients (`tritonclient`)
//! work unchanged.
//!
//! The crate is a pipeline of small stages, each in its own module:
//! - [`config`]: the TOML file, `TERN_AGENT_*` variables and flags, resolved once into
//!   [`Settings`];
//! - [`repository`]: the models served — a directory with hot reload, or a model store's
//!   active versions under its crash breadcrumb — and their atomic swaps;
//! - [`runner`]: a model's session, its session behind a micro-batcher, or a flow;
//! - [`update`]: scheduled updates of the store from an update repository;
//! - [`protocol`]: the protocol's documents and the request/response codec;
//! - [`server`]: routes, admission control (bounded queue, 503 + `Retry-After`), body and
//!   time limits, listeners and graceful shutdown;
//! - [`metrics`]: `/metrics` in the Prometheus text format;
//! - [`telemetry`]: tern's on-device buffer for every session, uploaded as OTLP/HTTP;
//! - [`error`]: every failure as a typed [`AgentError`] with its HTTP status.
//!
//! ```no_run
//! # fn main() -> Result<(), tern_agent::AgentError> {
//! let settings = tern_agent::AgentConfig {
//!     models: Some("/var/lib/tern/models".into()),
//!     ..Default::default()
//! }
//! .settings(tern::SessionOptions::default())?;
//! tern_agent::run_until_signal(settings, |addresses| {
//!     for a in addresses {
//!         println!("listening on {a}");
//!     }
//! })
//! # }
//! ```

pub mod config;
pub mod error;
pub mod metrics;
pub mod protocol;
pub mod repository;
pub mod runner;
pub mod server;
pub mod telemetry;
pub mod update;

pub use config::{AgentConfig, ConfigError, Limits, Listen, ModelSource, Settings, UpdateSettings};
pub use error::AgentError;
pub use repository::{RepoEvent, Repository, ServedModel, Serving, Source, SourceKind};
pub use runner::Runner;
pub use server::{run_until_signal, Agent};
