//! The agent's configuration: a TOML file (`--config`), `TERN_AGENT_*` environment
//! variables over it, command-line flags over both, resolved once into [`Settings`].
//!
//! ```toml
//! models = "/var/lib/tern/models"
//! listen = ["127.0.0.1:8000", "unix:/run/tern/agent.sock"]
//! max_in_flight = 2        # runs at once (default: the number of cores)
//! max_queued = 32          # admitted requests waiting for a run; beyond: 503 + Retry-After
//! max_body_bytes = 67108864
//! request_timeout_ms = 30000
//! trust = ["/etc/tern/release.pub"]   # keys that must sign .tern bundles
//! telemetry_dir = "/var/lib/tern-agent/telemetry"
//! otlp_url = "http://127.0.0.1:4318"   # an OpenTelemetry collector (OTLP/HTTP JSON)
//! ```
//!
//! Or, instead of `models`, a model store kept up to date from an update repository:
//!
//! ```toml
//! store_dir = "/var/lib/tern-agent/store"
//! trust = ["/etc/tern/release.pub"]
//! update_url = "https://models.example.com/repo"
//! update_root = "/etc/tern/root.json"
//! update_models = ["ppocr_cls"]
//! update_interval_ms = 3600000
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tern::SessionOptions;
use tern_bundle::{PublicKey, Trust};

use crate::telemetry::TelemetrySettings;
use tern_flows::BatchOptions;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An environment variable does not parse.
    #[error("{name}={value}: {reason}")]
    Env {
        /// The variable.
        name: String,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
    },
    /// A setting is missing or out of range.
    #[error("{0}")]
    Invalid(String),
    /// A trusted key cannot be read.
    #[error("trusted key: {0}")]
    Trust(#[from] tern_bundle::Error),
}

/// The agent's configuration as written: every field optional, so that layers (file,
/// environment, flags) can be merged before [`AgentConfig::settings`] fills in defaults.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The model directory.
    pub models: Option<PathBuf>,
    /// Where to listen: `HOST:PORT` or `unix:PATH`.
    pub listen: Option<Vec<String>>,
    /// Allow listening on addresses other than loopback.
    pub allow_remote: Option<bool>,
    /// Inferences run at once.
    pub max_in_flight: Option<usize>,
    /// Admitted requests that may wait for a run.
    pub max_queued: Option<usize>,
    /// Open connections at once.
    pub max_connections: Option<usize>,
    /// The largest request body.
    pub max_body_bytes: Option<usize>,
    /// The time a request may take, queueing included.
    pub request_timeout_ms: Option<u64>,
    /// The time a client may take to send a request's headers (and, separately, its body).
    pub header_timeout_ms: Option<u64>,
    /// How often the model directory is checked for changes.
    pub poll_interval_ms: Option<u64>,
    /// Public keys trusted to sign `.tern` bundles (bundles are refused without any).
    pub trust: Option<Vec<PathBuf>>,
    /// How many of the trusted keys must have signed a bundle.
    pub trust_threshold: Option<usize>,
    /// Threads per inference (the CPU kernels' pool).
    pub threads: Option<usize>,
    /// The telemetry buffer's directory (no telemetry without one).
    pub telemetry_dir: Option<PathBuf>,
    /// An OTLP/HTTP collector's base URL (`http://host:4318`) to upload telemetry to.
    pub otlp_url: Option<String>,
    /// Least time between two telemetry uploads.
    pub telemetry_upload_interval_ms: Option<u64>,
    /// Most bytes of telemetry kept on disk.
    pub telemetry_max_bytes: Option<u64>,
    /// Serve a model store's active versions (`tern store`'s directory) instead of
    /// `models`.
    pub store_dir: Option<PathBuf>,
    /// The update repository the store is kept up to date from: an http(s):// URL or a
    /// directory.
    pub update_url: Option<String>,
    /// The repository's root metadata the device trusts first (`root.json`).
    pub update_root: Option<PathBuf>,
    /// The models to update.
    pub update_models: Option<Vec<String>>,
    /// How often the repository is checked.
    pub update_interval_ms: Option<u64>,
    /// Micro-batch concurrent requests of each model with a batch axis, up to this many
    /// rows per run.
    pub batch_max: Option<usize>,
    /// How long a request may wait for others to join its batch.
    pub batch_wait_ms: Option<u64>,
    /// A flow file (docs/FLOWS.md): each flow served as a model of its name.
    pub flows: Option<PathBuf>,
}

macro_rules! merge_fields {
    ($base:ident, $over:ident, $($f:ident),*) => {
        AgentConfig { $($f: $over.$f.or($base.$f)),* }
    };
}

impl AgentConfig {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// The `TERN_AGENT_*` variables (`TERN_AGENT_MODELS`, `TERN_AGENT_LISTEN` as a comma
    /// separated list, `TERN_AGENT_MAX_IN_FLIGHT`… one per field, upper-cased), read
    /// through `var` so tests need not touch the process environment.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<AgentConfig, ConfigError> {
        fn parse<T: std::str::FromStr>(
            var: &dyn Fn(&str) -> Option<String>,
            field: &str,
        ) -> Result<Option<T>, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            let name = format!("TERN_AGENT_{}", field.to_uppercase());
            match var(&name) {
                None => Ok(None),
                Some(value) => {
                    value
                        .trim()
                        .parse()
                        .map(Some)
                        .map_err(|e: T::Err| ConfigError::Env {
                            reason: e.to_string(),
                            name,
                            value,
                        })
                }
            }
        }
        let list = |field: &str| {
            var(&format!("TERN_AGENT_{}", field.to_uppercase())).map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
        };
        Ok(AgentConfig {
            models: parse(&var, "models")?,
            listen: list("listen"),
            allow_remote: parse(&var, "allow_remote")?,
            max_in_flight: parse(&var, "max_in_flight")?,
            max_queued: parse(&var, "max_queued")?,
            max_connections: parse(&var, "max_connections")?,
            max_body_bytes: parse(&var, "max_body_bytes")?,
            request_timeout_ms: parse(&var, "request_timeout_ms")?,
            header_timeout_ms: parse(&var, "header_timeout_ms")?,
            poll_interval_ms: parse(&var, "poll_interval_ms")?,
            trust: list("trust").map(|v| v.into_iter().map(PathBuf::from).collect()),
            trust_threshold: parse(&var, "trust_threshold")?,
            threads: parse(&var, "threads")?,
            telemetry_dir: parse(&var, "telemetry_dir")?,
            otlp_url: parse(&var, "otlp_url")?,
            telemetry_upload_interval_ms: parse(&var, "telemetry_upload_interval_ms")?,
            telemetry_max_bytes: parse(&var, "telemetry_max_bytes")?,
            store_dir: parse(&var, "store_dir")?,
            update_url: parse(&var, "update_url")?,
            update_root: parse(&var, "update_root")?,
            update_models: list("update_models"),
            update_interval_ms: parse(&var, "update_interval_ms")?,
            batch_max: parse(&var, "batch_max")?,
            batch_wait_ms: parse(&var, "batch_wait_ms")?,
            flows: parse(&var, "flows")?,
        })
    }

    /// This configuration with every field `over` sets taking its place.
    pub fn overridden_by(self, over: AgentConfig) -> AgentConfig {
        let base = self;
        merge_fields!(
            base,
            over,
            models,
            listen,
            allow_remote,
            max_in_flight,
            max_queued,
            max_connections,
            max_body_bytes,
            request_timeout_ms,
            header_timeout_ms,
            poll_interval_ms,
            trust,
            trust_threshold,
            threads,
            telemetry_dir,
            otlp_url,
            telemetry_upload_interval_ms,
            telemetry_max_bytes,
            store_dir,
            update_url,
            update_root,
            update_models,
            update_interval_ms,
            batch_max,
            batch_wait_ms,
            flows
        )
    }

    /// Resolves the configuration, with defaults, into settings; `session` is the base
    /// for every model's session options (`threads` applied over it).
    pub fn settings(self, session: SessionOptions) -> Result<Settings, ConfigError> {
        let models = match (self.models, self.store_dir) {
            (Some(dir), None) => {
                if self.update_url.is_some() {
                    return Err(ConfigError::Invalid(
                        "update_url updates a model store: set store_dir, not models".into(),
                    ));
                }
                ModelSource::Directory(dir)
            }
            (None, Some(dir)) => ModelSource::Store {
                dir,
                update: match self.update_url {
                    None => None,
                    Some(url) => Some(UpdateSettings {
                        url,
                        root: self.update_root.ok_or_else(|| {
                            ConfigError::Invalid("update_url needs update_root (root.json)".into())
                        })?,
                        models: match self.update_models {
                            Some(m) if !m.is_empty() => m,
                            _ => {
                                return Err(ConfigError::Invalid(
                                    "update_url needs update_models (the models to update)".into(),
                                ))
                            }
                        },
                        interval: Duration::from_millis(
                            self.update_interval_ms.unwrap_or(3_600_000).max(100),
                        ),
                    }),
                },
            },
            (None, None) => {
                return Err(ConfigError::Invalid(
                    "no models: set models (a directory) or store_dir (a model store)".into(),
                ))
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "models and store_dir both set: serve one or the other".into(),
                ))
            }
        };
        let listen = self
            .listen
            .unwrap_or_else(|| vec!["127.0.0.1:8000".to_string()])
            .iter()
            .map(|l| Listen::parse(l))
            .collect::<Result<Vec<_>, _>>()?;
        if listen.is_empty() {
            return Err(ConfigError::Invalid("nothing to listen on".into()));
        }
        if !self.allow_remote.unwrap_or(false) {
            if let Some(addr) = listen.iter().find_map(|l| match l {
                Listen::Tcp(a) if !a.ip().is_loopback() => Some(a),
                _ => None,
            }) {
                return Err(ConfigError::Invalid(format!(
                    "{addr} is not a loopback address: set allow_remote to listen on it"
                )));
            }
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(ConfigError::Invalid(format!("{name} must be at least 1")))
            } else {
                Ok(v)
            }
        };
        let limits = Limits {
            max_in_flight: positive("max_in_flight", self.max_in_flight.unwrap_or(cores))?,
            max_queued: self.max_queued.unwrap_or(32),
            max_connections: positive("max_connections", self.max_connections.unwrap_or(256))?,
            max_body_bytes: self.max_body_bytes.unwrap_or(64 << 20),
            request_timeout: Duration::from_millis(self.request_timeout_ms.unwrap_or(30_000)),
            header_timeout: Duration::from_millis(self.header_timeout_ms.unwrap_or(10_000)),
        };
        let trust = match self.trust {
            Some(paths) if !paths.is_empty() => {
                let keys = paths
                    .iter()
                    .map(|p| PublicKey::read(p))
                    .collect::<Result<Vec<_>, _>>()?;
                Some(Trust::new(keys, self.trust_threshold.unwrap_or(1))?)
            }
            _ => None,
        };
        if matches!(models, ModelSource::Store { .. }) && trust.is_none() {
            return Err(ConfigError::Invalid(
                "a model store needs trust: the keys its bundles are signed with".into(),
            ));
        }
        if self.otlp_url.is_some() && self.telemetry_dir.is_none() {
            return Err(ConfigError::Invalid(
                "otlp_url needs telemetry_dir: telemetry is buffered on disk before upload".into(),
            ));
        }
        let telemetry = self.telemetry_dir.map(|dir| TelemetrySettings {
            dir,
            otlp_url: self.otlp_url,
            upload_interval: Duration::from_millis(
                self.telemetry_upload_interval_ms.unwrap_or(60_000),
            ),
            max_bytes: self.telemetry_max_bytes.unwrap_or(16 << 20),
        });
        let batch = match (self.batch_max, self.batch_wait_ms) {
            (None, None) => None,
            (max, wait) => Some(
                // One batch per core at a time: a single worker would leave the other cores
                // idle while it runs (each run uses `threads` threads).
                BatchOptions::default()
                    .max_batch(max.unwrap_or(8))
                    .max_wait(Duration::from_millis(wait.unwrap_or(2)))
                    .workers(cores),
            ),
        };
        Ok(Settings {
            models,
            batch,
            flows: self.flows,
            telemetry,
            listen,
            limits,
            poll_interval: Duration::from_millis(self.poll_interval_ms.unwrap_or(2_000).max(10)),
            trust,
            session: match self.threads {
                Some(t) => session.threads(t),
                None => session,
            },
        })
    }
}

/// Where the served models come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A directory of `NAME.onnx`, `NAME/model.onnx` and `NAME.tern` entries.
    Directory(PathBuf),
    /// A model store's active versions, optionally kept up to date from a repository.
    Store {
        /// The store's directory.
        dir: PathBuf,
        /// Scheduled updates.
        update: Option<UpdateSettings>,
    },
}

/// Scheduled updates of a model store from an update repository.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateSettings {
    /// The repository: an http(s):// URL or a directory.
    pub url: String,
    /// The root metadata trusted first.
    pub root: PathBuf,
    /// The models to update.
    pub models: Vec<String>,
    /// How often the repository is checked.
    pub interval: Duration,
}

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix domain socket (created at start, removed at exit).
    Unix(PathBuf),
}

impl Listen {
    /// Parses `HOST:PORT` or `unix:PATH`.
    pub fn parse(s: &str) -> Result<Listen, ConfigError> {
        match s.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(Listen::Unix(PathBuf::from(path))),
            Some(_) => Err(ConfigError::Invalid("unix: needs a path".into())),
            None => s
                .parse()
                .map(Listen::Tcp)
                .map_err(|e| ConfigError::Invalid(format!("listen address {s}: {e}"))),
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Bounds on what clients can make the agent hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Inferences run at once.
    pub max_in_flight: usize,
    /// Admitted requests that may wait for a run; more get 503 with `Retry-After`.
    pub max_queued: usize,
    /// Open connections at once; more wait in the kernel's accept backlog.
    pub max_connections: usize,
    /// The largest request body (413 beyond).
    pub max_body_bytes: usize,
    /// The time a request may take, queueing included (408 beyond).
    pub request_timeout: Duration,
    /// The time a client may take to send a request's headers, and its body.
    pub header_timeout: Duration,
}

/// The agent's resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the models come from.
    pub models: ModelSource,
    /// Where to listen.
    pub listen: Vec<Listen>,
    /// Bounds.
    pub limits: Limits,
    /// How often the model directory is checked for changes.
    pub poll_interval: Duration,
    /// Who must have signed `.tern` bundles (none: bundles are refused).
    pub trust: Option<Trust>,
    /// Every model's session options.
    pub session: SessionOptions,
    /// Telemetry: the buffer's directory and the collector (none: no telemetry).
    pub telemetry: Option<TelemetrySettings>,
    /// Micro-batching of every model with a batch axis.
    pub batch: Option<BatchOptions>,
    /// A flow file whose flows are served as models.
    pub flows: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_override_in_order_and_defaults_fill_the_rest() {
        let file: AgentConfig = toml::from_str(
            r#"
            models = "/m"
            listen = ["127.0.0.1:9000"]
            max_queued = 4
            "#,
        )
        .unwrap();
        let env = AgentConfig::from_env(|k| match k {
            "TERN_AGENT_MAX_QUEUED" => Some("8".into()),
            "TERN_AGENT_LISTEN" => Some("127.0.0.1:1, unix:/tmp/a.sock".into()),
            _ => None,
        })
        .unwrap();
        let flags = AgentConfig {
            max_in_flight: Some(3),
            ..AgentConfig::default()
        };
        let s = file
            .overridden_by(env)
            .overridden_by(flags)
            .settings(SessionOptions::default())
            .unwrap();
        assert_eq!(s.models, ModelSource::Directory(PathBuf::from("/m")));
        assert_eq!(
            s.listen,
            vec![
                Listen::Tcp("127.0.0.1:1".parse().unwrap()),
                Listen::Unix("/tmp/a.sock".into())
            ]
        );
        assert_eq!((s.limits.max_queued, s.limits.max_in_flight), (8, 3));
        assert_eq!(s.limits.max_body_bytes, 64 << 20);
    }

    #[test]
    fn the_packaged_config_file_parses() {
        let config: AgentConfig =
            toml::from_str(include_str!("../../packaging/agent.toml")).expect("agent.toml");
        let s = AgentConfig {
            models: Some("/m".into()),
            ..config
        }
        .settings(SessionOptions::default())
        .expect("settings");
        assert_eq!(s.listen.len(), 2);
        assert_eq!(s.limits.max_in_flight, 2);
    }

    #[test]
    fn bad_settings_are_refused() {
        let base = AgentConfig {
            models: Some("/m".into()),
            ..AgentConfig::default()
        };
        let with = |listen: &str, remote: Option<bool>| {
            AgentConfig {
                listen: Some(vec![listen.to_string()]),
                allow_remote: remote,
                ..base.clone()
            }
            .settings(SessionOptions::default())
        };
        assert!(matches!(
            with("0.0.0.0:8000", None),
            Err(ConfigError::Invalid(_))
        ));
        assert!(with("0.0.0.0:8000", Some(true)).is_ok());
        assert!(with("[::1]:8000", None).is_ok());
        assert!(with("localhost", None).is_err());
        assert!(AgentConfig::default()
            .settings(SessionOptions::default())
            .is_err());
        assert!(matches!(
            AgentConfig::from_env(|k| (k == "TERN_AGENT_MAX_QUEUED").then(|| "many".into())),
            Err(ConfigError::Env { .. })
        ));
        assert!(toml::from_str::<AgentConfig>("modles = \"/m\"").is_err());
        // One source of models; a store needs trust; updates need a store, a root, models.
        let store = AgentConfig {
            store_dir: Some("/s".into()),
            ..AgentConfig::default()
        };
        for bad in [
            AgentConfig {
                store_dir: Some("/s".into()),
                ..base.clone()
            },
            store.clone(),
            AgentConfig {
                update_url: Some("http://r".into()),
                ..base.clone()
            },
        ] {
            assert!(matches!(
                bad.settings(SessionOptions::default()),
                Err(ConfigError::Invalid(_))
            ));
        }
    }
}
