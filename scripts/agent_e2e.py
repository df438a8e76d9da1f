"""`tern agent` end to end, with a real third-party client, under load and faults.

    agent_e2e.py TERN_BINARY [--clients 4] [--requests 200] [--report FILE]

Starts `tern agent` on a model directory (magika, ppocr_cls, ppocr_cls_int8_qdq) and
speaks to it with tritonclient[http] (Triton's own client, the Open Inference Protocol):
lists, describes and infers (binary and JSON tensors), results against onnxruntime run
here on the same inputs. Then:
- load: CLIENTS threads, each with its own client, send REQUESTS requests in all to
  magika and to ppocr_cls; throughput, p50/p99, errors, the agent's RSS after warm-up, in the
  middle of the run and at the end (the second half must not grow). The same requests go to onnxruntime behind a ThreadingHTTPServer speaking
  the same protocol (`OrtServer` below, about as simple as the agent's request path);
- observability: a real Prometheus server (Debian's package, when installed) scrapes
  /metrics and has the agent's counts;
- telemetry: spans of every request uploaded as OTLP/HTTP JSON to a local collector (which
  refuses the first request), each body parsed strictly with opentelemetry-proto;
- a model store kept up to date from a TUF repository over HTTP: v1 pulled and served,
  v2 published and served without a restart;
- faults: malformed JSON, wrong shapes, an oversized body, a client that stops sending,
  a corrupt model dropped into the directory (refused, logged; the old version serves),
  kill -9 while a new version loads (the restarted agent serves a good version), SIGTERM
  (exit 0, socket removed), a full disk under the telemetry buffer (requests still served).
The last line is one summary: `agent-e2e: N steps passed, M failed`.
"""

import argparse
import atexit
import http.client
import http.server
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import numpy as np
import onnxruntime as ort
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from e2e_steps import check, finish  # noqa: E402
from tern_paths import CACHE, ROOT  # noqa: E402

MODELS = ["magika", "ppocr_cls", "ppocr_cls_int8_qdq"]
STARTED = []  # every agent process, killed at exit whatever happens


@atexit.register
def _kill_agents():
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()


def manifest():
    entries = json.loads((CACHE / "models" / "manifest.json").read_text())
    return {e["name"]: e for e in entries}


def ref_inputs(entry):
    d = CACHE / "models" / entry["name"] / "ref"
    return {n: np.load(d / f"input.{n}.npy") for n in entry["inputs"]}


def datatype(a):
    return {"float32": "FP32", "int32": "INT32", "int64": "INT64"}[str(a.dtype)]


def rss_kb(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Agent:
    """A `tern agent` process on an ephemeral port."""

    def __init__(self, tern, models, *extra, models_flag=True):
        self.sock = models / "agent.sock"
        source = ["--models", str(models)] if models_flag else []
        self.proc = subprocess.Popen(
            [tern, "agent", *source, "--listen", "127.0.0.1:0",
             "--listen", f"unix:{self.sock}", "--poll-interval-ms", "200",
             "--header-timeout-ms", "2000", *extra],
            stdout=subprocess.PIPE, stderr=open(models.parent / "agent.log", "ab"), text=True)
        STARTED.append(self.proc)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"tern agent did not start: {(models.parent / 'agent.log').read_text()[-2000:]}")
        self.addr = json.loads(line)["listening"][0]

    def client(self):
        return th.InferenceServerClient(self.addr, network_timeout=120.0, connection_timeout=30.0)

    def raw(self, method, path, body=b"", headers=None):
        host, port = self.addr.rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            c.close()

    def metrics(self):
        return self.raw("GET", "/metrics")[2].decode()

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, no log line per request, and TCP_NODELAY: headers and body are
    separate writes, and without it Nagle's algorithm and the client's delayed ACK add
    40 ms to every answer."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass


class Collector:
    """An OTLP/HTTP receiver: keeps every request body by signal. It answers 503 to the
    first request (a collector down), so the agent's retry is exercised too."""

    def __init__(self):
        self.bodies, self.refused = [], 0
        outer = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.refused == 0:
                    outer.refused += 1
                    self.send_response(503)
                else:
                    outer.bodies.append((self.path.rsplit("/", 1)[-1], body))
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


class OrtServer:
    """onnxruntime behind http.server's ThreadingHTTPServer, speaking the Open Inference
    Protocol's infer route with binary inputs and outputs: what the agent does for a
    request, in Python, with one session per model shared by the request threads."""

    def __init__(self, models):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        sessions = {
            name: ort.InferenceSession(str(CACHE / "models" / name / "model.onnx"), opts,
                                       providers=["CPUExecutionProvider"])
            for name in models
        }
        np_types = {"FP32": np.float32, "INT32": np.int32, "INT64": np.int64}

        class Handler(QuietHandler):
            def do_POST(self):
                name = self.path.split("/")[3]
                body = self.rfile.read(int(self.headers["Content-Length"]))
                n = int(self.headers.get("Inference-Header-Content-Length", len(body)))
                req, tail = json.loads(body[:n]), memoryview(body)[n:]
                feeds = {}
                for i in req["inputs"]:
                    size = i["parameters"]["binary_data_size"]
                    feeds[i["name"]] = np.frombuffer(tail[:size], np_types[i["datatype"]]).reshape(i["shape"])
                    tail = tail[size:]
                s = sessions[name]
                outs = s.run(None, feeds)
                meta, blobs = [], []
                for o, v in zip(s.get_outputs(), outs):
                    b = np.ascontiguousarray(v).tobytes()
                    meta.append({"name": o.name, "datatype": "FP32", "shape": list(v.shape),
                                 "parameters": {"binary_data_size": len(b)}})
                    blobs.append(b)
                head = json.dumps({"model_name": name, "model_version": "1", "outputs": meta}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Inference-Header-Content-Length", str(len(head)))
                self.send_header("Content-Length", str(len(head) + sum(map(len, blobs))))
                self.end_headers()
                self.wfile.write(head + b"".join(blobs))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def client(self):
        return th.InferenceServerClient(self.addr, network_timeout=120.0, connection_timeout=30.0)

    def close(self):
        self.server.shutdown()


def load(server, model, inputs, clients, requests, pid=None):
    """CLIENTS threads send REQUESTS infer requests in all; latencies, errors, RSS."""
    per = max(1, requests // clients)
    # Enough warm-up runs for the session's first-runs decisions (thread pool, per-shape
    # plans: 12 runs) to be behind it: RSS is then compared from there to the end.
    warm = max(10, per // 5)
    lat, errors, rss = [], [], {}
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker():
        c = server.client()
        ins = []
        for n, a in inputs.items():
            i = th.InferInput(n, a.shape, datatype(a))
            i.set_data_from_numpy(a)
            ins.append(i)
        for _ in range(warm):
            c.infer(model, ins)
        barrier.wait()
        mine = []
        for _ in range(per):
            t = time.perf_counter()
            try:
                c.infer(model, ins)
                mine.append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 - every failure is counted
                with lock:
                    errors.append(repr(e))
        with lock:
            lat.extend(mine)
        c.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    samples, running = [], threading.Event()
    running.set()

    def sampler():
        while running.is_set():
            samples.append(rss_kb(pid))
            time.sleep(0.05)

    if pid:
        rss["after_warmup_kb"] = rss_kb(pid)
        watcher = threading.Thread(target=sampler)
        watcher.start()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if pid:
        running.clear()
        watcher.join()
        rss["end_kb"] = rss_kb(pid)
        rss["mid_kb"] = samples[len(samples) // 2] if samples else rss["end_kb"]
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else float("nan")  # noqa: E731
    return {"model": model, "clients": clients, "requests": per * clients,
            "throughput_rps": len(lat) / wall, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "errors": len(errors), "first_error": errors[0] if errors else None, **rss}


def scrape(agent, work):
    """A real Prometheus server scrapes /metrics: the agent's counters arrive as its own
    /metrics says, the latency histogram is queryable."""
    print("== prometheus")
    prom = shutil.which("prometheus")
    if not prom:
        print("  skip prometheus not installed")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = work / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: tern\n    static_configs:\n      - targets: ['{agent.addr}']\n")
    p = subprocess.Popen([prom, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{port}"],
                         stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "wb"))

    def query(q):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            c.request("GET", "/api/v1/query?" + urllib.parse.urlencode({"query": q}))
            return json.loads(c.getresponse().read())["data"]["result"]
        except (OSError, KeyError, ValueError):
            return []
        finally:
            c.close()

    try:
        want = [line for line in agent.metrics().splitlines()
                if line.startswith('tern_agent_requests_total{model="ppocr_cls",version="1",outcome="ok"}')]
        want = float(want[0].split()[-1]) if want else -1
        got, deadline = [], time.time() + 60
        q = 'tern_agent_requests_total{model="ppocr_cls",version="1",outcome="ok"}'
        while time.time() < deadline:
            got = query(q)
            if got:
                break
            time.sleep(0.5)
        up = query('up{job="tern"}')
        check("prometheus scrapes the agent (up == 1)", up and up[0]["value"][1] == "1", up)
        value = float(got[0]["value"][1]) if got else None
        check(f"prometheus has the agent's request count ({value} == {want})", value == want, got)
        p99 = query('histogram_quantile(0.99, tern_agent_request_duration_seconds_bucket{model="ppocr_cls"})')
        p99 = float(p99[0]["value"][1]) if p99 else float("nan")
        check(f"the latency histogram is queryable (p99 since start {p99 * 1e3:.1f} ms)", 0 < p99 < 10, p99)
    finally:
        p.terminate()
        p.wait(timeout=30)


def store_updates(tern, work, entries):
    """The agent on a model store kept up to date from a TUF update repository over HTTP
    (scripts/e2e_deploy.py --prepare builds its steps: magika v1, then v2)."""
    print("== a model store updated from a repository over HTTP")
    life = work / "lifecycle"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "e2e_deploy.py"), tern, "--prepare", str(life)],
                   check=True, capture_output=True)
    served = work / "repo"
    shutil.copytree(life / "steps" / "1", served)

    # Python's static file server as e2e_deploy.py uses it (HTTP/1.0, one request per
    # connection), quiet.
    class Static(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(served), **k)

        def log_message(self, *args):
            pass

    repo = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Static)
    threading.Thread(target=repo.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{repo.server_address[1]}"
    models = work / "empty"
    models.mkdir()
    agent = Agent(tern, models, "--store-dir", str(work / "store"), "--trust", str(life / "release.key.pub"),
                  "--update-url", url, "--update-root", str(life / "root.json"), "--update-model", "magika",
                  "--update-interval-ms", "300", models_flag=False)

    def version():
        status, _, body = agent.raw("GET", "/v2/models/magika")
        return json.loads(body)["versions"][0] if status == 200 else None

    def wait_for(v):
        deadline = time.time() + 60
        while time.time() < deadline and version() != v:
            time.sleep(0.2)
        return version()

    check("version 1 pulled, verified, golden-checked and served", wait_for("1") == "1", version())
    feeds = ref_inputs(entries["magika"])
    c = agent.client()
    i = th.InferInput("bytes", feeds["bytes"].shape, "INT32")
    i.set_data_from_numpy(feeds["bytes"])
    want = ort.InferenceSession(str(CACHE / "models" / "magika" / "model.onnx"),
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    r = c.infer("magika", [i])
    check("it answers as onnxruntime does", np.allclose(r.as_numpy("target_label"), want, atol=1e-4, rtol=1e-3))
    # Published within the same second as version 1's files were written, as fast as a
    # publisher can: the fetcher must not trust a one-second Last-Modified from then.
    shutil.rmtree(served)
    shutil.copytree(life / "steps" / "2", served, copy_function=shutil.copy)
    log = lambda: "\n".join((work / "agent.log").read_text().splitlines()[-5:])  # noqa: E731
    check("version 2 published: pulled and served without a restart", wait_for("2") == "2", log())
    text = agent.metrics()
    check("the update checks are counted",
          'tern_agent_model_updates_total{model="magika",outcome="installed"} 2' in text)
    c.close()
    check("SIGTERM with the updater running: exit 0", agent.stop() == 0)
    repo.shutdown()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("tern")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--report", type=pathlib.Path, default=ROOT / "target" / "tern-reports" / "agent.json")
    args = p.parse_args()
    entries = manifest()
    work = pathlib.Path(tempfile.mkdtemp(prefix="tern-agent-e2e-"))
    models = work / "models"
    models.mkdir()
    (models / "magika").mkdir()
    shutil.copy(CACHE / "models" / "magika" / "model.onnx", models / "magika" / "model.onnx")
    for name in MODELS[1:]:
        shutil.copy(CACHE / "models" / name / "model.onnx", models / f"{name}.onnx")
    report = {"load": []}

    print("== tritonclient against tern agent")
    collector = Collector()
    agent = Agent(args.tern, models, "--telemetry-dir", str(work / "telemetry"),
                  "--otlp-url", collector.url, "--telemetry-upload-interval-ms", "500")
    c = agent.client()
    check("live and ready", c.is_server_live() and c.is_server_ready())
    meta = c.get_server_metadata()
    check("server metadata", meta["name"] == "tern" and "binary_tensor_data" in meta["extensions"], meta)
    index = c.get_model_repository_index()
    check("the repository index lists every model", sorted(m["name"] for m in index) == MODELS, index)
    for name in MODELS:
        s = ort.InferenceSession(str(CACHE / "models" / name / "model.onnx"), providers=["CPUExecutionProvider"])
        m = c.get_model_metadata(name)
        same = [i["name"] for i in m["inputs"]] == [i.name for i in s.get_inputs()] and \
               [o["name"] for o in m["outputs"]] == [o.name for o in s.get_outputs()]
        check(f"{name}: metadata names onnxruntime's inputs and outputs", same and c.is_model_ready(name), m)
        e = entries[name]
        feeds = ref_inputs(e)
        want = s.run(None, feeds)
        for binary in (True, False):
            ins = []
            for n, a in feeds.items():
                i = th.InferInput(n, a.shape, datatype(a))
                i.set_data_from_numpy(a, binary_data=binary)
                ins.append(i)
            outs = [th.InferRequestedOutput(o.name, binary_data=binary) for o in s.get_outputs()]
            r = c.infer(name, ins, outputs=outs, request_id="e2e")
            worst = max(float(np.max(np.abs(r.as_numpy(o.name) - w))) for o, w in zip(s.get_outputs(), want))
            ok = all(np.allclose(r.as_numpy(o.name), w, atol=e["atol"], rtol=e["rtol"])
                     for o, w in zip(s.get_outputs(), want))
            check(f"{name}: {'binary' if binary else 'JSON'} infer equals onnxruntime's "
                  f"(max |diff| {worst:.2e}, atol {e['atol']}, rtol {e['rtol']})", ok)

    print("== telemetry to an OTLP collector")
    deadline = time.time() + 60
    while time.time() < deadline and not any(k == "traces" for k, _ in collector.bodies):
        time.sleep(0.25)
    files = []
    for n, (kind, body) in enumerate(collector.bodies):
        f = work / f"{kind}-{n}.json"
        f.write_bytes(body)
        files.append(str(f))
    check(f"spans uploaded after the collector's 503 ({len(files)} requests)",
          collector.refused == 1 and any("traces" in f for f in files))
    if files:
        v = subprocess.run([sys.executable, str(ROOT / "scripts" / "validate_otlp.py"), *files],
                           capture_output=True, text=True)
        check(f"every upload parses as OTLP (opentelemetry-proto): {v.stdout.strip()}", v.returncode == 0,
              v.stderr[-500:])
        spans = b"".join(b for k, b in collector.bodies if k == "traces")
        check("the spans name the models served", all(m.encode() in spans for m in MODELS))
    collector.close()

    print("== bad requests")
    status, _, body = agent.raw("POST", "/v2/models/magika/infer", b"{not json")
    check("malformed JSON: 400", status == 400, body)
    try:
        i = th.InferInput("bytes", [1, 7], "INT32")
        i.set_data_from_numpy(np.zeros((1, 7), np.int32))
        c.infer("magika", [i])
        check("wrong shape refused", False)
    except InferenceServerException as e:
        check("wrong shape: a typed error through tritonclient", "shape" in str(e).lower(), e)
    port = int(agent.addr.rsplit(":", 1)[1])
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(f"POST /v2/models/magika/infer HTTP/1.1\r\nHost: a\r\nContent-Length: {128 << 20}\r\n\r\n".encode())
        answer = s.recv(4096).decode(errors="replace")
        s.close()
        check("a body over the limit: 413 before it is sent", answer.startswith("HTTP/1.1 413"), answer[:80])
    except OSError as e:
        check("a body over the limit: 413", False, e)
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"POST /v2/models/magika/infer HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{")
    answer = s.recv(4096).decode(errors="replace")
    s.close()
    check(f"a client that stops sending: 408 after {time.perf_counter() - t0:.1f} s",
          answer.startswith("HTTP/1.1 408"), answer[:80])
    c.close()

    print("== load")
    ort_server = OrtServer(["magika", "ppocr_cls"])
    for name in ["magika", "ppocr_cls"]:
        feeds = ref_inputs(entries[name])
        row = load(agent, name, feeds, args.clients, args.requests, pid=agent.proc.pid)
        rival = load(ort_server, name, feeds, args.clients, args.requests)
        row["onnxruntime_http"] = {k: rival[k] for k in ("throughput_rps", "p50_ms", "p99_ms", "errors")}
        report["load"].append(row)
        # A leak grows with the requests served; the allocator settling does not. So the
        # second half of the run is compared: RSS at its middle against RSS at the end.
        growth = (row["end_kb"] - row["mid_kb"]) / max(1, row["mid_kb"])
        print(f"  {name}: {row['requests']} requests, {args.clients} clients: tern agent "
              f"{row['throughput_rps']:.0f} req/s p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms; "
              f"onnxruntime+http.server {rival['throughput_rps']:.0f} req/s p50 {rival['p50_ms']:.2f} ms "
              f"p99 {rival['p99_ms']:.2f} ms; agent RSS {row['after_warmup_kb'] // 1024} -> {row['mid_kb'] // 1024} "
              f"-> {row['end_kb'] // 1024} MB (after warm-up, middle, end)")
        check(f"{name} under load: no error", row["errors"] == 0, row["first_error"])
        check(f"{name} under load: RSS flat over the second half ({growth * 100:+.1f} %, at most +5 %)", growth <= 0.05)
    ort_server.close()
    scrape(agent, work)

    print("== model directory faults")
    (models / "broken.onnx").write_bytes(b"\x08\x07 not a model")
    target = models / "ppocr_cls.onnx"
    tmp = models / ".ppocr_cls.partial"
    tmp.write_bytes(b"garbage" * 1000)
    os.replace(tmp, target)
    deadline = time.time() + 30
    while time.time() < deadline and 'model="ppocr_cls",outcome="refused"' not in agent.metrics():
        time.sleep(0.1)
    text = agent.metrics()
    check("a corrupt replacement is refused", 'model="ppocr_cls",outcome="refused"} 1' in text)
    check("a corrupt new model is refused", 'model="broken",outcome="refused"} 1' in text)
    c = agent.client()
    feeds = ref_inputs(entries["ppocr_cls"])
    i = th.InferInput("x", feeds["x"].shape, "FP32")
    i.set_data_from_numpy(feeds["x"])
    r = c.infer("ppocr_cls", [i])
    check("the old version keeps serving", r.get_response()["model_version"] == "1")
    check("the broken model is not listed", "broken" not in [m["name"] for m in c.get_model_repository_index()])
    c.close()

    # kill -9 while the new version loads; the restarted agent serves a good version.
    good = CACHE / "models" / "ppocr_cls_int8_qdq" / "model.onnx"
    shutil.copy(good, tmp)
    os.replace(tmp, target)
    time.sleep(0.25)
    agent.stop(signal.SIGKILL)
    (models / "broken.onnx").unlink()
    agent = Agent(args.tern, models)
    c = agent.client()
    r = c.infer("ppocr_cls", [i])
    want = ort.InferenceSession(str(good), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    e = entries["ppocr_cls_int8_qdq"]
    check("after kill -9 mid-swap the restarted agent serves the complete new version",
          np.allclose(r.as_numpy(r.get_response()["outputs"][0]["name"]), want, atol=e["atol"], rtol=e["rtol"]))
    c.close()
    code = agent.stop()
    check("SIGTERM: exit 0, the socket removed", code == 0 and not agent.sock.exists(), code)

    print("== telemetry on a full disk")
    full = work / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)],
                             capture_output=True).returncode == 0
    if mounted:
        try:
            agent = Agent(args.tern, models, "--telemetry-dir", str(full / "telemetry"))
            fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)
            c = agent.client()
            codes = []
            for _ in range(50):
                try:
                    c.infer("ppocr_cls", [i])
                    codes.append(200)
                except InferenceServerException as e:
                    codes.append(str(e))
            c.close()
            dropped = [line for line in agent.metrics().splitlines()
                       if line.startswith("tern_agent_telemetry_dropped_records ")]
            check(f"a full telemetry disk: 50 requests answered ({dropped[0] if dropped else 'no gauge'})",
                  codes == [200] * 50 and agent.proc.poll() is None, codes[:3])
            check("a full telemetry disk: SIGTERM still exits 0", agent.stop() == 0)
        finally:
            subprocess.run(["umount", str(full)], capture_output=True)
    else:
        print("  skip cannot mount a small tmpfs here")

    store_updates(args.tern, work, entries)

    print("== packaging")
    analyze = shutil.which("systemd-analyze")
    if analyze:
        # The unit as installed, its ExecStart pointed at this binary.
        unit = work / "tern-agent.service"
        unit.write_text((ROOT / "packaging" / "tern-agent.service").read_text()
                        .replace("/usr/bin/tern", str(pathlib.Path(args.tern).resolve())))
        v = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
        check("the systemd unit verifies", v.returncode == 0, v.stderr[-500:])
        sec = subprocess.run([analyze, "security", "--offline=yes", str(unit)], capture_output=True, text=True)
        level = [line for line in sec.stdout.splitlines() if "Overall exposure level" in line]
        exposure = float(level[0].split(":")[1].split()[0]) if level else 99.0
        check(f"the systemd unit's sandbox: exposure {exposure} (at most 2.0)", exposure <= 2.0, sec.stderr[-300:])
    else:
        print("  skip systemd-analyze not installed")

    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    finish("agent-e2e")


if __name__ == "__main__":
    main()
