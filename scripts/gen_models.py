"""Small models generated here (random weights) for shapes that real models in the cache
do not cover: a symbolic batch through depthwise convolutions (tract's slow symbolic
path), a ViT-style decoder whose symbolic plan compiles but cannot run, and shapes and
axes given as inputs."""

import numpy as np, onnx
from onnx import helper as h, TensorProto as T, numpy_helper as nh

def dwnet(batch="batch"):
    """PP-LCNet-style: conv stem, depthwise-separable blocks with HardSwish, GAP, FC."""
    rng = np.random.default_rng(7)
    nodes, inits = [], []
    def w(name, shape, scale=None):
        fan = np.prod(shape[1:])
        inits.append(nh.from_array((rng.standard_normal(shape) * (scale or (2 / fan) ** 0.5)).astype(np.float32), name))
        return name
    x = "x"; c = 3; k = 0
    def conv(x, cin, cout, ks, stride, group, act=True):
        nonlocal k
        k += 1
        y = f"c{k}"
        nodes.append(h.make_node("Conv", [x, w(f"w{k}", [cout, cin // group, ks, ks]), w(f"b{k}", [cout], 0.1)], [y],
                                 kernel_shape=[ks, ks], strides=[stride, stride], pads=[ks // 2] * 4, group=group))
        if act:
            nodes.append(h.make_node("HardSwish", [y], [y + "a"])); y += "a"
        return y
    x = conv(x, 3, 16, 3, 2, 1)
    for cin, cout, ks, s in [(16, 32, 3, 1), (32, 64, 3, 2), (64, 64, 3, 1), (64, 128, 3, 2), (128, 128, 5, 1), (128, 256, 5, 2)]:
        x = conv(x, cin, cin, ks, s, cin)   # depthwise
        x = conv(x, cin, cout, 1, 1, 1)     # pointwise
    nodes.append(h.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(h.make_node("Flatten", ["gap"], ["flat"], axis=1))
    nodes.append(h.make_node("Gemm", ["flat", w("fcw", [10, 256]), w("fcb", [10], 0.1)], ["logits"], transB=1))
    nodes.append(h.make_node("Softmax", ["logits"], ["probs"], axis=1))
    g = h.make_graph(nodes, "dwnet", [h.make_tensor_value_info("x", T.FLOAT, [batch, 3, 112, 112])],
                     [h.make_tensor_value_info("probs", T.FLOAT, [batch, 10])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])

def vit_decoder():
    """Patch embedding (Conv stride 4), a self-attention block over tokens, tokens reshaped
    back to a map by Shape arithmetic, then a ConvTranspose + Resize decoder whose output
    size comes from Shape arithmetic too."""
    rng = np.random.default_rng(11)
    inits = []
    def w(name, shape, s=0.1):
        inits.append(nh.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)); return name
    def i64(name, v):
        inits.append(nh.from_array(np.array(v, np.int64), name)); return name
    D = 16
    nodes = [
        h.make_node("Conv", ["x", w("pw", [D, 3, 4, 4]), w("pb", [D])], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
        h.make_node("Shape", ["p"], ["ps"]),
        h.make_node("Reshape", ["p", i64("r1", [0, D, -1])], ["t0"]),
        h.make_node("Transpose", ["t0"], ["t"], perm=[0, 2, 1]),              # [b, n, D]
        h.make_node("MatMul", ["t", w("wq", [D, D])], ["q"]),
        h.make_node("MatMul", ["t", w("wk", [D, D])], ["kk"]),
        h.make_node("MatMul", ["t", w("wv", [D, D])], ["v"]),
        h.make_node("Transpose", ["kk"], ["kt"], perm=[0, 2, 1]),
        h.make_node("MatMul", ["q", "kt"], ["s"]),
        h.make_node("Softmax", ["s"], ["a"], axis=-1),
        h.make_node("MatMul", ["a", "v"], ["o"]),
        h.make_node("Add", ["o", "t"], ["r"]),
        h.make_node("Transpose", ["r"], ["rt"], perm=[0, 2, 1]),               # [b, D, n]
        h.make_node("Reshape", ["rt", "ps"], ["m"]),                          # back to [b, D, h, w]
        h.make_node("ConvTranspose", ["m", w("tw", [D, 8, 2, 2]), w("tb", [8])], ["u"], strides=[2, 2]),
        h.make_node("Relu", ["u"], ["ur"]),
        # Output size from the tensor's own shape (batch and channels) and a fixed 32x32,
        # as exporters write it: tract plans this for a symbolic batch_size, then cannot
        # evaluate the symbol at the Resize when the plan runs.
        h.make_node("Shape", ["ur"], ["us"]),
        h.make_node("Slice", ["us", i64("s0", [0]), i64("s2", [2])], ["bc"]),
        h.make_node("Concat", ["bc", i64("hw", [32, 32])], ["sz"], axis=0),
        h.make_node("Resize", ["ur", "", "", "sz"], ["y"], mode="nearest"),
    ]
    g = h.make_graph(nodes, "vit_decoder", [h.make_tensor_value_info("x", T.FLOAT, ["batch_size", 3, 32, 32])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["batch_size", 8, 32, 32])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def value_inputs():
    """A Reshape whose target shape and a ReduceSum whose axes are graph inputs, as
    exporters and the ONNX test suite leave them (tract plans them only as constants), the
    shape computed by a Cast from int32 and a Concat; and a scale that is an ordinary input."""
    nodes = [
        h.make_node("Cast", ["shape"], ["shape64"], to=T.INT64),
        h.make_node("Concat", ["batch", "shape64"], ["target"], axis=0),
        h.make_node("Reshape", ["x", "target"], ["r"]),
        h.make_node("ReduceSum", ["r", "axes"], ["s"], keepdims=1),
        h.make_node("Mul", ["s", "scale"], ["y"]),
    ]
    g = h.make_graph(nodes, "value_inputs", [
        h.make_tensor_value_info("x", T.FLOAT, ["n", 6, 8, 8]),
        h.make_tensor_value_info("batch", T.INT64, [1]),
        h.make_tensor_value_info("shape", T.INT32, [2]),
        h.make_tensor_value_info("axes", T.INT64, ["k"]),
        h.make_tensor_value_info("scale", T.FLOAT, [1]),
    ], [h.make_tensor_value_info("y", T.FLOAT, None)])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


GENERATED = {"dwnet_dynbatch": dwnet, "vit_decoder_dynbatch": vit_decoder, "value_inputs": value_inputs}


def qlinear_conv_layer(rng, i, inputs, w, ws, per_channel, wz, inits, **attrs):
    """Layer i of a QLinearConv chain: its random bias and output quantization, its
    initializers appended to inits; returns the node and its (output, scale, zero point)."""
    x, xs, xz = inputs
    cout = w.shape[0]
    b = rng.integers(-3000, 3000, cout).astype(np.int32)
    ys, yz = np.array(rng.uniform(0.02, 0.06), np.float32), np.array(rng.integers(100, 156), np.uint8)
    inits += [nh.from_array(w, f"w{i}"), nh.from_array(ws, f"ws{i}"),
              nh.from_array(np.array(wz, np.int8), f"wz{i}") if not per_channel
              else nh.from_array(np.full(cout, wz, np.int8), f"wz{i}"),
              nh.from_array(b, f"b{i}"), nh.from_array(ys, f"ys{i}"), nh.from_array(yz, f"yz{i}")]
    y = f"q{i + 1}"
    node = h.make_node("QLinearConv", [x, xs, xz, f"w{i}", f"ws{i}", f"wz{i}", f"ys{i}", f"yz{i}", f"b{i}"], [y],
                       **attrs)
    return node, (y, f"ys{i}", f"yz{i}")


def qlinear_depthwise():
    """A chain of QOperator depthwise convolutions (QLinearConv, group == channels) in the
    shapes MobileNets use and a few they do not (dilation, asymmetric pads, a weight zero
    point), between a QuantizeLinear and a DequantizeLinear: tern's own int8 depthwise
    kernel against onnxruntime's."""
    rng = np.random.default_rng(5)
    C = 16
    inits = [nh.from_array(np.array(0.02, np.float32), "xs"), nh.from_array(np.array(128, np.uint8), "xz")]
    nodes = [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q0"])]
    layers = [  # kernel, stride, dilation, pads, per-channel weight scales, weight zero point
        (3, 1, 1, [1, 1, 1, 1], True, 0),
        (3, 2, 1, [1, 1, 1, 1], True, 0),
        (5, 1, 1, [2, 2, 2, 2], False, 0),
        (3, 1, 2, [2, 2, 2, 2], True, 0),
        (3, 2, 1, [0, 0, 1, 1], True, 0),
        (3, 1, 1, [1, 1, 1, 1], False, 3),
    ]
    x, xs, xz = "q0", "xs", "xz"
    for i, (k, s, d, pads, per_channel, wz) in enumerate(layers):
        w = rng.integers(-127, 128, (C, 1, k, k)).astype(np.int8)
        ws = (rng.uniform(0.002, 0.02, C) if per_channel else np.array(0.01)).astype(np.float32)
        node, (x, xs, xz) = qlinear_conv_layer(rng, i, (x, xs, xz), w, ws, per_channel, wz, inits,
                                               group=C, kernel_shape=[k, k], strides=[s, s], dilations=[d, d],
                                               pads=pads)
        nodes.append(node)
    nodes.append(h.make_node("DequantizeLinear", [x, xs, xz], ["y"]))
    g = h.make_graph(nodes, "qlinear_depthwise", [h.make_tensor_value_info("x", T.FLOAT, [1, C, 40, 72])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 13)])


GENERATED["qlinear_depthwise"] = qlinear_depthwise


def qlinear_conv():
    """A chain of QOperator one-group convolutions (QLinearConv, group == 1): pointwise,
    3x3 with padding, stride 2, a dilated 5x5, asymmetric pads, per-tensor and
    per-channel weight scales, and a weight zero point (which tern leaves to tract), on a
    batch of 2: tern's int8 convolution (im2col, tract-linalg's int8 matrix product,
    requantization) against onnxruntime's."""
    rng = np.random.default_rng(9)
    inits = [nh.from_array(np.array(0.02, np.float32), "xs"), nh.from_array(np.array(131, np.uint8), "xz")]
    nodes = [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q0"])]
    layers = [  # out channels, kernel, stride, dilation, pads, per-channel weight scales, weight zero point
        (24, 1, 1, 1, [0, 0, 0, 0], True, 0),
        (32, 3, 1, 1, [1, 1, 1, 1], True, 0),
        (40, 3, 2, 1, [1, 1, 1, 1], False, 0),
        (17, 5, 1, 2, [4, 4, 4, 4], True, 0),
        (33, 3, 2, 1, [0, 1, 1, 0], True, 0),
        (16, 1, 1, 1, [0, 0, 0, 0], False, 2),
    ]
    x, xs, xz, cin = "q0", "xs", "xz", 8
    for i, (cout, k, s, d, pads, per_channel, wz) in enumerate(layers):
        w = rng.integers(-127, 128, (cout, cin, k, k)).astype(np.int8)
        ws = (rng.uniform(0.0005, 0.004, cout) if per_channel else np.array(0.002)).astype(np.float32)
        node, (x, xs, xz) = qlinear_conv_layer(rng, i, (x, xs, xz), w, ws, per_channel, wz, inits,
                                               kernel_shape=[k, k], strides=[s, s], dilations=[d, d], pads=pads)
        nodes.append(node)
        cin = cout
    nodes.append(h.make_node("DequantizeLinear", [x, xs, xz], ["y"]))
    g = h.make_graph(nodes, "qlinear_conv", [h.make_tensor_value_info("x", T.FLOAT, [2, 8, 30, 44])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 13)])


GENERATED["qlinear_conv"] = qlinear_conv
