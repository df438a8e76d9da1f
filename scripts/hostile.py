"""A corpus of hostile models and inputs, run through tern's CLI or its Python binding, one
process per case, counting outcomes. Every case must end in outputs or a typed error: a
signal, an abort, an uncaught panic or a hang is a failure.

usage: hostile.py cli TERN_BINARY        (prints "hostile-cli: ...")
       hostile.py python BINDINGS_DIR    (prints "hostile-python: ...")
       hostile.py corpus DIR             (writes the small models, as fuzzing seeds)

The cases are built here with the `onnx` package (no downloads): out-of-bounds shapes,
terabyte allocations, bad attributes, bad indices, integer division by zero, long chains,
garbage and truncated bytes, external data pointing outside the model's folder.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

TIMEOUT = 60  # seconds per case: a case that takes longer is a hang
CHAIN = int(os.environ.get("TERN_HOSTILE_CHAIN", "5000"))  # nodes in the long-chain case


def value(name, elem, dims):
    return helper.make_tensor_value_info(name, elem, dims)


def model_bytes(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "hostile", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m.SerializeToString()


def i64(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def cases():
    """(name, model bytes, {input: array}, files {relative name: bytes})."""
    f, i = T.FLOAT, T.INT64
    one = lambda n: np.ones(n, np.float32)  # noqa: E731
    mm = model_bytes([helper.make_node("MatMul", ["a", "b"], ["y"])],
                     [value("a", f, ["n", "k"]), value("b", f, ["m", "p"])], [value("y", f, None)])
    yield "matmul_inner_1x1000", mm, {"a": one((1, 1)), "b": one((1000, 1))}
    yield "matmul_inner_4m", mm, {"a": one((1, 1)), "b": one((4_000_000, 1))}
    yield "matmul_inner_garbage", mm, {"a": one((2, 5)), "b": one((3, 2))}
    for perm in ([0, 0], [1, 1], [5, 0], [0, -1]):
        yield f"transpose_perm_{perm}", model_bytes(
            [helper.make_node("Transpose", ["x"], ["y"], perm=perm)],
            [value("x", f, [2, 2])], [value("y", f, None)]), {"x": one((2, 2))}
    yield "constant_of_shape_4tb", model_bytes(
        [helper.make_node("ConstantOfShape", ["s"], ["c"]), helper.make_node("Add", ["c", "x"], ["y"])],
        [value("x", f, [1])], [value("y", f, None)], [i64("s", [100000, 100000, 100])]), {"x": one((1,))}
    yield "expand_4tb", model_bytes([helper.make_node("Expand", ["x", "s"], ["y"])],
                                    [value("x", f, [1, 1])], [value("y", f, None)],
                                    [i64("s", [1000000, 1000000])]), {"x": one((1, 1))}
    yield "tile_huge", model_bytes([helper.make_node("Tile", ["x", "r"], ["y"])],
                                   [value("x", f, [2, 2])], [value("y", f, None)],
                                   [i64("r", [100000, 100000])]), {"x": one((2, 2))}
    rng = model_bytes([helper.make_node("Range", ["a", "b", "c"], ["y"])],
                      [value(n, f, []) for n in "abc"], [value("y", f, None)])
    s = lambda v: np.array(v, np.float32)  # noqa: E731
    yield "range_1e13", rng, {"a": s(0), "b": s(1e13), "c": s(1)}
    yield "range_step_0", rng, {"a": s(0), "b": s(10), "c": s(0)}
    yield "range_nan", rng, {"a": s(0), "b": s(np.nan), "c": s(1)}
    yield "reshape_huge", model_bytes([helper.make_node("Reshape", ["x", "s"], ["y"])],
                                      [value("x", f, [4])], [value("y", f, None)],
                                      [i64("s", [1000000, 1000000])]), {"x": one((4,))}
    yield "pad_huge", model_bytes([helper.make_node("Pad", ["x", "p"], ["y"])],
                                  [value("x", f, [2, 2])], [value("y", f, None)],
                                  [i64("p", [0, 0, 1000000, 1000000])]), {"x": one((2, 2))}
    gather = model_bytes([helper.make_node("Gather", ["x", "i"], ["y"], axis=0)],
                         [value("x", f, [4, 2]), value("i", i, [2])], [value("y", f, None)])
    yield "gather_oob", gather, {"x": one((4, 2)), "i": np.array([1, 100], np.int64)}
    yield "gather_negative_oob", gather, {"x": one((4, 2)), "i": np.array([-5, 0], np.int64)}
    yield "gather_elements_oob", model_bytes(
        [helper.make_node("GatherElements", ["x", "i"], ["y"], axis=0)],
        [value("x", f, [4, 2]), value("i", i, [1, 2])], [value("y", f, None)]), \
        {"x": one((4, 2)), "i": np.array([[0, 9]], np.int64)}
    yield "scatter_elements_oob", model_bytes(
        [helper.make_node("ScatterElements", ["x", "i", "u"], ["y"], axis=0)],
        [value("x", f, [4, 2]), value("i", i, [1, 2]), value("u", f, [1, 2])], [value("y", f, None)]), \
        {"x": one((4, 2)), "i": np.array([[0, 9]], np.int64), "u": one((1, 2))}
    for op in ("Mod", "Div"):
        yield f"{op.lower()}_int_by_zero", model_bytes(
            [helper.make_node(op, ["a", "b"], ["y"])], [value("a", i, [2]), value("b", i, [2])],
            [value("y", i, None)]), {"a": np.array([5, 7], np.int64), "b": np.array([2, 0], np.int64)}
    for attr, v in (("strides", [0, 1]), ("kernel_shape", [2, 0]), ("pads", [0, -1, 0, 0]), ("dilations", [0, 1])):
        attrs = {"kernel_shape": [2, 2], "strides": [1, 1], attr: v}
        yield f"maxpool_{attr}", model_bytes([helper.make_node("MaxPool", ["x"], ["y"], **attrs)],
                                             [value("x", f, [1, 1, 4, 4])], [value("y", f, None)]), \
            {"x": one((1, 1, 4, 4))}
    w = numpy_helper.from_array(np.ones((1, 1, 2, 2), np.float32), "w")
    yield "conv_stride_0", model_bytes([helper.make_node("Conv", ["x", "w"], ["y"], strides=[0, 0])],
                                       [value("x", f, [1, 1, 4, 4])], [value("y", f, None)], [w]), \
        {"x": one((1, 1, 4, 4))}
    yield "conv_channels_mismatch", model_bytes([helper.make_node("Conv", ["x", "w"], ["y"])],
                                                [value("x", f, ["n", "c", 4, 4])], [value("y", f, None)], [w]), \
        {"x": one((1, 3, 4, 4))}
    yield "dangling_output", model_bytes([helper.make_node("Relu", ["x"], ["y"])],
                                         [value("x", f, [2])], [value("y", f, None), value("ghost", f, [1])]), \
        {"x": one((2,))}
    yield "unknown_op", model_bytes([helper.make_node("NoSuchOp", ["x"], ["y"])],
                                    [value("x", f, [2])], [value("y", f, None)]), {"x": one((2,))}
    yield "unknown_domain", model_bytes([helper.make_node("Relu", ["x"], ["y"], domain="evil.domain")],
                                        [value("x", f, [2])], [value("y", f, None)]), {"x": one((2,))}
    yield "opset_999", model_bytes([helper.make_node("Relu", ["x"], ["y"])], [value("x", f, [2])],
                                   [value("y", f, None)], opset=999), {"x": one((2,))}
    yield "softmax_axis_oob", model_bytes([helper.make_node("Softmax", ["x"], ["y"], axis=7)],
                                          [value("x", f, [2, 2])], [value("y", f, None)]), {"x": one((2, 2))}
    yield "topk_k_huge", model_bytes([helper.make_node("TopK", ["x", "k"], ["v", "ix"])],
                                     [value("x", f, [4]), value("k", i, [1])], [value("v", f, None), value("ix", i, None)]), \
        {"x": one((4,)), "k": np.array([1 << 40], np.int64)}
    yield "slice_int64_bounds", model_bytes(
        [helper.make_node("Slice", ["x", "s", "e"], ["y"])], [value("x", f, [4])], [value("y", f, None)],
        [i64("s", [-(1 << 62)]), i64("e", [1 << 62])]), {"x": one((4,))}
    yield "unsqueeze_axis_oob", model_bytes([helper.make_node("Unsqueeze", ["x", "a"], ["y"])],
                                            [value("x", f, [4])], [value("y", f, None)], [i64("a", [40])]), {"x": one((4,))}
    yield "einsum_garbage", model_bytes([helper.make_node("Einsum", ["x"], ["y"], equation="ab,,->->?")],
                                        [value("x", f, [2, 2])], [value("y", f, None)]), {"x": one((2, 2))}
    yield "sum_10k_inputs", model_bytes([helper.make_node("Sum", ["x"] * 10000, ["y"])],
                                        [value("x", f, [2])], [value("y", f, None)]), {"x": one((2,))}
    chain = [helper.make_node("Relu", [f"t{k}"], [f"t{k + 1}"]) for k in range(CHAIN)]
    yield f"relu_chain_{CHAIN}", model_bytes(chain, [value("t0", f, [1, 4])], [value(f"t{CHAIN}", f, [1, 4])]), \
        {"t0": one((1, 4))}
    big = [helper.make_node("Relu", [f"t{k}"], [f"t{k + 1}"]) for k in range(120_000)]
    yield "relu_chain_120k", model_bytes(big, [value("t0", f, [1, 4])], [value("t120000", f, [1, 4])]), \
        {"t0": one((1, 4))}
    good = model_bytes([helper.make_node("Relu", ["x"], ["y"])], [value("x", f, [2])], [value("y", f, None)])
    yield "garbage_bytes", os.urandom(4096), {}
    yield "truncated", good[: len(good) // 2], {"x": one((2,))}
    yield "empty_file", b"", {}
    for name, location in (("external_data_escape", "../../../../etc/passwd"), ("external_data_dev_zero", "/dev/zero")):
        t = onnx.TensorProto(name="w", data_type=T.FLOAT, dims=[4])
        t.data_location = onnx.TensorProto.EXTERNAL
        t.external_data.add(key="location", value=location)
        yield name, model_bytes([helper.make_node("Add", ["x", "w"], ["y"])], [value("x", f, [4])],
                                [value("y", f, None)], [t]), {"x": one((4,))}


def write_case(root, name, data, inputs):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(data)
    for k, v in inputs.items():
        np.save(d / f"{k}.npy", v)
    return d


def classify(code, stdout, timed_out):
    if timed_out:
        return "hang"
    if code < 0:
        return f"signal {-code}"
    try:
        out = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else None
    except (json.JSONDecodeError, IndexError):
        out = None
    if code == 0 and out is not None and "error" not in out:
        return "ok"
    if out is not None and "error" in out:
        return "error:" + out["error"]["kind"]
    return f"exit {code}"  # no JSON: an abort or an escaped panic


CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
import tern_ffi as tern
d = Path(sys.argv[2])
try:
    model = tern.TernModel.from_path(str(d / "model.onnx"))
    s = tern.TernSession(model, tern.SessionConfig(backend=tern.Backend.CPU, threads=1, telemetry=False))
    dt = {np.dtype("float32"): tern.DType.F32, np.dtype("int64"): tern.DType.I64}
    inputs = []
    for p in sorted(d.glob("*.npy")):
        a = np.load(p)
        inputs.append(tern.TensorData(name=p.stem, dtype=dt[a.dtype], shape=list(a.shape), data=a.tobytes()))
    s.run(inputs)
    print(json.dumps({"outputs": True}))
except tern.TernError as e:
    kind = getattr(e, "kind", None)
    print(json.dumps({"error": {"kind": str(kind.name).lower() if kind is not None else type(e).__name__}}))
"""


def main():
    mode, target = sys.argv[1], sys.argv[2]
    if mode == "corpus":
        out = Path(target)
        out.mkdir(parents=True, exist_ok=True)
        for name, data, _ in cases():
            if len(data) <= 16384 and "chain" not in name:
                (out / f"{name}.onnx").write_bytes(data)
        return
    root = Path(tempfile.mkdtemp(prefix="tern-hostile-"))
    outcomes = {}
    failures = []
    for name, data, inputs in cases():
        d = write_case(root, name, data, inputs)
        if mode == "cli":
            cmd = [target, "--json", "run", str(d / "model.onnx")]
            cmd += [a for k in inputs for a in ("-i", f"{k}={d / (k + '.npy')}")]
        else:
            cmd = [sys.executable, "-c", CHILD, target, str(d)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
            outcome = classify(p.returncode, p.stdout, False)
            stderr = p.stderr
        except subprocess.TimeoutExpired:
            outcome, stderr = "hang", ""
        outcomes[name] = outcome
        # A caught panic is a typed error (kind `panic`), counted but allowed; a signal, a
        # hang, an exit without a JSON answer or a panic that reached stderr is a failure.
        bad = outcome.startswith(("signal", "hang", "exit")) or "panicked" in stderr
        if bad:
            failures.append(f"{name}: {outcome} {stderr.strip()[-300:]}")
    kinds = {}
    for o in outcomes.values():
        kinds[o] = kinds.get(o, 0) + 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    for f in failures:
        print("  FAILED", f, file=sys.stderr)
    print(f"hostile-{mode}: {len(outcomes)} cases, {len(failures)} failed ({summary})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
