"""Runs two models in onnxruntime on the same seeded random inputs and prints the cosine
similarity of their first outputs: proof that a tern-quantize output is valid ONNX that
onnxruntime runs, and how close it stays to the original there.

usage: ort_compare.py ORIGINAL TRANSFORMED [SYMBOL=N | INPUT=FILE.npy] ...

An INPUT=FILE.npy argument feeds that input from the file instead of random values.
"""
import json
import sys

import numpy as np
import onnxruntime as ort

ort.set_default_logger_severity(3)
a = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
b = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
args = dict(kv.split("=", 1) for kv in sys.argv[3:])
files = {k: v for k, v in args.items() if v.endswith(".npy")}
dims = {k: v for k, v in args.items() if k not in files}
rng = np.random.default_rng(0)
feeds = {}
for i in a.get_inputs():
    if i.name in files:
        feeds[i.name] = np.load(files[i.name])
        continue
    # A dimension without a name is known to tern as <input>_d<axis>; onnxruntime shows it
    # as None or "?".
    shape = [
        d if isinstance(d, int) else int(dims.get(str(d), dims.get(f"{i.name}_d{axis}", 1)))
        for axis, d in enumerate(i.shape)
    ]
    feeds[i.name] = rng.random(shape, dtype=np.float32)
x, y = a.run(None, feeds)[0].ravel(), b.run(None, feeds)[0].ravel()
print(json.dumps({"cosine": float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))}))
