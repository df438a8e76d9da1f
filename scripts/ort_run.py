"""Runs one model in onnxruntime (CPU provider) on inputs from .npy files and writes its
first output as .npy: the reference a test holds tern's run of the same model to.

usage: ort_run.py MODEL OUT.npy INPUT=FILE.npy ...
"""
import sys

import numpy as np
import onnxruntime as ort

ort.set_default_logger_severity(3)
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
feeds = {k: np.load(v) for k, v in (a.split("=", 1) for a in sys.argv[3:])}
np.save(sys.argv[2], session.run(None, feeds)[0])
