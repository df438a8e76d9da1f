"""Dynamic shapes, tern vs onnxruntime: what a symbolic input costs, and streams of shapes.

1. A model with a symbolic batch (dwnet_dynbatch, generated) run at one shape: tern under
   each --shape-policy and with the shape pinned, against onnxruntime, same input, same
   threads. The default (measure) should run at the pinned speed.
2. Streams of changing shapes (`--vary`): after a warm-up at the reference shape, 100 timed
   runs that each stretch one axis to a new size (every size once). Totals and p99, since
   a per-shape plan costs a compilation the stream pays.

Rounds alternate the two runtimes. Writes target/bench/shapes.json and the section between
<!-- shapes --> markers of BENCHMARKS.md. Run with scripts/bench-shapes.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from driver import CACHE, TERN, log, machine, median, run_json  # noqa: E402

# (model, input axis to vary, range, runs): a stream of shapes through a model.
STREAMS = [
    ("ppocr_rec", "x:3=100..400", 100),
    ("dwnet_dynbatch", "x:0=1..16", 48),
]


def model_and_inputs(name):
    d = CACHE / "models" / name
    entry = next(e for e in json.loads((CACHE / "models" / "manifest.json").read_text()) if e["name"] == name)
    return d / "model.onnx", {n: d / "ref" / f"input.{n}.npy" for n in entry["inputs"]}


def tern_cmd(model, inputs, threads, runs, warmup, extra=()):
    return [TERN, "bench", model, "--json", "--threads", str(threads), "--runs", str(runs), "--warmup",
            str(warmup), "--backend", "cpu", "--allow-nan", *[f"--input={n}={p}" for n, p in inputs.items()], *extra]


def ort_cmd(model, inputs, threads, runs, warmup, extra=()):
    return [sys.executable, ROOT / "bench" / "ort_bench.py", model, "--threads", str(threads), "--runs", str(runs),
            "--warmup", str(warmup), *[f"--input={n}={p}" for n, p in inputs.items()], *extra]


def rounds(cmds, n):
    """Runs each named command n times, alternating their order; medians of every field."""
    out = {k: [] for k in cmds}
    names = list(cmds)
    for r in range(n):
        for k in (names if r % 2 == 0 else names[::-1]):
            out[k].append(run_json(cmds[k]))
    return {k: {f: median([x.get(f) for x in v]) if not isinstance(v[0].get(f), (dict, str, list)) else v[-1].get(f)
                for f in v[0]} for k, v in out.items()}


def write_section(marker, table):
    """Replaces BENCHMARKS.md's text between <!-- marker --> and <!-- /marker -->."""
    doc = ROOT / "BENCHMARKS.md"
    text = doc.read_text()
    s, e = text.find(f"<!-- {marker} -->"), text.find(f"<!-- /{marker} -->")
    if s >= 0 and e > s:
        doc.write_text(text[: s + len(f"<!-- {marker} -->\n")] + table + text[e:])


def setup():
    """The focused benches' options (--rounds, --runs, --threads), and the release CLI built
    unless TERN_BENCH_NO_BUILD says to time the binary as it is."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", default="1,2")
    a = ap.parse_args()
    if not os.environ.get("TERN_BENCH_NO_BUILD"):
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "tern-cli"], cwd=ROOT, check=True)
    return a


def main():
    a = setup()
    result = {"machine": machine(), "policies": [], "streams": []}
    model, inputs = model_and_inputs("dwnet_dynbatch")
    import numpy as np
    shape = list(np.load(inputs["x"]).shape)
    pin = ["--pin", "x=" + ",".join(map(str, shape))]
    for threads in map(int, a.threads.split(",")):
        cmds = {
            "measure": tern_cmd(model, inputs, threads, a.runs, 12),
            "symbolic": tern_cmd(model, inputs, threads, a.runs, 12, ["--shape-policy", "symbolic"]),
            "pinned": tern_cmd(model, inputs, threads, a.runs, 12, pin),
            "ort": ort_cmd(model, inputs, threads, a.runs, 12),
        }
        r = rounds(cmds, a.rounds)
        row = {"model": "dwnet_dynbatch", "shape": shape, "threads": threads,
               **{f"{k}_median_ms": v["median_ms"] for k, v in r.items()},
               **{f"{k}_cold_start_ms": v["cold_start_ms"] for k, v in r.items()},
               "measure_plans": r["measure"]["plans"]}
        log(json.dumps(row))
        result["policies"].append(row)
    for name, vary, runs in STREAMS:
        model, inputs = model_and_inputs(name)
        for threads in map(int, a.threads.split(",")):
            cmds = {"tern": tern_cmd(model, inputs, threads, runs, 12, ["--vary", vary]),
                    "ort": ort_cmd(model, inputs, threads, runs, 12, ["--vary", vary])}
            r = rounds(cmds, a.rounds)
            row = {"model": name, "vary": vary, "runs": runs, "threads": threads,
                   **{f"{k}_{m}": r[k][m] for k in cmds for m in ("total_ms", "median_ms", "p99_ms")},
                   "tern_plans": r["tern"]["plans"]}
            log(json.dumps(row))
            result["streams"].append(row)
    out = ROOT / "target" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "shapes.json").write_text(json.dumps(result, indent=1))
    table = render(result, a)
    print(table)
    write_section("shapes", table)


def render(result, a):
    f = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"
    x = lambda t, o: "n/a" if t is None or not o else f"{t / o:.2f}×"
    lines = [f"Measured on {result['machine']}, {a.rounds} interleaved rounds; ratios are tern / onnxruntime.", "",
             "| model (symbolic batch) | threads | measure (default) ms | symbolic ms | pinned ms | onnxruntime ms | default / ort | symbolic / ort | default cold start ms (ort) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["policies"]:
        lines.append(f"| {r['model']} {r['shape']} | {r['threads']} | {f(r['measure_median_ms'])} | {f(r['symbolic_median_ms'])} "
                     f"| {f(r['pinned_median_ms'])} | {f(r['ort_median_ms'])} | {x(r['measure_median_ms'], r['ort_median_ms'])} "
                     f"| {x(r['symbolic_median_ms'], r['ort_median_ms'])} | {f(r['measure_cold_start_ms'], 1)} ({f(r['ort_cold_start_ms'], 1)}) |")
    lines += ["", "| stream | runs | threads | total ms (tern / ort) | ratio | p99 ms (tern / ort) | ratio | tern's plans at the end |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["streams"]:
        p = r["tern_plans"]
        lines.append(f"| {r['model']} {r['vary']} | {r['runs']} | {r['threads']} | {f(r['tern_total_ms'], 0)} / {f(r['ort_total_ms'], 0)} "
                     f"| {x(r['tern_total_ms'], r['ort_total_ms'])} | {f(r['tern_p99_ms'])} / {f(r['ort_p99_ms'])} "
                     f"| {x(r['tern_p99_ms'], r['ort_p99_ms'])} | {p['specialisation']}, {len(p['concrete'])} shape plan(s) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
