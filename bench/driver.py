"""tern vs onnxruntime on every fetched model: latency, cold start, memory, throughput, size.

Both runtimes run as separate processes on the same model file, the same .npy inputs (the
seeded references from scripts/fetch-models) and the same thread count, and alternate
round by round so that machine drift hits both alike. Each figure is the median over rounds.
Writes target/bench/results.json and BENCHMARKS.md. Run with scripts/bench.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from tern_paths import CACHE, ROOT  # noqa: E402
TERN = ROOT / "target" / "release" / "tern"
METRICS = ["median_ms", "p95_ms", "p99_ms", "cold_start_ms", "rss_growth_mib"]


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def run_json(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: {out.stderr.strip() or out.stdout.strip()}")
    return json.loads(out.stdout)


def measure(model, inputs, threads, runs, warmup):
    flags = [f"--input={n}={p}" for n, p in inputs.items()]
    tern = [TERN, "bench", model, "--json", "--threads", str(threads), "--runs", str(runs),
            "--warmup", str(warmup), "--backend", "cpu", "--allow-nan"] + flags
    ort = [sys.executable, ROOT / "bench" / "ort_bench.py", model, "--threads", str(threads),
           "--runs", str(runs), "--warmup", str(warmup)] + flags
    return {"tern": tern, "ort": ort}


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def batched_inputs(inputs, batch, tmp):
    """Inputs repeated to `batch` along axis 0, when every input has a batch axis."""
    out = {}
    for name, path in inputs.items():
        a = np.load(path)
        if a.ndim == 0:
            return None
        reps = -(-batch // a.shape[0])
        out[name] = Path(tmp) / f"{name}.b{batch}.npy"
        np.save(out[name], np.concatenate([a] * reps, axis=0)[:batch])
    return out


def machine():
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=30)
    # 12: tern's multi-thread sessions time their first 12 runs to choose threads or not.
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--models", default="")
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    log("building release binaries")
    if not os.environ.get("TERN_BENCH_NO_BUILD"):  # set it to time the binary as built
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "tern-cli", "-p", "tern-examples"], cwd=ROOT, check=True)
    manifest = json.loads((CACHE / "models" / "manifest.json").read_text())
    wanted = set(filter(None, a.models.split(",")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in manifest:
            if entry["expect"] != "pass" or (wanted and entry["name"] not in wanted):
                continue
            d = CACHE / "models" / entry["name"]
            model = d / "model.onnx"
            inputs = {n: d / "ref" / f"input.{n}.npy" for n in entry["inputs"]}
            for threads in map(int, a.threads.split(",")):
                cmds = measure(model, inputs, threads, a.runs, a.warmup)
                results = {"tern": [], "ort": []}
                for r in range(a.rounds):
                    for side in (["tern", "ort"] if r % 2 == 0 else ["ort", "tern"]):
                        try:
                            results[side].append(run_json(cmds[side]))
                        except RuntimeError as e:
                            log(f"{entry['name']} {side}: {e}")
                row = {"model": entry["name"], "threads": threads}
                for side in ("tern", "ort"):
                    for m in METRICS:
                        row[f"{side}_{m}"] = median([x.get(m) for x in results[side]])
                if a.batch > 1 and entry["name"] != "silero_vad_lstm":
                    b_inputs = batched_inputs(inputs, a.batch, tmp)
                    if b_inputs:
                        bc = measure(model, b_inputs, threads, max(a.runs // 3, 5), a.warmup)
                        for side in ("tern", "ort"):
                            try:
                                ms = median([run_json(bc[side])["median_ms"] for _ in range(a.rounds)])
                                row[f"{side}_batch_items_per_s"] = a.batch * 1e3 / ms
                            except RuntimeError as e:
                                log(f"{entry['name']} batch {side}: {e}")
                log(json.dumps(row))
                rows.append(row)
    sizes = {
        "tern_cli_stripped_bytes": TERN.stat().st_size,
        "minimal_program_bytes": (ROOT / "target" / "release" / "minimal").stat().st_size,
    }
    out = ROOT / "target" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "rows": rows, "sizes": sizes,
              "ort_version": run_json([sys.executable, "-c", "import json, onnxruntime; print(json.dumps(onnxruntime.__version__))"])}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    table = render(result, a)
    print(table)
    doc = ROOT / "BENCHMARKS.md"
    text = doc.read_text() if doc.exists() else "<!-- bench -->\n<!-- /bench -->\n"
    s, e = text.find("<!-- bench -->"), text.find("<!-- /bench -->")
    if s >= 0 and e > s:
        doc.write_text(text[: s + len("<!-- bench -->\n")] + table + text[e:])


def ratio(row, m):
    t, o = row.get(f"tern_{m}"), row.get(f"ort_{m}")
    if t is None or o is None or o == 0:
        return "n/a"
    return f"{t / o:.2f}×"


def render(result, a):
    lines = [
        f"Measured {result['rows'] and 'on ' + result['machine']}, onnxruntime {result['ort_version']} "
        f"(CPU provider, sequential, same thread count), {a.rounds} interleaved rounds × {a.runs} runs. "
        "Ratios are tern / onnxruntime: below 1.00× tern is faster, smaller or leaner.",
        "",
        "| model | threads | median ms (tern / ort) | ratio | p95 ratio | cold start ms (tern / ort) | ratio | RSS growth MiB (tern / ort) | ratio | batch-8 items/s (tern / ort) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['threads']} | {f(r['tern_median_ms'])} / {f(r['ort_median_ms'])} | {ratio(r, 'median_ms')} "
            f"| {ratio(r, 'p95_ms')} | {f(r['tern_cold_start_ms'], 1)} / {f(r['ort_cold_start_ms'], 1)} | {ratio(r, 'cold_start_ms')} "
            f"| {f(r['tern_rss_growth_mib'], 1)} / {f(r['ort_rss_growth_mib'], 1)} | {ratio(r, 'rss_growth_mib')} "
            f"| {f(r.get('tern_batch_items_per_s'), 0)} / {f(r.get('ort_batch_items_per_s'), 0)} |"
        )
    # The quantized models against their fp32 source, each engine against itself.
    by = {(r["model"], r["threads"]): r for r in result["rows"]}
    twins = [(r, by.get((r["model"].split("_int8")[0], r["threads"]))) for r in result["rows"] if "_int8" in r["model"]]
    twins = [(q, f) for q, f in twins if f is not None]
    if twins:
        speed = lambda q, f, side: ("n/a" if not (q.get(f"{side}_median_ms") and f.get(f"{side}_median_ms"))
                                    else f"{f[f'{side}_median_ms'] / q[f'{side}_median_ms']:.2f}×")
        lines += ["", "Quantized models against their fp32 source (each engine against itself; above 1.00× the int8 "
                  "model is faster):", "",
                  "| int8 model | threads | tern: fp32 ms / int8 ms | tern speed-up | onnxruntime speed-up |",
                  "|---|---|---|---|---|"]
        for q, fp in twins:
            lines.append(f"| {q['model']} | {q['threads']} | {f(fp['tern_median_ms'])} / {f(q['tern_median_ms'])} "
                         f"| {speed(q, fp, 'tern')} | {speed(q, fp, 'ort')} |")
    s = result["sizes"]
    lines += ["", f"Stripped `tern` CLI (with the embedded 3 MB model): {s['tern_cli_stripped_bytes'] / 1e6:.1f} MB. "
              f"A minimal program that only links `tern`: {s['minimal_program_bytes'] / 1e6:.1f} MB.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
