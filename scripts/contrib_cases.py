"""Single-node models of onnxruntime's com.microsoft contrib ops (the ones its quantizer,
graph optimizer and transformer optimizer write), with seeded inputs and onnxruntime's
outputs, in the ONNX node suite's layout: <case>/model.onnx, <case>/test_data_set_0/
{input,output}_<i>.pb, and manifest.json (op, tolerances). tests/tests/contrib.rs runs them
through tern. Quantized outputs are dequantized in the model and held to one quantization
step (the runtimes may round a value on the other side of a half), float ones to 1e-4
absolute / 1e-3 relative.

usage: contrib_cases.py OUT_DIR
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper as h, TensorProto as T, numpy_helper as nh

MS = "com.microsoft"


def generate(out):
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    manifest = {}

    def f32(*s):
        return rng.standard_normal(s).astype(np.float32)

    # Where a quantized op's output scale and zero point are among its inputs.
    out_qparams = {"QLinearAdd": (6, 7), "QLinearMul": (6, 7), "QLinearConcat": (0, 1), "QGemm": (7, 8)}

    def case(name, node, inputs, inits=(), outs=("y",), opset=17, atol=1e-4):
        nodes = [node]
        if node.op_type.startswith("QLinear") or node.op_type == "QGemm":
            # The quantized output is dequantized in the model, so one quantization step
            # is a float tolerance the comparison can state.
            s, z = out_qparams.get(node.op_type, (3, 4))
            scale, zero = node.input[s], node.input[z]
            node.output[0] = "yq"
            nodes.append(h.make_node("DequantizeLinear", ["yq", scale, zero], [outs[0]]))
            step = float(dict(inits)[scale])
        else:
            step = None
        g = h.make_graph(nodes, name,
                         [h.make_tensor_value_info(k, nh.helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
                          for k, v in inputs.items()],
                         [onnx.ValueInfoProto(name=o) for o in outs],
                         [nh.from_array(v, k) for k, v in dict(inits).items()])
        model = h.make_model(g, opset_imports=[h.make_opsetid("", opset), h.make_opsetid(MS, 1)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        ref = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, inputs)
        d = out / name
        ds = d / "test_data_set_0"
        ds.mkdir(parents=True)
        onnx.save(model, d / "model.onnx")
        for i, (k, v) in enumerate(inputs.items()):
            (ds / f"input_{i}.pb").write_bytes(nh.from_array(v, k).SerializeToString())
        for i, v in enumerate(ref):
            (ds / f"output_{i}.pb").write_bytes(nh.from_array(v, outs[i]).SerializeToString())
        manifest[name] = {"op": node.op_type, "rtol": 0.0 if step else 1e-3,
                          "atol": 1.01 * step if step else atol, "non_tensor_io": []}

    x = f32(2, 5, 16)
    case("Gelu", h.make_node("Gelu", ["x"], ["y"], domain=MS), {"x": x})
    case("FastGelu", h.make_node("FastGelu", ["x", "b"], ["y"], domain=MS), {"x": x}, {"b": f32(16)})
    case("BiasGelu", h.make_node("BiasGelu", ["x", "b"], ["y"], domain=MS), {"x": x}, {"b": f32(16)})
    case("QuickGelu", h.make_node("QuickGelu", ["x"], ["y"], domain=MS, alpha=1.702), {"x": x})
    case("SkipLayerNormalization", h.make_node("SkipLayerNormalization", ["x", "s", "g", "b", "bias"], ["y"], domain=MS, epsilon=1e-5),
         {"x": x, "s": f32(2, 5, 16)}, {"g": f32(16), "b": f32(16), "bias": f32(16)})
    case("SkipSimplifiedLayerNormalization", h.make_node("SkipSimplifiedLayerNormalization", ["x", "s", "g"], ["y"], domain=MS, epsilon=1e-5),
         {"x": x, "s": f32(2, 5, 16)}, {"g": f32(16)})
    case("SimplifiedLayerNormalization", h.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y"], epsilon=1e-5, axis=-1),
         {"x": x}, {"g": f32(16)})
    case("Attention", h.make_node("Attention", ["x", "w", "bias"], ["y"], domain=MS, num_heads=4),
         {"x": x}, {"w": f32(16, 48) * 0.3, "bias": f32(48)})
    case("Attention_mask", h.make_node("Attention", ["x", "w", "bias", "m"], ["y"], domain=MS, num_heads=4),
         {"x": x, "m": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)}, {"w": f32(16, 48) * 0.3, "bias": f32(48)})
    case("MultiHeadAttention", h.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain=MS, num_heads=4),
         {"q": f32(2, 5, 16), "k": f32(2, 7, 16), "v": f32(2, 7, 16)})
    case("EmbedLayerNormalization", h.make_node("EmbedLayerNormalization", ["ids", "seg", "we", "pe", "se", "g", "b"], ["y", "mask"], domain=MS, epsilon=1e-5),
         {"ids": rng.integers(0, 30, (2, 5)).astype(np.int32), "seg": np.zeros((2, 5), np.int32)},
         {"we": f32(30, 16), "pe": f32(8, 16), "se": f32(2, 16), "g": f32(16), "b": f32(16)}, outs=("y", "mask"))
    # MatMulNBits: K=32 N=8 block 16 4 bits
    K, N, B = 32, 8, 16
    wq = rng.integers(0, 16, (N, K // B, B)).astype(np.uint8)
    packed = (wq[..., 0::2] | (wq[..., 1::2] << 4)).astype(np.uint8)
    case("MatMulNBits", h.make_node("MatMulNBits", ["a", "w", "sc"], ["y"], domain=MS, K=K, N=N, bits=4, block_size=B),
         {"a": f32(3, K)}, {"w": packed, "sc": (np.abs(f32(N * (K // B))) * 0.1).astype(np.float32)})
    xs, xz = np.array(0.05, np.float32), np.array(128, np.uint8)
    xu = rng.integers(0, 255, (2, 4, 5, 5)).astype(np.uint8)
    yu = rng.integers(0, 255, (2, 4, 5, 5)).astype(np.uint8)
    sc = {"xs": xs, "xz": xz, "ys": np.array(0.04, np.float32), "yz": np.array(120, np.uint8), "zs": np.array(0.08, np.float32), "zz": np.array(128, np.uint8)}
    case("QLinearAdd", h.make_node("QLinearAdd", ["a", "xs", "xz", "b", "ys", "yz", "zs", "zz"], ["y"], domain=MS), {"a": xu, "b": yu}, sc)
    case("QLinearMul", h.make_node("QLinearMul", ["a", "xs", "xz", "b", "ys", "yz", "zs", "zz"], ["y"], domain=MS), {"a": xu, "b": yu}, sc)
    case("QLinearSigmoid", h.make_node("QLinearSigmoid", ["a", "xs", "xz", "zs", "zz"], ["y"], domain=MS), {"a": xu}, sc)
    case("QLinearLeakyRelu", h.make_node("QLinearLeakyRelu", ["a", "xs", "xz", "zs", "zz"], ["y"], domain=MS, alpha=0.1), {"a": xu}, sc)
    case("QLinearGlobalAveragePool", h.make_node("QLinearGlobalAveragePool", ["a", "xs", "xz", "zs", "zz"], ["y"], domain=MS, channels_last=0), {"a": xu}, sc)
    case("QLinearAveragePool", h.make_node("QLinearAveragePool", ["a", "xs", "xz", "zs", "zz"], ["y"], domain=MS, kernel_shape=[2, 2]), {"a": xu}, sc)
    case("QLinearConcat", h.make_node("QLinearConcat", ["zs", "zz", "a", "xs", "xz", "b", "ys", "yz"], ["y"], domain=MS, axis=1), {"a": xu, "b": yu}, sc)
    case("QLinearSoftmax", h.make_node("QLinearSoftmax", ["a", "xs", "xz", "zs", "zz"], ["y"], domain=MS, axis=-1, opset=13), {"a": xu}, {**sc, "zs": np.array(1/256, np.float32), "zz": np.array(0, np.uint8)})
    case("FusedConv", h.make_node("FusedConv", ["x", "w", "b"], ["y"], domain=MS, activation="Relu", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         {"x": f32(1, 4, 6, 6)}, {"w": f32(8, 4, 3, 3), "b": f32(8)})
    case("FusedConv_clip", h.make_node("FusedConv", ["x", "w", "b"], ["y"], domain=MS, activation="Clip", activation_params=[0.0, 6.0], kernel_shape=[3, 3]),
         {"x": f32(1, 4, 6, 6)}, {"w": f32(8, 4, 3, 3), "b": f32(8)})
    case("DynamicQuantizeMatMul", h.make_node("DynamicQuantizeMatMul", ["a", "w", "ws", "wz"], ["y"], domain=MS),
         {"a": f32(3, 16)}, {"w": rng.integers(-127, 127, (16, 8)).astype(np.int8), "ws": np.array([0.02], np.float32), "wz": np.array([0], np.int8)})
    case("MatMulIntegerToFloat", h.make_node("MatMulIntegerToFloat", ["a", "w", "as", "ws", "az"], ["y"], domain=MS),
         {"a": rng.integers(0, 255, (3, 16)).astype(np.uint8)}, {"w": rng.integers(-127, 127, (16, 8)).astype(np.int8), "as": np.array(0.02, np.float32), "ws": np.array([0.03], np.float32), "az": np.array(128, np.uint8)})
    case("QGemm", h.make_node("QGemm", ["a", "as", "az", "w", "ws", "wz", "c", "ys", "yz"], ["y"], domain=MS, transB=1),
         {"a": rng.integers(0, 255, (3, 16)).astype(np.uint8)}, {"as": np.array(0.02, np.float32), "az": np.array(128, np.uint8), "w": rng.integers(-127, 127, (8, 16)).astype(np.int8), "ws": np.array(0.03, np.float32), "wz": np.array(0, np.int8), "c": rng.integers(-100, 100, (8,)).astype(np.int32), "ys": np.array(0.1, np.float32), "yz": np.array(128, np.uint8)})
    # DynamicQuantizeLSTM: int8 weights [D, I, 4H] / [D, H, 4H], per-column scales.
    # onnxruntime also quantizes the activations at each step (tern does not): held to 2e-2.
    H, I = 8, 6
    lstm = h.make_node("DynamicQuantizeLSTM", ["x", "w", "r", "b", "", "", "", "", "ws", "wz", "rs", "rz"],
                       ["y"], domain=MS, hidden_size=H)
    case("DynamicQuantizeLSTM", lstm, {"x": f32(5, 2, I)},
         {"w": rng.integers(-127, 127, (1, I, 4 * H)).astype(np.int8),
          "r": rng.integers(-127, 127, (1, H, 4 * H)).astype(np.int8),
          "b": f32(1, 8 * H) * 0.1, "ws": (np.abs(f32(1, 4 * H)) * 0.01 + 0.002).astype(np.float32),
          "wz": np.zeros((1, 4 * H), np.int8), "rs": (np.abs(f32(1, 4 * H)) * 0.01 + 0.002).astype(np.float32),
          "rz": np.zeros((1, 4 * H), np.int8)}, atol=2e-2)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=0, sort_keys=True))
    return len(manifest)


if __name__ == "__main__":
    print(f"{generate(sys.argv[1])} contrib cases")
