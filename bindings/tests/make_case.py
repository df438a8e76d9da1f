"""Writes the binding tests' shared case: magika's seeded input (int32) and onnxruntime's
output (float32) from scripts/fetch-models, as raw little-endian files both languages read
without a parser: input.bin, expected.bin, shape.txt ("2 2048 214")."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from tern_paths import CACHE  # noqa: E402

ref = CACHE / "models" / "magika" / "ref"
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
x = np.load(ref / "input.bytes.npy").astype("<i4")
y = np.load(ref / "output.target_label.npy").astype("<f4")
(out / "input.bin").write_bytes(x.tobytes())
(out / "expected.bin").write_bytes(y.tobytes())
(out / "shape.txt").write_text(f"{x.shape[0]} {x.shape[1]} {y.shape[1]}")

# The streaming case: silero VAD (LSTM sequence form) over the first frames of the audio
# fixture (scripts/audio-fixture), with onnxruntime's frame-by-frame probabilities.
FRAMES = 24
audio = CACHE / "audio"
samples = np.fromfile(audio / "speech.f32", dtype="<f4")[: FRAMES * 512]
probs = np.load(audio / "speech_probs.npy").astype("<f4")[:FRAMES]
(out / "stream_samples.bin").write_bytes(samples.tobytes())
(out / "stream_probs.bin").write_bytes(probs.tobytes())
(out / "vad_model.txt").write_text(str(CACHE / "models" / "silero_vad_lstm" / "model.onnx"))
