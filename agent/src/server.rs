//! The HTTP side: the Open Inference Protocol's routes over the [`Repository`], admission
//! control, and the listeners with their graceful shutdown.
//!
//! A request's path through the agent: a listener accepts the connection (at most
//! `max_connections` open; headers must arrive within `header_timeout`); the body is
//! refused beyond `max_body_bytes` (413) and must arrive within `header_timeout`; the
//! model is looked up (404); the request is admitted if fewer than `max_in_flight +
//! max_queued` are in the agent (else 503 with `Retry-After`), waits for one of the
//! `max_in_flight` run slots, and is decoded, run and encoded on one of `max_in_flight`
//! inference threads; the
//! whole takes at most `request_timeout` (408). Every answer is counted in `/metrics`.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::gauge::Gauge;
use tern::Tensor;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Listen, ModelSource, Settings};
use crate::error::AgentError;
use crate::metrics::{Metrics, Outcome, CONTENT_TYPE};
use crate::protocol::{
    decode_request, encode_response, Encoded, IndexEntry, ModelMetadata, ProtocolError,
    ServerMetadata, TensorMetadata, HEADER_LENGTH,
};
use crate::repository::{Repository, ServedModel, Serving, Source};
use crate::update::Updates;
use tern_bundle::{ModelStore, StoreOptions};

/// The server's name in `GET /v2`.
pub const SERVER_NAME: &str = "tern";

/// What every handler shares.
struct AppState {
    repo: Arc<Repository>,
    metrics: Arc<Metrics>,
    /// Requests in the agent (queued or running): `max_in_flight + max_queued` permits.
    admitted: Arc<Semaphore>,
    /// Runs at once: `max_in_flight` permits.
    running: Arc<Semaphore>,
    /// The threads inference runs on: exactly `max_in_flight`, kept for the agent's life,
    /// so per-thread state (tract's scratch buffers, the allocator's arenas) is bounded
    /// by the concurrency limit and built once, not per request.
    workers: rayon::ThreadPool,
    stopping: AtomicBool,
}

impl AppState {
    fn model(&self, name: &str, version: Option<&str>) -> Result<Arc<ServedModel>, AgentError> {
        let model = self
            .repo
            .get(name)
            .ok_or_else(|| AgentError::ModelNotFound(name.to_string()))?;
        match version {
            Some(v) if v != model.version => Err(AgentError::VersionNotFound {
                name: name.to_string(),
                asked: v.to_string(),
                served: model.version.clone(),
            }),
            _ => Ok(model),
        }
    }
}

/// Adds one to a gauge for as long as it lives.
struct Held(Gauge);

impl Held {
    fn new(gauge: &Gauge) -> Held {
        gauge.inc();
        Held(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A bound listener.
enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// The agent, its models loaded and its listeners bound: [`Agent::serve`] runs it.
pub struct Agent {
    state: Arc<AppState>,
    settings: Settings,
    listeners: Vec<Bound>,
    telemetry: Option<tern::Telemetry>,
    updates: Option<(Updates, Duration)>,
}

impl Agent {
    /// Loads the model directory and binds every listener. A Unix socket path left by a
    /// previous run is replaced.
    pub async fn bind(settings: Settings) -> Result<Agent, AgentError> {
        // Before any session exists: sessions record into the buffer open when they start.
        let telemetry = settings
            .telemetry
            .as_ref()
            .map(crate::telemetry::start)
            .transpose()?;
        let metrics = Arc::new(Metrics::new());
        let (source, updates) = match &settings.models {
            ModelSource::Directory(dir) => (Source::Directory(dir.clone()), None),
            ModelSource::Store { dir, update } => {
                let trust = settings.trust.clone().ok_or_else(|| {
                    AgentError::Config(crate::config::ConfigError::Invalid(
                        "a model store needs trust".into(),
                    ))
                })?;
                let store = ModelStore::open(
                    dir.clone(),
                    trust,
                    StoreOptions::default().session(settings.session.clone()),
                )
                .map_err(AgentError::Update)?;
                let updates = update
                    .as_ref()
                    .map(|u| {
                        Updates::new(store.clone(), u, metrics.clone()).map(|x| (x, u.interval))
                    })
                    .transpose()?;
                (Source::Store(Box::new(store)), updates)
            }
        };
        let flows = match &settings.flows {
            None => None,
            Some(path) => {
                let options = tern_flows::BuildOptions::default()
                    .base_dir(path.parent().unwrap_or(std::path::Path::new(".")))
                    .session(settings.session.clone());
                Some(Arc::new(
                    tern_flows::FlowFile::load(path, options).map_err(AgentError::Flow)?,
                ))
            }
        };
        if let Some(f) = &flows {
            metrics.watch_flows(f.clone());
        }
        let repo = Arc::new(Repository::new(
            source,
            Serving {
                batch: settings.batch.clone(),
                flows,
            },
            settings.session.clone(),
            settings.trust.clone(),
            metrics.clone(),
        ));
        let scanning = repo.clone();
        tokio::task::spawn_blocking(move || scanning.scan(false))
            .await
            .map_err(|e| AgentError::Io {
                context: "loading the models".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let mut listeners = Vec::with_capacity(settings.listen.len());
        for listen in &settings.listen {
            let io = |source| AgentError::Io {
                context: format!("listening on {listen}"),
                source,
            };
            listeners.push(match listen {
                Listen::Tcp(addr) => Bound::Tcp(TcpListener::bind(addr).await.map_err(io)?),
                Listen::Unix(path) => {
                    use std::os::unix::fs::FileTypeExt;
                    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                        std::fs::remove_file(path).map_err(io)?;
                    }
                    let listener = UnixListener::bind(path).map_err(io)?;
                    // Any local user can reach the loopback port; the socket is no more
                    // private than that (connecting needs write permission on it).
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
                        .map_err(io)?;
                    Bound::Unix(listener, path.clone())
                }
            });
        }
        let limits = &settings.limits;
        let state = Arc::new(AppState {
            repo,
            metrics,
            admitted: Arc::new(Semaphore::new(limits.max_in_flight + limits.max_queued)),
            running: Arc::new(Semaphore::new(limits.max_in_flight)),
            workers: rayon::ThreadPoolBuilder::new()
                .num_threads(limits.max_in_flight)
                .thread_name(|i| format!("tern-agent-run-{i}"))
                .build()
                .map_err(|e| AgentError::Io {
                    context: "starting the inference threads".into(),
                    source: std::io::Error::other(e.to_string()),
                })?,
            stopping: AtomicBool::new(false),
        });
        Ok(Agent {
            state,
            settings,
            listeners,
            telemetry,
            updates,
        })
    }

    /// Where the agent listens (TCP ports as bound, for `:0`).
    pub fn addresses(&self) -> Vec<Listen> {
        self.listeners
            .iter()
            .filter_map(|l| match l {
                Bound::Tcp(t) => t.local_addr().ok().map(Listen::Tcp),
                Bound::Unix(_, p) => Some(Listen::Unix(p.clone())),
            })
            .collect()
    }

    /// The models served.
    pub fn repository(&self) -> &Arc<Repository> {
        &self.state.repo
    }

    /// Serves until `shutdown` completes, watching the model directory; then stops
    /// accepting, lets requests in flight finish (up to `request_timeout`), and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
        let Agent {
            state,
            settings,
            listeners,
            telemetry,
            updates,
        } = self;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (watch_stop, watch_rx) = std::sync::mpsc::channel::<()>();
        let watched = state.repo.clone();
        let interval = settings.poll_interval;
        let watcher = std::thread::Builder::new()
            .name("tern-agent-watch".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    watch_rx.recv_timeout(interval)
                {
                    watched.scan(true);
                }
            })
            .map_err(|source| AgentError::Io {
                context: "starting the model watcher".into(),
                source,
            })?;
        let (update_stop, update_rx) = std::sync::mpsc::channel::<()>();
        let updater = match updates {
            None => None,
            Some((updates, every)) => {
                let repo = state.repo.clone();
                let thread = std::thread::Builder::new()
                    .name("tern-agent-update".into())
                    .spawn(move || loop {
                        // A new active version is served at once, not at the next scan.
                        if updates.check() {
                            repo.scan(true);
                        }
                        match update_rx.recv_timeout(every) {
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                            _ => return,
                        }
                    })
                    .map_err(|source| AgentError::Io {
                        context: "starting the updater".into(),
                        source,
                    })?;
                Some(thread)
            }
        };
        let graceful = Arc::new(GracefulShutdown::new());
        let connections = Arc::new(Semaphore::new(settings.limits.max_connections));
        let app = router(state.clone(), &settings);
        let mut sockets = Vec::new();
        let mut loops = tokio::task::JoinSet::new();
        for bound in listeners {
            if let Bound::Unix(_, path) = &bound {
                sockets.push(path.clone());
            }
            loops.spawn(accept_loop(
                bound,
                Conn {
                    app: app.clone(),
                    graceful: graceful.clone(),
                    connections: connections.clone(),
                    header_timeout: settings.limits.header_timeout,
                },
                stop_rx.clone(),
            ));
        }
        shutdown.await;
        tracing::info!("shutting down: no new connections, draining requests in flight");
        state.stopping.store(true, Ordering::SeqCst);
        let _ = stop_tx.send(true);
        while loops.join_next().await.is_some() {}
        if let Ok(graceful) = Arc::try_unwrap(graceful) {
            let drain = settings.limits.request_timeout + Duration::from_secs(1);
            if tokio::time::timeout(drain, graceful.shutdown())
                .await
                .is_err()
            {
                tracing::warn!("connections still open after {drain:?}; closing them");
            }
        }
        drop(watch_stop);
        let _ = watcher.join();
        drop(update_stop);
        if let Some(t) = updater {
            let _ = t.join();
        }
        for path in sockets {
            let _ = std::fs::remove_file(path);
        }
        if let Some(t) = telemetry {
            // Flushed to disk; what is not uploaded yet goes at the next start.
            if let Err(e) = tokio::task::spawn_blocking(move || t.close()).await {
                tracing::warn!(error = %e, "closing the telemetry buffer");
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// What each accepted connection needs.
#[derive(Clone)]
struct Conn {
    app: Router,
    graceful: Arc<GracefulShutdown>,
    connections: Arc<Semaphore>,
    header_timeout: Duration,
}

impl Conn {
    fn spawn<S>(&self, stream: S, permit: OwnedSemaphorePermit)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(self.app.clone()),
        );
        let conn = self.graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended");
            }
            drop(permit);
        });
    }
}

async fn accept_loop(bound: Bound, conn: Conn, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        let permit = tokio::select! {
            _ = stop.changed() => return,
            p = conn.connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            a = async {
                match &bound {
                    Bound::Tcp(l) => l.accept().await.map(|(s, _)| conn.spawn(s, permit)),
                    Bound::Unix(l, _) => l.accept().await.map(|(s, _)| conn.spawn(s, permit)),
                }
            } => a,
        };
        if let Err(e) = accepted {
            // Out of file descriptors, a connection reset before accept: wait a little
            // rather than spin.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn router(state: Arc<AppState>, settings: &Settings) -> Router {
    let limits = &settings.limits;
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_version),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_version),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_version),
        )
        .route("/metrics", get(metrics))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({"error": "no such route", "kind": "not_found"})),
            )
        })
        .with_state(state)
        .layer(DefaultBodyLimit::disable())
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            limits.max_body_bytes,
        ))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            limits.header_timeout,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ))
}

async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: SERVER_NAME.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        extensions: vec!["binary_tensor_data".into(), "model_repository".into()],
    })
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(state): State<Arc<AppState>>) -> StatusCode {
    if state.stopping.load(Ordering::SeqCst) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn repository_index(State(state): State<Arc<AppState>>) -> Json<Vec<IndexEntry>> {
    Json(
        state
            .repo
            .all()
            .iter()
            .map(|m| IndexEntry {
                name: m.name.clone(),
                version: m.version.clone(),
                state: "READY".into(),
            })
            .collect(),
    )
}

fn metadata(model: &ServedModel) -> ModelMetadata {
    ModelMetadata {
        name: model.name.clone(),
        versions: vec![model.version.clone()],
        platform: "onnx".into(),
        inputs: model
            .runner
            .inputs()
            .iter()
            .map(TensorMetadata::of)
            .collect(),
        outputs: model
            .runner
            .outputs()
            .iter()
            .map(TensorMetadata::of)
            .collect(),
    }
}

async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<ModelMetadata>, AgentError> {
    let model = state.model(&name, None)?;
    Ok(Json(metadata(&model)))
}

async fn model_metadata_version(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<ModelMetadata>, AgentError> {
    let model = state.model(&name, Some(&version))?;
    Ok(Json(metadata(&model)))
}

async fn model_ready(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, AgentError> {
    state.model(&name, None).map(|_| StatusCode::OK)
}

async fn model_ready_version(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<StatusCode, AgentError> {
    state.model(&name, Some(&version)).map(|_| StatusCode::OK)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}

async fn infer(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(state, name, None, headers, body).await
}

async fn infer_version(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(state, name, Some(version), headers, body).await
}

/// Runs an infer request and counts its outcome.
async fn answer(
    state: Arc<AppState>,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let mut served_version = String::new();
    let result = async {
        // The body is read before anything can refuse the request: a client still sending
        // when the answer comes would see its connection reset instead of the answer.
        let body = read_body(body).await?;
        if state.stopping.load(Ordering::SeqCst) {
            return Err(AgentError::ShuttingDown);
        }
        let model = state.model(&name, version.as_deref())?;
        served_version.clone_from(&model.version);
        let header_length = match headers.get(HEADER_LENGTH) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .map_err(|e| ProtocolError::HeaderLength(e.to_string()))?
                    .to_string(),
            ),
        };
        let admitted = state
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|_| AgentError::Overloaded)?;
        let queued = Held::new(state.metrics.queued());
        let slot = state
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AgentError::ShuttingDown)?;
        drop(queued);
        let running = Held::new(state.metrics.in_flight());
        let (done, result) = tokio::sync::oneshot::channel();
        state.workers.spawn(move || {
            // A panic here would abort the process (rayon's default): it becomes a 500.
            let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(&model, &body, header_length.as_deref())
            }))
            .unwrap_or(Err(AgentError::Panic));
            // The slot is free before the client can have the answer: a client sending its
            // next request as soon as it has one must find room for it.
            drop((admitted, slot, running));
            let _ = done.send(answer);
        });
        result.await.map_err(|_| AgentError::Io {
            context: "running the model".into(),
            source: std::io::Error::other("the inference thread stopped"),
        })?
    }
    .await;
    let took = start.elapsed();
    match result {
        Ok(encoded) => {
            state
                .metrics
                .request(&name, &served_version, Outcome::ok, took);
            let mut response = Response::new(Body::from(encoded.body));
            let headers = response.headers_mut();
            match encoded.header_length {
                Some(n) => {
                    headers.insert(HEADER_LENGTH, HeaderValue::from(n));
                    headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                }
                None => {
                    headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                }
            }
            response
        }
        Err(e) => {
            let outcome = match e.status() {
                StatusCode::NOT_FOUND => Outcome::not_found,
                StatusCode::SERVICE_UNAVAILABLE => Outcome::overloaded,
                s if s.is_client_error() => Outcome::bad_request,
                _ => Outcome::failed,
            };
            if outcome == Outcome::failed {
                tracing::warn!(model = %name, error = %e, "inference failed");
            }
            state.metrics.request(&name, &served_version, outcome, took);
            e.into_response()
        }
    }
}

/// Reads a whole request body (its size already bounded by the limit layer), telling a
/// client too slow to send it (408) from one sending too much (413).
async fn read_body(body: Body) -> Result<Bytes, AgentError> {
    axum::body::to_bytes(body, usize::MAX).await.map_err(|e| {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cause {
            if c.is::<tower_http::timeout::TimeoutError>() {
                return AgentError::BodyTimeout;
            }
            if c.is::<http_body_util::LengthLimitError>() {
                return AgentError::BodyTooLarge;
            }
            cause = c.source();
        }
        AgentError::Io {
            context: "reading the request body".into(),
            source: std::io::Error::other(e.to_string()),
        }
    })
}

/// Decodes, runs and encodes one request (on an inference thread).
fn run(
    model: &ServedModel,
    body: &[u8],
    header_length: Option<&str>,
) -> Result<Encoded, AgentError> {
    let mut decoded = decode_request(body, header_length)?;
    let names = model.runner.output_names();
    if let Some(names) = names {
        if let Some(unknown) = decoded
            .outputs
            .iter()
            .flatten()
            .find(|(n, _)| !names.contains(n))
        {
            return Err(ProtocolError::UnknownOutput(unknown.0.clone()).into());
        }
    }
    let inputs = std::mem::take(&mut decoded.inputs);
    let (outputs, parameters) = model.runner.run(inputs)?;
    let order: Vec<String> = match names {
        Some(n) => n.to_vec(),
        None => outputs.iter().map(|(n, _)| n.to_string()).collect(),
    };
    let outputs: BTreeMap<String, Tensor> = outputs.into_iter().collect();
    Ok(encode_response(
        &model.name,
        &model.version,
        &decoded,
        &outputs,
        &order,
        parameters,
    )?)
}

/// Runs the agent until SIGTERM or SIGINT (Ctrl-C), on a runtime of its own; `on_ready`
/// is told where it listens once the models are loaded and the listeners bound.
pub fn run_until_signal(
    settings: Settings,
    on_ready: impl FnOnce(&[Listen]),
) -> Result<(), AgentError> {
    let io = |context: &str| {
        let context = context.to_string();
        move |source| AgentError::Io { context, source }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.min(2))
        .thread_name("tern-agent")
        .enable_all()
        .build()
        .map_err(io("starting the runtime"))?;
    runtime.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(io("installing the SIGTERM handler"))?;
        let agent = Agent::bind(settings).await?;
        on_ready(&agent.addresses());
        agent
            .serve(async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            })
            .await
    })
}
