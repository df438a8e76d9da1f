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

MODELS = ["qlinear_depthwise", "qlinear_conv", "ppocr_cls_int8_qop", "ppocr_cls_int8_qdq", "ppocr_cls"]


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
    table = "\n".join(lines) + "\n"
    print(table)
    write_section("kernels", table)


if __name__ == "__main__":
    main()
