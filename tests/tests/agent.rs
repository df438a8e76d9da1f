//! `tern agent` over real sockets: the Open Inference Protocol's routes against
//! onnxruntime's reference outputs, bad requests as typed HTTP errors, hot reload with a
//! corrupt file refused, admission control (503 + Retry-After), slow clients cut off,
//! graceful shutdown with a request in flight, and the Unix socket.
//!
//! The real third-party client (tritonclient) is `scripts/agent_e2e.py`; these tests speak
//! HTTP through ureq and raw sockets.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tern::{Outputs, SessionOptions, Tensor};
use tern_agent::protocol::{InferResponse, HEADER_LENGTH};
use tern_agent::{Agent, AgentConfig, AgentError, Listen, Repository};
use tern_tests::{model_manifest, ModelEntry};

/// An agent serving on an ephemeral loopback port from its own runtime thread.
struct Running {
    addr: SocketAddr,
    unix: Option<PathBuf>,
    repo: Arc<Repository>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), AgentError>>>,
}

impl Running {
    fn start(dir: &Path, tweak: impl FnOnce(&mut AgentConfig)) -> Running {
        let mut config = AgentConfig {
            models: Some(dir.to_path_buf()),
            listen: Some(vec!["127.0.0.1:0".into()]),
            poll_interval_ms: Some(50),
            ..AgentConfig::default()
        };
        tweak(&mut config);
        let settings = config
            .settings(SessionOptions::new().threads(1).without_telemetry())
            .expect("settings");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let agent = Agent::bind(settings).await?;
                let _ = ready_tx.send((agent.addresses(), agent.repository().clone()));
                agent
                    .serve(async move {
                        let _ = stop_rx.await;
                    })
                    .await
            })
        });
        let (addresses, repo) = ready_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the agent starts");
        let addr = addresses
            .iter()
            .find_map(|a| match a {
                Listen::Tcp(a) => Some(*a),
                Listen::Unix(_) => None,
            })
            .expect("a TCP address");
        let unix = addresses.iter().find_map(|a| match a {
            Listen::Unix(p) => Some(p.clone()),
            Listen::Tcp(_) => None,
        });
        Running {
            addr,
            unix,
            repo,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the agent and waits for `serve` to return.
    fn stop(&mut self) -> Result<(), AgentError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().expect("the agent thread"),
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A status, headers we look at, and the body.
struct Reply {
    status: u16,
    header_length: Option<usize>,
    retry_after: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&self.body));
        })
    }
}

fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .new_agent()
}

fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut r = r.expect("an HTTP answer");
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let header_length = header(HEADER_LENGTH).and_then(|v| v.parse().ok());
    let retry_after = header("retry-after");
    let body = r
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .expect("body");
    Reply {
        status: r.status().as_u16(),
        header_length,
        retry_after,
        body,
    }
}

fn get(url: &str) -> Reply {
    reply(client().get(url).call())
}

fn post(url: &str, body: &[u8], header_length: Option<usize>) -> Reply {
    let mut req = client().post(url);
    if let Some(n) = header_length {
        req = req.header(HEADER_LENGTH, n.to_string());
    }
    reply(req.send(body))
}

fn entry(name: &str) -> ModelEntry {
    model_manifest()
        .into_iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("{name} in models/manifest.json"))
}

fn datatype(t: &Tensor) -> &'static str {
    match t.dtype() {
        tern::DType::F32 => "FP32",
        tern::DType::I32 => "INT32",
        tern::DType::I64 => "INT64",
        other => panic!("no test datatype for {other}"),
    }
}

/// An infer request for `inputs`: JSON data, or binary with every output binary too.
fn infer_body(inputs: &[(String, Tensor)], binary: bool) -> (Vec<u8>, Option<usize>) {
    let mut tail = Vec::new();
    let inputs: Vec<Value> = inputs
        .iter()
        .map(|(name, t)| {
            if binary {
                let bytes = t.as_bytes().expect("numeric");
                tail.extend_from_slice(bytes);
                json!({"name": name, "shape": t.shape(), "datatype": datatype(t),
                       "parameters": {"binary_data_size": bytes.len()}})
            } else {
                json!({"name": name, "shape": t.shape(), "datatype": datatype(t),
                       "data": t.json_data().expect("json")})
            }
        })
        .collect();
    let doc =
        json!({"id": "req-1", "inputs": inputs, "parameters": {"binary_data_output": binary}});
    let mut body = serde_json::to_vec(&doc).expect("json");
    let header_length = binary.then_some(body.len());
    body.extend_from_slice(&tail);
    (body, header_length)
}

/// The outputs of an infer reply as tern tensors.
fn outputs_of(reply: &Reply) -> (InferResponse, Outputs) {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let split = reply.header_length.unwrap_or(reply.body.len());
    let response: InferResponse =
        serde_json::from_slice(&reply.body[..split]).expect("infer response");
    let mut tail = &reply.body[split..];
    let mut pairs = Vec::new();
    for o in &response.outputs {
        let dtype = match o.datatype {
            tern_agent::protocol::Datatype::Fp32 => tern::DType::F32,
            other => panic!("unexpected output type {other:?}"),
        };
        let t = match &o.data {
            Some(data) => Tensor::from_json_data(dtype, &o.shape, data).expect("json data"),
            None => {
                let n = o.parameters["binary_data_size"].as_u64().expect("size") as usize;
                let (bytes, rest) = tail.split_at(n);
                tail = rest;
                Tensor::from_bytes(dtype, &o.shape, bytes).expect("binary data")
            }
        };
        pairs.push((o.name.clone(), t));
    }
    assert!(tail.is_empty(), "bytes left after the outputs");
    (response, Outputs::from_pairs(pairs))
}

/// The model names `POST /v2/repository/index` lists, in order.
fn listed(agent: &Running) -> Vec<String> {
    let index = post(&agent.url("/v2/repository/index"), b"{}", None).json();
    index
        .as_array()
        .expect("index")
        .iter()
        .filter_map(|e| e["name"].as_str().map(String::from))
        .collect()
}

/// Infers `model` on `reference`'s inputs (binary tensors); checks the version that
/// answered and the outputs against `reference`'s onnxruntime outputs.
fn answers_as(agent: &Running, model: &str, version: &str, reference: &str) {
    let e = entry(reference);
    let (body, header_length) = infer_body(&e.reference_inputs(), true);
    let url = agent.url(&format!("/v2/models/{model}/infer"));
    let (response, outputs) = outputs_of(&post(&url, &body, header_length));
    assert_eq!(response.model_version, version, "{model}");
    e.compare_with_reference(&outputs)
        .unwrap_or_else(|err| panic!("{model} v{version} against {reference}: {err}"));
}

/// A model directory: magika as a folder, the others as `NAME.onnx` files.
fn model_dir(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in names {
        let src = entry(name).dir().join("model.onnx");
        if *name == "magika" {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
            std::fs::copy(&src, dir.path().join(name).join("model.onnx")).expect("copy");
        } else {
            std::fs::copy(&src, dir.path().join(format!("{name}.onnx"))).expect("copy");
        }
    }
    dir
}

#[test]
fn serves_the_protocol_with_onnxruntimes_numbers() {
    let models = ["magika", "ppocr_cls", "ppocr_cls_int8_qdq"];
    let dir = model_dir(&models);
    let agent = Running::start(dir.path(), |_| {});

    let server = get(&agent.url("/v2")).json();
    assert_eq!(server["name"], "tern");
    assert!(server["extensions"]
        .as_array()
        .is_some_and(|e| e.contains(&json!("binary_tensor_data"))));
    assert_eq!(get(&agent.url("/v2/health/live")).status, 200);
    assert_eq!(get(&agent.url("/v2/health/ready")).status, 200);
    let listed = listed(&agent);
    assert_eq!(listed, models);

    let meta = get(&agent.url("/v2/models/magika")).json();
    assert_eq!(meta["inputs"][0]["name"], "bytes");
    assert_eq!(meta["inputs"][0]["datatype"], "INT32");
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 2048]));
    assert_eq!(meta["versions"], json!(["1"]));
    assert_eq!(get(&agent.url("/v2/models/magika/versions/1")).status, 200);
    assert_eq!(get(&agent.url("/v2/models/magika/ready")).status, 200);

    for name in models {
        let e = entry(name);
        for binary in [false, true] {
            let (body, header_length) = infer_body(&e.reference_inputs(), binary);
            let path = if binary {
                format!("/v2/models/{name}/versions/1/infer")
            } else {
                format!("/v2/models/{name}/infer")
            };
            let r = post(&agent.url(&path), &body, header_length);
            assert_eq!(r.header_length.is_some(), binary);
            let (response, outputs) = outputs_of(&r);
            assert_eq!(response.model_name, name);
            assert_eq!(response.model_version, "1");
            assert_eq!(response.id.as_deref(), Some("req-1"));
            e.compare_with_reference(&outputs)
                .unwrap_or_else(|err| panic!("{name} (binary {binary}): {err}"));
        }
    }

    let metrics = get(&agent.url("/metrics"));
    let text = String::from_utf8_lossy(&metrics.body);
    for name in models {
        assert!(
            text.contains(&format!(
                "tern_agent_requests_total{{model=\"{name}\",version=\"1\",outcome=\"ok\"}} 2"
            )),
            "{text}"
        );
    }
    assert!(text.contains("tern_agent_models 3"), "{text}");
}

#[test]
fn bad_requests_get_typed_http_errors() {
    let dir = model_dir(&["magika"]);
    let agent = Running::start(dir.path(), |c| c.max_body_bytes = Some(1 << 20));
    let infer = agent.url("/v2/models/magika/infer");
    let kind = |r: &Reply| r.json()["kind"].as_str().unwrap_or_default().to_string();
    let one = |input: Value| serde_json::to_vec(&json!({ "inputs": [input] })).expect("json");

    let r = post(&agent.url("/v2/models/nope/infer"), b"{}", None);
    assert_eq!((r.status, kind(&r).as_str()), (404, "model_not_found"));
    let r = get(&agent.url("/v2/models/magika/versions/7"));
    assert_eq!((r.status, kind(&r).as_str()), (404, "version_not_found"));
    let r = post(&infer, b"{\"inputs\": [", None);
    assert_eq!((r.status, kind(&r).as_str()), (400, "bad_request"));
    // Data that does not fill the shape, a shape the model does not take, the wrong type.
    let r = post(
        &infer,
        &one(json!({"name": "bytes", "shape": [1, 2048], "datatype": "INT32", "data": [1, 2]})),
        None,
    );
    assert_eq!((r.status, kind(&r).as_str()), (400, "bad_request"));
    let r = post(
        &infer,
        &one(json!({"name": "bytes", "shape": [1, 3], "datatype": "INT32", "data": [1, 2, 3]})),
        None,
    );
    assert_eq!((r.status, kind(&r).as_str()), (400, "shape_mismatch"));
    let r = post(
        &infer,
        &one(json!({"name": "bytes", "shape": [1, 1], "datatype": "FP32", "data": [1.5]})),
        None,
    );
    assert_eq!((r.status, kind(&r).as_str()), (400, "dtype_mismatch"));
    let r = post(
        &infer,
        &one(json!({"name": "other", "shape": [1], "datatype": "INT32", "data": [1]})),
        None,
    );
    assert_eq!(r.status, 400);
    // A binary part shorter than announced; a body over the limit (413, or, when the agent
    // closes the connection while the client is still sending, a reset).
    let (mut body, header_length) = infer_body(&entry("magika").reference_inputs(), true);
    body.truncate(body.len() - 3);
    let r = post(&infer, &body, header_length);
    assert_eq!((r.status, kind(&r).as_str()), (400, "bad_request"));
    let refused_as_too_large = |r: Result<ureq::http::Response<ureq::Body>, ureq::Error>| match r {
        Ok(r) => assert_eq!(r.status().as_u16(), 413),
        Err(ureq::Error::Io(e)) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        ),
        Err(e) => panic!("{e}"),
    };
    refused_as_too_large(client().post(&infer).send(&vec![b' '; 2 << 20][..]));
    // Without a Content-Length (chunked), the limit holds while reading: the answer is 413,
    // or, if the agent closed the connection while the client was still sending, a reset.
    refused_as_too_large(client().post(&infer).send(ureq::SendBody::from_reader(
        &mut std::io::repeat(b' ').take(2 << 20),
    )));
    assert_eq!(get(&agent.url("/v3/whatever")).status, 404);

    let text = String::from_utf8_lossy(&get(&agent.url("/metrics")).body).into_owned();
    assert!(
        text.contains(
            r#"tern_agent_requests_total{model="magika",version="1",outcome="bad_request"} 6"#
        ),
        "{text}"
    );
    // Still serving after all that.
    let (body, header_length) = infer_body(&entry("magika").reference_inputs(), false);
    assert_eq!(post(&infer, &body, header_length).status, 200);
}

/// Waits until `f` holds, for at most 20 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(20), "never: {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Writes a file whole (a temporary file renamed over it), as a deployment tool would.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[test]
fn hot_reload_swaps_versions_and_refuses_corrupt_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("m.onnx");
    let fp32 = std::fs::read(entry("ppocr_cls").dir().join("model.onnx")).expect("model");
    let int8 = std::fs::read(entry("ppocr_cls_int8_qdq").dir().join("model.onnx")).expect("model");
    std::fs::write(&file, &fp32).expect("write");
    let agent = Running::start(dir.path(), |_| {});
    let version = || get(&agent.url("/v2/models/m")).json()["versions"][0].clone();
    assert_eq!(version(), json!("1"));
    let old = agent.repo.get("m").expect("m served");
    let metrics = || String::from_utf8_lossy(&get(&agent.url("/metrics")).body).into_owned();

    // A corrupt file in place of the model: refused, version 1 keeps serving.
    replace(&file, b"\x08\x07 this is not an onnx model");
    eventually("the corrupt file is refused", || {
        metrics().contains(r#"tern_agent_model_loads_total{model="m",outcome="refused"} 1"#)
    });
    answers_as(&agent, "m", "1", "ppocr_cls");
    let cls = entry("ppocr_cls");
    let (body, header_length) = infer_body(&cls.reference_inputs(), true);

    // A new model: version 2, while a holder of version 1 still runs on it.
    replace(&file, &int8);
    eventually("version 2 is served", || version() == json!("2"));
    answers_as(&agent, "m", "2", "ppocr_cls_int8_qdq");
    assert_eq!(old.version, "1");
    let (still, _) = old
        .runner
        .run(cls.reference_inputs())
        .expect("the old version runs");
    cls.compare_with_reference(&still)
        .expect("the old version's numbers");
    assert_eq!(
        post(
            &agent.url("/v2/models/m/versions/1/infer"),
            &body,
            header_length
        )
        .status,
        404
    );

    // A corrupt new model beside it is refused and never listed; a removed one goes.
    std::fs::write(dir.path().join("bad.onnx"), b"garbage").expect("write");
    eventually("bad.onnx is refused", || {
        metrics().contains(r#"tern_agent_model_loads_total{model="bad",outcome="refused"} 1"#)
    });
    assert_eq!(get(&agent.url("/v2/models/bad")).status, 404);
    std::fs::remove_file(&file).expect("rm");
    eventually("m is removed", || {
        get(&agent.url("/v2/models/m")).status == 404
    });
}

/// A request that keeps the one run slot busy for a while: ppocr_cls on a line 200 times
/// its usual width.
fn slow_request() -> (Vec<u8>, Option<usize>) {
    let x = Tensor::zeros(tern::DType::F32, &[1, 3, 48, 192 * 200]).expect("tensor");
    infer_body(&[("x".to_string(), x)], true)
}

fn in_flight(agent: &Running) -> bool {
    String::from_utf8_lossy(&get(&agent.url("/metrics")).body).contains("tern_agent_in_flight 1")
}

#[test]
fn a_full_agent_answers_503_and_shutdown_drains_the_run_in_flight() {
    let dir = model_dir(&["ppocr_cls"]);
    let mut agent = Running::start(dir.path(), |c| {
        c.max_in_flight = Some(1);
        c.max_queued = Some(0);
    });
    let url = agent.url("/v2/models/ppocr_cls/infer");
    let (slow, slow_len) = slow_request();
    let (fast, fast_len) = infer_body(&entry("ppocr_cls").reference_inputs(), true);

    let busy = {
        let (url, slow) = (url.clone(), slow.clone());
        std::thread::spawn(move || post(&url, &slow, slow_len))
    };
    eventually("the slow request runs", || in_flight(&agent));
    let r = post(&url, &fast, fast_len);
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.retry_after.as_deref(), Some("1"));
    assert_eq!(r.json()["kind"], "overloaded");
    assert_eq!(busy.join().expect("client").status, 200);
    assert_eq!(post(&url, &fast, fast_len).status, 200);

    // Shutdown while a run is in flight: it completes, then the agent stops listening.
    let busy = {
        let (url, slow) = (url.clone(), slow.clone());
        std::thread::spawn(move || post(&url, &slow, slow_len))
    };
    eventually("the slow request runs", || in_flight(&agent));
    agent.stop().expect("a clean stop");
    assert_eq!(busy.join().expect("client").status, 200);
    assert!(std::net::TcpStream::connect(agent.addr).is_err());
}

#[test]
fn slow_clients_are_cut_off_and_unix_sockets_serve() {
    let dir = model_dir(&["magika"]);
    let socket = dir.path().join("agent.sock");
    let agent = Running::start(dir.path(), |c| {
        c.header_timeout_ms = Some(300);
        c.listen = Some(vec![
            "127.0.0.1:0".into(),
            format!("unix:{}", socket.display()),
        ]);
    });
    let read_all = |s: &mut dyn Read| {
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };

    // Headers that never end: the connection is closed.
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect(agent.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /v2 HTTP/1.1\r\nHost: a\r\n")
        .expect("write");
    let answer = read_all(&mut s);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        start.elapsed()
    );
    assert!(!answer.contains("200 OK"), "{answer}");

    // A body that never completes: 408.
    let mut s = std::net::TcpStream::connect(agent.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(
        b"POST /v2/models/magika/infer HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{\"inputs\"",
    )
    .expect("write");
    let answer = read_all(&mut s);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // The Unix socket speaks the same protocol.
    let path = agent.unix.clone().expect("a unix socket");
    assert_eq!(path, socket);
    let mut u = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    u.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    u.write_all(b"GET /v2/models/magika HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .expect("write");
    let answer = read_all(&mut u);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"name\":\"magika\""), "{answer}");
    drop(agent);
    assert!(!socket.exists(), "the socket file is removed at exit");
}

/// A store with ppocr_cls v1 (fp32) and v2 (the int8 model under the same name), signed by
/// a fresh key written to `dir/release.pub`.
fn store_with_two_versions(dir: &Path) -> (tern_bundle::ModelStore, tern_bundle::KeyPair) {
    use tern_bundle::{create, BundleSpec, KeyPair, ModelStore, StoreOptions, Trust};
    let pair = KeyPair::generate().expect("key");
    std::fs::write(
        dir.join("release.pub"),
        serde_json::to_vec(&pair.public().to_json()).expect("json"),
    )
    .expect("write key");
    let store = ModelStore::open(
        dir.join("store"),
        Trust::new([pair.public()], 1).expect("trust"),
        StoreOptions::default(),
    )
    .expect("store");
    let samples = vec![entry("ppocr_cls").reference_inputs()];
    for (version, model) in [(1, "ppocr_cls"), (2, "ppocr_cls_int8_qdq")] {
        let mut bundle = create(
            std::fs::read(entry(model).dir().join("model.onnx")).expect("model"),
            &BundleSpec::new("ppocr_cls", version),
            &samples,
            SessionOptions::new().threads(1).without_telemetry(),
        )
        .expect("bundle");
        bundle.sign(&pair).expect("sign");
        let file = dir.join(format!("v{version}.tern"));
        bundle.write(&file).expect("write bundle");
        store.install_file(&file).expect("install");
        store.activate("ppocr_cls", version).expect("activate");
    }
    (store, pair)
}

#[test]
fn a_store_serves_its_active_version_and_a_crash_looping_one_is_rolled_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = store_with_two_versions(dir.path());
    // Two loads of version 2 that never finished: what the process dying twice while
    // loading it (kill -9 during the swap) leaves in the store.
    for _ in 0..2 {
        drop(store.begin_load("ppocr_cls").expect("begin load"));
    }
    let store_dir = dir.path().join("store");
    let agent = Running::start(dir.path(), |c| {
        c.models = None;
        c.store_dir = Some(store_dir.clone());
        c.trust = Some(vec![dir.path().join("release.pub")]);
    });
    let meta = get(&agent.url("/v2/models/ppocr_cls")).json();
    assert_eq!(meta["versions"], json!(["1"]), "{meta}");
    answers_as(&agent, "ppocr_cls", "1", "ppocr_cls");
    let state = &store.status().expect("status")["ppocr_cls"];
    assert!(state.quarantined.contains_key(&2), "{state:?}");
    assert_eq!(state.active, Some(1));
}

#[test]
fn a_version_activated_in_the_store_is_served_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = store_with_two_versions(dir.path());
    store.rollback("ppocr_cls").expect("back to 1");
    let store_dir = dir.path().join("store");
    let agent = Running::start(dir.path(), |c| {
        c.models = None;
        c.store_dir = Some(store_dir.clone());
        c.trust = Some(vec![dir.path().join("release.pub")]);
    });
    let version = || get(&agent.url("/v2/models/ppocr_cls")).json()["versions"][0].clone();
    assert_eq!(version(), json!("1"));
    let old = agent.repo.get("ppocr_cls").expect("served");
    store.activate("ppocr_cls", 2).expect("activate 2");
    eventually("version 2 is served", || version() == json!("2"));
    // ppocr_cls_int8_qdq's references, under the store's name.
    answers_as(&agent, "ppocr_cls", "2", "ppocr_cls_int8_qdq");
    assert_eq!(old.version, "1");
}

#[test]
fn batched_models_and_flows_serve_under_the_same_routes() {
    let dir = model_dir(&["ppocr_cls", "ppocr_cls_int8_qdq"]);
    let out = "save_infer_model/scale_0.tmp_1";
    std::fs::write(
        dir.path().join("flows.toml"),
        format!(
            r#"
[sessions.int8]
model = "ppocr_cls_int8_qdq.onnx"
[sessions.fp32]
model = "ppocr_cls.onnx"
[steps.small]
session = "int8"
[caches.shared]
ttl_ms = 60000
[steps.big]
session = "fp32"
cache = "shared"
breaker = {{ failures = 5, window_ms = 30000, cooldown_ms = 10000 }}
[flows.cheap_first]
cascade = [{{ step = "small", exit = {{ output = "{out}", confidence = "max_probability", threshold = 0.0 }} }}, {{ step = "big" }}]
[flows.never_confident]
cascade = [{{ step = "small", exit = {{ output = "{out}", confidence = "max_probability", threshold = 1.5 }} }}, {{ step = "big" }}]
"#
        ),
    )
    .expect("flow file");
    let flows = dir.path().join("flows.toml");
    let agent = Running::start(dir.path(), |c| {
        c.batch_max = Some(4);
        c.batch_wait_ms = Some(20);
        c.max_in_flight = Some(4);
        c.flows = Some(flows.clone());
    });

    // Concurrent requests through the batcher: each gets its own answer.
    let cls = entry("ppocr_cls");
    let (body, header_length) = infer_body(&cls.reference_inputs(), true);
    let url = agent.url("/v2/models/ppocr_cls/infer");
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            std::thread::spawn(move || post(&url, &body, header_length))
        })
        .collect();
    for c in clients {
        let (_, outputs) = outputs_of(&c.join().expect("client"));
        cls.compare_with_reference(&outputs)
            .expect("a batched answer");
    }

    // Flows are models too: the cascade says who answered.
    let listed = listed(&agent);
    assert_eq!(
        listed,
        [
            "cheap_first",
            "never_confident",
            "ppocr_cls",
            "ppocr_cls_int8_qdq"
        ]
    );
    for (flow, step, reference) in [
        ("cheap_first", "small:model", "ppocr_cls_int8_qdq"),
        ("never_confident", "big:model", "ppocr_cls"),
    ] {
        let r = post(
            &agent.url(&format!("/v2/models/{flow}/infer")),
            &body,
            header_length,
        );
        let (response, outputs) = outputs_of(&r);
        assert_eq!(response.parameters["answered_by"], json!([step]), "{flow}");
        entry(reference)
            .compare_with_reference(&outputs)
            .unwrap_or_else(|e| panic!("{flow}: {e}"));
    }
    let r = post(
        &agent.url("/v2/models/cheap_first/infer"),
        b"{\"inputs\": []}",
        None,
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
}
