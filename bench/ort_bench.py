"""onnxruntime's side of the benchmark: the same measurements `tern bench --json` makes.

usage: ort_bench.py MODEL --threads N --runs N --warmup N --input NAME=FILE.npy ...
Prints one JSON object. Load and cold start exclude the Python interpreter and the
onnxruntime import (an app using the C API pays neither); peak RSS is reported both for the
whole process and as the growth over the pre-load baseline.
"""
import argparse
import json
import resource
import time

import numpy as np
import onnxruntime as ort


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--input", action="append", default=[])
    ap.add_argument("--vary", help="NAME:AXIS=LO..HI, as `tern bench --vary`")
    a = ap.parse_args()
    feeds = {}
    for spec in a.input:
        name, path = spec.split("=", 1)
        feeds[name] = np.load(path)
    ort.set_default_logger_severity(3)
    base_rss = rss_mib()
    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(a.model, opts, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - t0
    sess.run(None, feeds)
    cold = time.perf_counter() - t0
    for _ in range(a.warmup):
        sess.run(None, feeds)
    runs = max(a.runs, 1)
    stream = [feeds] * runs
    if a.vary:
        # The same stream as tern's bench::Vary: run i stretches NAME along AXIS to
        # LO + (37 i mod (HI - LO + 1)), tiling its values, then cropping.
        name, rest = a.vary.split(":", 1)
        axis, rng = rest.split("=", 1)
        lo, hi = map(int, rng.split(".."))
        axis = int(axis)
        x = feeds[name]

        def stretch(size):
            reps = [1] * x.ndim
            reps[axis] = -(-size // x.shape[axis])
            return np.take(np.tile(x, reps), range(size), axis=axis).astype(x.dtype)

        stream = [{**feeds, name: stretch(lo + (i * 37) % (hi - lo + 1))} for i in range(runs)]
    times = []
    for run in stream:
        t = time.perf_counter()
        sess.run(None, run)
        times.append(time.perf_counter() - t)
    total = sum(times)
    times.sort()
    pct = lambda p: times[round((len(times) - 1) * p)] * 1e3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "runtime": f"onnxruntime {ort.__version__}", "threads": a.threads, "runs": len(times),
        "load_ms": load * 1e3, "cold_start_ms": cold * 1e3,
        "median_ms": pct(0.5), "p95_ms": pct(0.95), "p99_ms": pct(0.99), "min_ms": times[0] * 1e3,
        "peak_rss_mib": peak, "rss_growth_mib": peak - base_rss, "total_ms": total * 1e3,
    }))


if __name__ == "__main__":
    main()
