"""tern's own kernels, A/B: each model with tern's kernels (default), with every layer left
to tract (--no-tern-kernels), and through onnxruntime; same inputs, same threads, rounds
alternating the order. Writes target/bench/kernels.json and the section between
<!-- kernels --> markers of BENCHMARKS.md. Run with scripts/bench-kernels.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from driver import log, machine  # noqa: E402
from shapes import model_and_inputs, ort_cmd, rounds, setup, tern_cmd, write_section  # noqa: E402

# tern-quantize's default output (static int8 QDQ, MinMax, per-channel weights), written by
# scripts/quantize-table, timed against its fp32 source on the source's reference inputs.
QUANTIZED = {"ppocr_cls": "cls-minmax", "ppocr_det": "det-minmax", "ppocr_rec": "rec-minmax"}

MODELS = ["qlinear_depthwise", "qlinear_conv", "ppocr_cls_int8_qop", "ppocr_cls_int8_qdq", "ppocr_cls", "ppocr_det", "ppocr_rec"]


def main():
    a = setup()
    rows = []
    for name in MODELS:
        model, inputs = model_and_inputs(name)
        for threads in map(int, a.threads.split(",")):
            cmds = {"tern": tern_cmd(model, inputs, threads, a.runs, 12),
                    "tract": tern_cmd(model, inputs, threads, a.runs, 12, ["--no-tern-kernels"]),
                    "ort": ort_cmd(model, inputs, threads, a.runs, 12)}
            r = rounds(cmds, a.rounds)
            row = {"model": name, "threads": threads, **{f"{k}_median_ms": v["median_ms"] for k, v in r.items()},
                   "kernels": r["tern"]["plans"]["tern_kernels"]}
            log(json.dumps(row))
            rows.append(row)
    out = ROOT / "target" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    f = lambda v: "n/a" if v is None else f"{v:.2f}"
    x = lambda t, o: "n/a" if t is None or not o else f"{t / o:.2f}×"
    lines = [f"Measured on {machine()}, {a.rounds} interleaved rounds × {a.runs} runs, medians (ms).", "",
             "| model | threads | tern kernels | tract only | onnxruntime | tern / tract | tern / ort | layers on tern's kernels |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = ", ".join(f"{n} ×{c}" for n, c in r["kernels"]) or "none"
        lines.append(f"| {r['model']} | {r['threads']} | {f(r['tern_median_ms'])} | {f(r['tract_median_ms'])} | {f(r['ort_median_ms'])} "
                     f"| {x(r['tern_median_ms'], r['tract_median_ms'])} | {x(r['tern_median_ms'], r['ort_median_ms'])} | {k} |")
    lines += quantized_rows(a)
    table = "\n".join(lines) + "\n"
    print(table)
    write_section("kernels", table)


def quantized_rows(a):
    """tern-quantize's output against its fp32 source, through tern and onnxruntime."""
    out = ROOT / "target" / "quantize-table"
    if not all((out / f"{q}.onnx").exists() for q in QUANTIZED.values()):
        log("no tern-quantize outputs in target/quantize-table (run scripts/quantize-table): skipped")
        return []
    f = lambda v: "n/a" if v is None else f"{v:.2f}"
    lines = ["", "tern-quantize's default output (static int8 QDQ, MinMax, per-channel weights, from "
             "scripts/quantize-table) against its fp32 source, on the source's reference inputs:", "",
             "| model | threads | int8 tern | int8 tract only | fp32 tern | int8 speed-up over fp32 | int8 onnxruntime "
             "| fp32 onnxruntime | tern / ort (int8) | layers on tern's kernels |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for base, q in QUANTIZED.items():
        fp32, inputs = model_and_inputs(base)
        int8 = out / f"{q}.onnx"
        for threads in map(int, a.threads.split(",")):
            cmds = {"int8": tern_cmd(int8, inputs, threads, a.runs, 12),
                    "tract": tern_cmd(int8, inputs, threads, a.runs, 12, ["--no-tern-kernels"]),
                    "fp32": tern_cmd(fp32, inputs, threads, a.runs, 12),
                    "ort_int8": ort_cmd(int8, inputs, threads, a.runs, 12),
                    "ort_fp32": ort_cmd(fp32, inputs, threads, a.runs, 12)}
            r = {k: v["median_ms"] for k, v in rounds(cmds, a.rounds).items()}
            log(json.dumps({"model": base, "threads": threads, **r}))
            k = ", ".join(f"{n} ×{c}" for n, c in rounds_kernels(int8, inputs, threads)) or "none"
            lines.append(f"| {base} | {threads} | {f(r['int8'])} | {f(r['tract'])} | {f(r['fp32'])} "
                         f"| {r['fp32'] / r['int8']:.2f}× | {f(r['ort_int8'])} | {f(r['ort_fp32'])} "
                         f"| {r['int8'] / r['ort_int8']:.2f}× | {k} |")
    return lines


def rounds_kernels(model, inputs, threads):
    """The rewrites tern's plan for the model used."""
    return rounds({"tern": tern_cmd(model, inputs, threads, 1, 1)}, 1)["tern"]["plans"]["tern_kernels"]


if __name__ == "__main__":
    main()
