"""End-to-end test of the UniFFI Python bindings against the real Rust library: a real model
(magika) compared with onnxruntime's outputs, errors as exceptions, async runs, and telemetry
uploaded through a Python uploader.

usage: test_python.py BINDINGS_DIR CASE_DIR MODEL_PATH
"""
import asyncio
import json
import struct
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, sys.argv[1])
CASE, MODEL = sys.argv[2], sys.argv[3]
import tern_ffi as tern  # noqa: E402


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


if __name__ == "__main__":
    result = unittest.main(argv=[sys.argv[0], "-v"], exit=False).result
    failed = len(result.failures) + len(result.errors)
    print(f"bindings-python: {result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
