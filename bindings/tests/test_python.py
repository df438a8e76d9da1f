"""End-to-end test of the UniFFI Python bindings against the real Rust library: a real model
(magika) compared with onnxruntime's outputs, errors as exceptions, async runs, telemetry
uploaded through a Python uploader, micro-batching from Python threads, and a stateful model
(silero VAD) streamed over real speech against onnxruntime.

usage: test_python.py CASE_DIR MODEL_PATH [LIFECYCLE_DIR]
(LIFECYCLE_DIR: scripts/e2e_deploy.py --prepare's output, for the model store tests)

It imports `tern` as a user would: scripts/test-bindings runs it with the interpreter of a
fresh virtualenv into which the wheel (bindings/pyproject.toml) was installed, never against
the build tree.
"""
import asyncio
import json
import threading
import struct
import sys
import tempfile
import unittest
from pathlib import Path

CASE, MODEL = sys.argv[1], sys.argv[2]
LIFECYCLE = sys.argv[3] if len(sys.argv) > 3 else None

import tern  # noqa: E402


def case():
    d = Path(CASE)
    n, width, classes = map(int, (d / "shape.txt").read_text().split())
    x = (d / "input.bin").read_bytes()
    y = struct.unpack(f"<{n * classes}f", (d / "expected.bin").read_bytes())
    return n, width, classes, x, y


def session(**kw):
    model = tern.TernModel.from_path(MODEL)
    config = tern.SessionConfig(backend=tern.Backend.CPU, threads=kw.get("threads", 1), telemetry=kw.get("telemetry", False),
                                thread_policy=kw.get("thread_policy"), shape_policy=kw.get("shape_policy"),
                                nan_policy=tern.NanPolicy.REJECT)
    return model, tern.TernSession(model, config)


class Bindings(unittest.TestCase):
    def test_real_model_matches_onnxruntime(self):
        n, width, classes, x, y = case()
        model, s = session()
        info = model.info()
        self.assertEqual([i.name for i in info.inputs], ["bytes"])
        self.assertEqual(info.inputs[0].shape, ["unk__214", "2048"])
        out = s.run([tern.TensorData(name="bytes", dtype=tern.DType.I32, shape=[n, width], data=x)])
        self.assertEqual(out[0].name, "target_label")
        self.assertEqual(out[0].shape, [n, classes])
        got = tern.tensor_to_f32(out[0])
        worst = max(abs(a - b) for a, b in zip(got, y))
        self.assertLess(worst, 1e-4, f"max abs diff {worst}")

    def test_every_thread_and_shape_policy_gives_the_same_answers(self):
        # The first 12 runs of a measuring session time its pool against one thread, and
        # (magika's batch is symbolic) a concrete plan against the symbolic one.
        n, width, _, x, y = case()
        for threads, shapes in ((tern.ThreadPolicy.MEASURE, tern.ShapePolicy.MEASURE),
                                (tern.ThreadPolicy.ALWAYS, tern.ShapePolicy.SYMBOLIC),
                                (tern.ThreadPolicy.MEASURE, tern.ShapePolicy.PER_SHAPE)):
            _, s = session(threads=2, thread_policy=threads, shape_policy=shapes)
            self.assertEqual(s.backend().backend, tern.Backend.CPU)
            for _ in range(13):
                out = s.run([tern.TensorData(name="bytes", dtype=tern.DType.I32, shape=[n, width], data=x)])
                worst = max(abs(a - b) for a, b in zip(tern.tensor_to_f32(out[0]), y))
                self.assertLess(worst, 1e-4, f"{threads} {shapes}: max abs diff {worst}")

    def test_async_run(self):
        n, width, _, x, y = case()
        _, s = session()
        out = asyncio.run(s.run_async([tern.TensorData(name="bytes", dtype=tern.DType.I32, shape=[n, width], data=x)]))
        self.assertLess(max(abs(a - b) for a, b in zip(tern.tensor_to_f32(out[0]), y)), 1e-4)

    def test_errors_are_typed_exceptions(self):
        _, s = session()
        with self.assertRaises(tern.TernError.InvalidInput) as e:
            s.run([tern.tensor_i32("bytes", [1, 7], [0] * 7)])
        self.assertEqual(e.exception.kind, tern.ErrorKind.SHAPE_MISMATCH)
        with self.assertRaises(tern.TernError.InvalidInput) as e:
            s.run([tern.tensor_f32("bytes", [1, 2048], [0.0] * 2048)])
        self.assertEqual(e.exception.kind, tern.ErrorKind.DTYPE_MISMATCH)
        with self.assertRaises(tern.TernError.InvalidInput) as e:
            s.run([tern.TensorData(name="bytes", dtype=tern.DType.I32, shape=[1, 2048], data=b"\x00" * 5)])
        self.assertEqual(e.exception.kind, tern.ErrorKind.TENSOR)
        with self.assertRaises(tern.TernError.InvalidModel):
            tern.TernModel.from_bytes(b"not a model")
        with self.assertRaises(tern.TernError.Io):
            tern.TernModel.from_path("/nonexistent/model.onnx")
        with self.assertRaises(tern.TernError.InvalidOption) as e:
            tern.TernSession(tern.TernModel.from_path(MODEL), tern.SessionConfig(backend=tern.Backend.GPU, threads=1, telemetry=False))
        self.assertEqual(e.exception.kind, tern.ErrorKind.BACKEND_UNAVAILABLE)

    def test_telemetry_uploads_through_a_python_uploader(self):
        class Collector(tern.TelemetryUploader):
            def __init__(self):
                self.batches = []

            def upload(self, batch):
                self.batches.append(batch)
                return tern.UploadResult.ACCEPTED()

        with tempfile.TemporaryDirectory() as d:
            t = tern.init_telemetry(d, tern.TelemetryConfig(max_bytes=1 << 20, max_age_seconds=3600, health_sample_rate=1.0, min_upload_interval_seconds=1, service_name="python-test"))
            n, width, _, x, _ = case()
            _, s = session(telemetry=True)
            for _ in range(3):
                s.run([tern.TensorData(name="bytes", dtype=tern.DType.I32, shape=[n, width], data=x)])
            t.counter("app.files_scanned", 3, {"screen": "test"})
            t.flush()
            collector = Collector()
            report = t.upload_pending(collector)
            self.assertGreaterEqual(report.batches_accepted, 1)
            payloads = {p.signal: json.loads(p.json) for b in collector.batches for p in b.payloads}
            spans = payloads[tern.Signal.TRACES]["resourceSpans"][0]["scopeSpans"][0]["spans"]
            self.assertEqual(sum(1 for sp in spans if sp["name"] == "tern.run"), 3)
            self.assertIn("app.files_scanned", json.dumps(payloads[tern.Signal.METRICS]))
            self.assertEqual(t.stats().pending_batches, 0)

    def test_batcher_coalesces_python_threads(self):
        n, width, classes, x, y = case()
        _, s = session()
        batcher = tern.TernBatcher(s, tern.BatchConfig(max_batch=8, max_wait_ms=50.0, queue_capacity=64, eager=False))
        row = width * 4
        results = [None] * 8

        def call(i):
            r = i % n
            out = batcher.run([tern.TensorData(name="bytes", dtype=tern.DType.I32, shape=[1, width], data=x[r * row:(r + 1) * row])])
            results[i] = (r, tern.tensor_to_f32(out[0]))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r, got in results:
            want = y[r * classes:(r + 1) * classes]
            self.assertLess(max(abs(a - b) for a, b in zip(got, want)), 1e-4)
        stats = batcher.stats()
        self.assertEqual(stats.requests, 8)
        self.assertLess(stats.runs, 8, f"never batched: {stats}")
        with self.assertRaises(tern.TernError.Flow) as e:
            tern.TernBatcher(vad_session(), tern.BatchConfig())
        self.assertEqual(e.exception.kind, tern.FlowErrorKind.NOT_BATCHABLE)

    def test_stream_carries_state_like_onnxruntime(self):
        d = Path(CASE)
        raw = (d / "stream_samples.bin").read_bytes()
        samples = struct.unpack(f"<{len(raw) // 4}f", raw)
        want = struct.unpack(f"<{len((d / 'stream_probs.bin').read_bytes()) // 4}f", (d / "stream_probs.bin").read_bytes())
        s = vad_session()
        config = tern.StreamConfig(carries=[tern.StreamCarry(output="hn", input="h"), tern.StreamCarry(output="cn", input="c")],
                                   contexts=[tern.StreamContext(input="input", length=64)], initial=[])
        stream = tern.TernStream(s, config)

        def push(i):
            out = stream.push([tern.tensor_f32("input", [1, 512], samples[i * 512:(i + 1) * 512])])
            return tern.tensor_to_f32(next(o for o in out if o.name == "speech_probs"))[0]

        got = [push(i) for i in range(len(want))]
        self.assertLess(max(abs(a - b) for a, b in zip(got, want)), 1e-4)
        self.assertEqual(stream.chunks(), len(want))
        stream.reset()
        self.assertEqual(stream.chunks(), 0)
        self.assertLess(abs(push(0) - want[0]), 1e-4)
        with self.assertRaises(tern.TernError.Flow) as e:
            tern.TernStream(s, tern.StreamConfig(carries=[tern.StreamCarry(output="nope", input="h")], contexts=[], initial=[]))
        self.assertEqual(e.exception.kind, tern.FlowErrorKind.BAD_STATE)

    def test_job_queue_runs_later_and_keeps_results(self):
        n, width, classes, x, y = case()
        row = width * 4
        with tempfile.TemporaryDirectory() as d:
            q = tern.TernJobQueue.open(d, tern.JobConfig(capacity=8, max_attempts=3, backoff_seconds=1.0))
            ids = [q.submit("magika", [tern.TensorData(name="bytes", dtype=tern.DType.I32, shape=[1, width], data=x[r * row:(r + 1) * row])],
                            tern.Priority.NORMAL, f"file.{r}") for r in range(n)]
            self.assertEqual(ids, [f"file.{r}" for r in range(n)])
            lost = q.submit("deleted", [tern.tensor_i32("bytes", [1, width], [0] * width)], tern.Priority.LOW, None)
            self.assertEqual(q.status(ids[0]), tern.JobState.PENDING(attempts=0))
            del q  # the app is killed: the jobs are on disk
            q = tern.TernJobQueue.open(d, tern.JobConfig(capacity=8, max_attempts=3, backoff_seconds=1.0))
            _, s = session()
            q.register("magika", s)
            report = q.run_pending(60000)
            self.assertEqual((report.succeeded, report.failed, report.pending), (n, 1, 0))
            for r, job in enumerate(ids):
                result = q.take_result(job)
                self.assertTrue(result.is_done(), result)
                got = tern.tensor_to_f32(result.outputs[0])
                self.assertLess(max(abs(a - b) for a, b in zip(got, y[r * classes:(r + 1) * classes])), 1e-4)
                self.assertEqual(q.status(job), tern.JobState.UNKNOWN())
            failed = q.take_result(lost)
            self.assertTrue(failed.is_failed() and failed.failure.is_unknown_model(), failed)
            with self.assertRaises(tern.TernError.Flow) as e:
                q.submit("magika", [], tern.Priority.HIGH, "no/slashes")
            self.assertEqual(e.exception.kind, tern.FlowErrorKind.INVALID_OPTION)

    def test_flows_run_python_callbacks_with_fallbacks(self):
        n, width, classes, x, y = case()
        calls = []

        class Pre(tern.FlowCallback):
            def compute(self, inputs):
                calls.append([t.name for t in inputs])
                return [tern.TensorData(name="bytes", dtype=t.dtype, shape=t.shape, data=t.data) for t in inputs]

        class Boom(tern.FlowCallback):
            def compute(self, inputs):
                raise ValueError("boom from Python")

        class Rule(tern.FlowCallback):
            def compute(self, inputs):
                return [tern.tensor_f32("label", [1], [-1.0])]

        class Slow(tern.FlowCallback):
            def compute(self, inputs):
                import time
                time.sleep(0.5)
                return [tern.tensor_f32("target_label", [n, classes], [0.0] * (n * classes))]

        text = f"""
[sessions.magika]
model = "{MODEL}"
[caches.c]
max_bytes = 1000000
[steps.pre]
callback = "pre"
[steps.model]
session = "magika"
cache = "c"
[steps.boom]
callback = "boom"
[steps.guarded]
callback = "boom"
fallbacks = [{{ rule = "rule" }}]
[steps.slow]
callback = "slow"
[flows.pipe]
pipeline = ["pre", "model"]
[flows.guarded]
pipeline = ["guarded"]
[flows.bare]
pipeline = ["boom"]
[flows.race]
fan_out = [{{ step = "model" }}, {{ step = "slow" }}]
merge = "first_good"
deadline_ms = 200
"""
        config = tern.SessionConfig(backend=tern.Backend.CPU, threads=1, telemetry=False)
        callbacks = {"pre": Pre(), "boom": Boom(), "rule": Rule(), "slow": Slow()}
        flows = tern.TernFlows.from_toml(text, ".", config, callbacks)
        self.assertEqual(flows.names(), ["bare", "guarded", "pipe", "race"])
        inputs = [tern.TensorData(name="raw", dtype=tern.DType.I32, shape=[n, width], data=x)]
        for attempt in range(2):
            r = flows.run("pipe", inputs)
            got = tern.tensor_to_f32(r.outputs[0])
            self.assertLess(max(abs(a - b) for a, b in zip(got, y)), 1e-4)
            want = tern.Source.MODEL if attempt == 0 else tern.Source.CACHE
            self.assertEqual([(a.step, a.source) for a in r.answered], [("pre", tern.Source.MODEL), ("model", want)])
        self.assertEqual(calls, [["raw"], ["raw"]])
        self.assertEqual(flows.cache_stats()["c"].hits, 1)

        r = flows.run("guarded", inputs)
        self.assertEqual(r.answered[0].source, tern.Source.RULE)
        self.assertEqual(tern.tensor_to_f32(r.outputs[0]), [-1.0])
        self.assertEqual(r.outputs[0].name, "label")
        with self.assertRaises(tern.TernError.Flow) as e:
            flows.run("bare", inputs)
        self.assertEqual(e.exception.kind, tern.FlowErrorKind.CALLBACK)
        self.assertIn("boom from Python", str(e.exception))
        counters = flows.step_stats()
        self.assertEqual((counters["guarded"].fallbacks, counters["boom"].errors), (1, 1))
        self.assertEqual(flows.breaker_states()["model"], tern.BreakerState.CLOSED)

        bytes_in = [tern.TensorData(name="bytes", dtype=tern.DType.I32, shape=[n, width], data=x)]
        r = asyncio.run(flows.run_async("race", bytes_in))
        self.assertEqual([a.step for a in r.answered], ["model"])
        self.assertEqual([m.step for m in r.missing], ["slow"])
        self.assertTrue(r.missing[0].failure.is_timeout(), r.missing[0].failure)

        with self.assertRaises(tern.TernError.Flow) as e:
            tern.TernFlows.from_toml('[steps.a]\nflow = "f"\n[flows.f]\npipeline = ["a"]\n', ".", config, {})
        self.assertEqual(e.exception.kind, tern.FlowErrorKind.BAD_FLOW)
        self.assertIn("cycle", str(e.exception))
        with self.assertRaises(tern.TernError.Flow) as e:
            tern.TernFlows.from_toml(text, ".", config, {})
        self.assertEqual(e.exception.kind, tern.FlowErrorKind.BAD_FLOW)


class FileFetcher(tern.ModelFetcher):
    """The app's fetcher: the repository as it stands at `step`, read from disk."""

    def __init__(self, step):
        self.step = step
        self.paths = []

    def fetch(self, path, offset, max_bytes):
        self.paths.append(path)
        f = Path(LIFECYCLE) / "steps" / str(self.step) / path
        if not f.exists():
            return tern.FetchResult.NOT_FOUND()
        with open(f, "rb") as h:
            h.seek(offset)
            return tern.FetchResult.DATA(h.read(max_bytes))


@unittest.skipIf(LIFECYCLE is None, "no lifecycle repository given")
class Lifecycle(unittest.TestCase):
    def store(self, key="release.key.pub"):
        keys = [(Path(LIFECYCLE) / key).read_text()]
        config = tern.StoreConfig(keep=3, quota_bytes=1 << 30,
                                  session=tern.SessionConfig(backend=tern.Backend.CPU, telemetry=False))
        return tern.TernModelStore.open(tempfile.mkdtemp(), keys, 1, config)

    def test_updates_install_load_and_roll_out_with_typed_refusals(self):
        n, width, _, x, y = case()
        root = (Path(LIFECYCLE) / "root.json").read_bytes()
        store, fetcher = self.store(), FileFetcher(1)
        first = asyncio.run(store.update_async("magika", root, fetcher))
        self.assertEqual(first.result.version, 1)
        self.assertIn("timestamp.json", fetcher.paths)
        store.activate("magika", 1)
        loaded = store.load("magika")
        out = loaded.session.run([tern.TensorData(name="bytes", dtype=tern.DType.I32, shape=[n, width], data=x)])
        self.assertLess(max(abs(a - b) for a, b in zip(tern.tensor_to_f32(out[0]), y)), 1e-4)
        fetcher.step = 3  # versions 2 and 3 published, the root rotated: the newest comes
        self.assertEqual(store.update("magika", root, fetcher).result.version, 3)
        store.stage("magika", 3)
        heard = []

        class Listener(tern.RolloutListener):
            def on_verdict(self, event):
                heard.append(event)

        config = tern.RolloutConfig(stage=tern.RolloutStage.CANARY(share=0.5, unit=tern.CanaryUnit.REQUEST),
                                    min_requests=5, max_p95_ratio=1000.0, promote_after=10)
        rollout = store.rollout("magika", config, "python-device", Listener())
        arms = [rollout.run([tern.TensorData(name="bytes", dtype=tern.DType.I32, shape=[n, width], data=x)], None).arm
                for _ in range(24)]
        self.assertEqual(arms[:4], [tern.Arm.ACTIVE, tern.Arm.CANDIDATE] * 2)
        # The bad candidate answers without errors: a canary (no comparison) promotes it
        # after 10 runs — what shadowing exists to catch (the Kotlin test shadows it).
        self.assertTrue(rollout.verdict().is_PROMOTE(), rollout.verdict())
        self.assertEqual(len(heard), 1)
        self.assertEqual(store.status()[0].active, 3)
        self.assertEqual(store.rollback("magika"), 1)
        with self.assertRaises(tern.TernError.Bundle) as e:
            store.stage("magika", 9)
        self.assertEqual(e.exception.kind, tern.BundleErrorKind.NOT_INSTALLED)

    def test_a_store_trusting_another_key_refuses_the_bundles(self):
        root = (Path(LIFECYCLE) / "root.json").read_bytes()
        with self.assertRaises(tern.TernError.Bundle) as e:
            self.store("stranger.key.pub").update("magika", root, FileFetcher(1))
        self.assertEqual(e.exception.kind, tern.BundleErrorKind.SIGNATURE)


def vad_session():
    model = tern.TernModel.from_path((Path(CASE) / "vad_model.txt").read_text().strip())
    return tern.TernSession(model, tern.SessionConfig(backend=tern.Backend.CPU, threads=1, telemetry=False))


if __name__ == "__main__":
    result = unittest.main(argv=[sys.argv[0], "-v"], exit=False).result
    failed = len(result.failures) + len(result.errors)
    print(f"bindings-python: {result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
