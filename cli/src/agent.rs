//! `tern agent`: the long-running inference service (`tern_agent`), its flags the top
//! layer over the config file and the `TERN_AGENT_*` environment.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use tern::SessionOptions;
use tern_agent::AgentConfig;

/// `tern agent`'s flags; each one given overrides the config file and the environment.
#[derive(clap::Args)]
pub struct AgentArgs {
    /// The model directory: NAME.onnx, NAME/model.onnx or NAME.tern (signed bundle) each
    /// serve model NAME; changes are picked up while running.
    #[arg(long)]
    models: Option<PathBuf>,
    /// Where to listen, HOST:PORT or unix:PATH (default 127.0.0.1:8000). Repeatable.
    #[arg(long)]
    listen: Vec<String>,
    /// A TOML config file (docs/AGENT.md); flags override it, and it overrides nothing
    /// else but the defaults and TERN_AGENT_* variables.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Allow listening on addresses other than loopback.
    #[arg(long)]
    allow_remote: bool,
    /// Inferences run at once (default: the number of cores).
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Requests that may wait for a run; beyond, 503 with Retry-After (default 32).
    #[arg(long)]
    max_queued: Option<usize>,
    /// The largest request body in bytes (default 64 MiB).
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// The longest a request may take, queueing included, in ms (default 30000).
    #[arg(long)]
    request_timeout_ms: Option<u64>,
    /// The longest a client may take to send headers, and its body, in ms (default 10000).
    #[arg(long)]
    header_timeout_ms: Option<u64>,
    /// How often the model directory is checked, in ms (default 2000).
    #[arg(long)]
    poll_interval_ms: Option<u64>,
    /// A public key trusted to sign .tern bundles. Repeatable.
    #[arg(long)]
    trust: Vec<PathBuf>,
    /// Threads per inference (default 1).
    #[arg(long)]
    threads: Option<usize>,
    /// Serve a model store's active versions (`tern store --dir`) instead of --models.
    #[arg(long, conflicts_with = "models")]
    store_dir: Option<PathBuf>,
    /// Keep the store up to date from this update repository (http(s):// URL or a
    /// directory), installing and activating new versions of --update-model.
    #[arg(long, requires = "store_dir")]
    update_url: Option<String>,
    /// The repository's root.json the device trusts first.
    #[arg(long)]
    update_root: Option<PathBuf>,
    /// A model to keep up to date. Repeatable.
    #[arg(long)]
    update_model: Vec<String>,
    /// How often the repository is checked, in ms (default 3600000).
    #[arg(long)]
    update_interval_ms: Option<u64>,
    /// Micro-batch concurrent requests of each model with a batch axis, up to N rows per
    /// run (raise --max-in-flight to match: waiting requests hold a run slot).
    #[arg(long)]
    batch_max: Option<usize>,
    /// How long a request may wait for others to join its batch, in ms (default 2).
    #[arg(long)]
    batch_wait_ms: Option<u64>,
    /// A flow file (docs/FLOWS.md): each of its flows served as a model of its name.
    #[arg(long)]
    flows: Option<PathBuf>,
    /// Keep telemetry (spans, errors, health samples of every model) in this directory.
    #[arg(long)]
    telemetry_dir: Option<PathBuf>,
    /// Upload telemetry to this OTLP/HTTP collector (http://host:4318).
    #[arg(long)]
    otlp_url: Option<String>,
    /// Least time between two telemetry uploads, in ms (default 60000).
    #[arg(long)]
    telemetry_upload_interval_ms: Option<u64>,
    /// Log lines as JSON objects instead of text.
    #[arg(long)]
    log_json: bool,
}

impl AgentArgs {
    /// The flags as the top configuration layer.
    fn config(&self) -> AgentConfig {
        fn some_vec<T: Clone>(v: &[T]) -> Option<Vec<T>> {
            (!v.is_empty()).then(|| v.to_vec())
        }
        AgentConfig {
            models: self.models.clone(),
            listen: some_vec(&self.listen),
            allow_remote: self.allow_remote.then_some(true),
            max_in_flight: self.max_in_flight,
            max_queued: self.max_queued,
            max_connections: None,
            max_body_bytes: self.max_body_bytes,
            request_timeout_ms: self.request_timeout_ms,
            header_timeout_ms: self.header_timeout_ms,
            poll_interval_ms: self.poll_interval_ms,
            trust: some_vec(&self.trust),
            trust_threshold: None,
            threads: self.threads,
            telemetry_dir: self.telemetry_dir.clone(),
            otlp_url: self.otlp_url.clone(),
            telemetry_upload_interval_ms: self.telemetry_upload_interval_ms,
            telemetry_max_bytes: None,
            store_dir: self.store_dir.clone(),
            update_url: self.update_url.clone(),
            update_root: self.update_root.clone(),
            update_models: some_vec(&self.update_model),
            update_interval_ms: self.update_interval_ms,
            batch_max: self.batch_max,
            batch_wait_ms: self.batch_wait_ms,
            flows: self.flows.clone(),
        }
    }
}

/// Runs the agent until SIGTERM or Ctrl-C. Once listening it prints one JSON line to
/// stdout, `{"listening": [ADDRESS, …]}`, for whatever started it.
pub fn run(args: &AgentArgs) -> Result<()> {
    let subscriber = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if args.log_json {
        tracing::subscriber::set_global_default(subscriber.json().finish())
    } else {
        tracing::subscriber::set_global_default(subscriber.finish())
    };
    let file = match &args.config {
        Some(path) => AgentConfig::from_file(path)?,
        None => AgentConfig::default(),
    };
    let env = AgentConfig::from_env(|k| std::env::var(k).ok())?;
    let settings = file
        .overridden_by(env)
        .overridden_by(args.config())
        .settings(SessionOptions::new().threads(1))?;
    tern_agent::run_until_signal(settings, |addresses| {
        let listening: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", serde_json::json!({ "listening": listening }));
        let _ = out.flush();
    })?;
    Ok(())
}
