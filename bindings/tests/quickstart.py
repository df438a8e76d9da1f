"""The README's Python quick start: name the content type of files with magika, as
`tern identify` does (scripts/test-bindings runs it from the installed wheel, type-checks it
with mypy --strict against the wheel's stubs, and compares its answers with the CLI's).

usage: quickstart.py MAGIKA_DIR FILE...   (MAGIKA_DIR: model.onnx and config.min.json)
"""
import json
import sys
from pathlib import Path
from typing import Any

import tern


def features(data: bytes, cfg: dict[str, Any]) -> list[int]:
    """magika's input: the first and last bytes, whitespace stripped, padded to fixed widths."""
    block = min(cfg["block_size"], len(data))
    head = data[:block].lstrip(b" \t\n\x0c\r")
    tail = data[len(data) - block :].rstrip(b" \t\n\x0c\r")
    beg, end = list(head[: cfg["beg_size"]]), list(tail[len(tail) - min(len(tail), cfg["end_size"]) :])
    pad = cfg["padding_token"]
    return beg + [pad] * (cfg["beg_size"] - len(beg)) + [pad] * (cfg["end_size"] - len(end)) + end


def main() -> None:
    model_dir, files = Path(sys.argv[1]), sys.argv[2:]
    cfg = json.loads((model_dir / "config.min.json").read_text())
    model = tern.TernModel.from_path(str(model_dir / "model.onnx"))
    session = tern.TernSession(model, tern.SessionConfig(backend=tern.Backend.CPU, threads=1))
    answers = []
    for path in files:
        x = tern.tensor_i32("bytes", [1, 2048], features(Path(path).read_bytes(), cfg))
        probs = tern.tensor_to_f32(session.run([x])[0])
        best = max(range(len(probs)), key=probs.__getitem__)
        answers.append({"path": path, "model_label": cfg["target_labels_space"][best], "score": probs[best]})
    print(json.dumps(answers, indent=2))


if __name__ == "__main__":
    main()
