"""tern-quantize and onnxruntime.quantization side by side, on the same model and the same
calibration data.

  compare_quantize.py prepare  MODEL DIR SYMBOL=N ...   seeded calibration samples in
      DIR/calib/<k>/<input>.npy, and onnxruntime's static QDQ model in DIR/ort_qdq.onnx made
      the way its documentation says: quant_pre_process (constant folding, BatchNormalization
      folded into Conv), then quantize_static (MinMax, uint8 activations, int8 weights, its
      default per-tensor weights; and again with per_channel=True in DIR/ort_pc_qdq.onnx)
  compare_quantize.py evaluate MODEL DIR SYMBOL=N ...   runs the fp32 model, DIR/ort_qdq.onnx
      and DIR/tern_qdq.onnx (written in between by tern-quantize from the same samples) in
      onnxruntime on held-out inputs and prints, per quantizer, size and accuracy against
      fp32 as JSON

Both quantized models are judged by the same runtime on the same inputs, so the figures
compare the quantizers, not the runtimes.
"""
import json
import pathlib
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

CALIB_SAMPLES = 16
EVAL_SAMPLES = 32
ort.set_default_logger_severity(3)


def shapes(model, dims):
    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    # A dimension without a name is known to tern as <input>_d<axis>; onnxruntime shows it
    # as None or "?".
    return {
        i.name: [
            d if isinstance(d, int) else int(dims.get(str(d), dims.get(f"{i.name}_d{axis}", 1)))
            for axis, d in enumerate(i.shape)
        ]
        for i in s.get_inputs()
    }


def samples(model, dims, n, seed):
    rng = np.random.default_rng(seed)
    return [
        {name: rng.random(shape, dtype=np.float32) for name, shape in shapes(model, dims).items()}
        for _ in range(n)
    ]


class Reader(CalibrationDataReader):
    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def prepare(model, out, dims):
    feeds = samples(model, dims, CALIB_SAMPLES, 0)
    for k, feed in enumerate(feeds):
        d = out / "calib" / str(k)
        d.mkdir(parents=True, exist_ok=True)
        for name, value in feed.items():
            np.save(d / f"{name}.npy", value)
    pre = out / "ort_preprocessed.onnx"
    # Symbolic shape inference needs sympy, which tern's environment does not carry; the
    # models here have concrete shapes after ONNX's own inference.
    quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
    # Its defaults (per-tensor weights), and per-channel weights as tern-quantize makes them.
    # Per-channel DequantizeLinear needs opset 13: onnxruntime.quantization writes it into an
    # opset-11/12 model anyway (an invalid model), so the model goes through ONNX's own
    # version converter first, as tern-quantize upgrades it too.
    pre13 = out / "ort_preprocessed_opset13.onnx"
    onnx.save(version_converter.convert_version(onnx.load(str(pre)), 13), str(pre13))
    for name, source, per_channel in [("ort_qdq", pre, False), ("ort_pc_qdq", pre13, True)]:
        quantize_static(
            str(source),
            str(out / f"{name}.onnx"),
            Reader(feeds),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            per_channel=per_channel,
            # The same ops tern-quantize quantizes; the rest stays float in both.
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
        )


def accuracy(reference, candidate):
    x = np.concatenate([r.ravel() for r in reference]).astype(np.float64)
    y = np.concatenate([c.ravel() for c in candidate]).astype(np.float64)
    agree = [
        np.mean(np.argmax(r.reshape(-1, r.shape[-1]), -1) == np.argmax(c.reshape(-1, c.shape[-1]), -1))
        for r, c in zip(reference, candidate)
    ]
    return {
        "cosine": float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))),
        "sqnr_db": float(10 * np.log10(np.sum(x * x) / max(np.sum((x - y) ** 2), 1e-300))),
        "max_abs": float(np.max(np.abs(x - y))),
        "top1_agreement": float(np.mean(agree)),
    }


def evaluate(model, out, dims):
    feeds = samples(model, dims, EVAL_SAMPLES, 1)

    def first_outputs(path):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [s.run(None, f)[0] for f in feeds]

    reference = first_outputs(model)
    size = model.stat().st_size
    result = {"model": str(model), "size_fp32": size, "eval_inputs": EVAL_SAMPLES}
    for who in ["ort", "ort_pc", "tern"]:
        path = out / f"{who}_qdq.onnx"
        result[who] = {
            "size": path.stat().st_size,
            "size_ratio": path.stat().st_size / size,
            **accuracy(reference, first_outputs(path)),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    command, model, out = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
    dims = dict(kv.split("=", 1) for kv in sys.argv[4:])
    out.mkdir(parents=True, exist_ok=True)
    {"prepare": prepare, "evaluate": evaluate}[command](model, out, dims)
