"""Writes the streaming suite's audio and its onnxruntime reference into $TERN_CACHE/audio:

- speech.wav / speech.f32: 1.5 s of silence, espeak-ng reading a sentence, 1.5 s of silence,
  all at 16 kHz mono with white noise at -40 dBFS mixed in (sox); .f32 is the raw
  little-endian float32 samples (what `sox … -t f32 -` pipes into `tern stream`).
- speech_probs.npy: silero_vad_lstm's speech probability per 512-sample frame, run by
  onnxruntime one frame at a time with the h/c state carried and each frame prefixed by the
  previous frame's last 64 samples (zeros first) — the framing of silero-vad's own
  sequence_vad.frame_blocks — the last frame zero-padded.
"""
import os
import pathlib
import subprocess
import tempfile

import numpy as np
import onnxruntime as ort

CACHE = pathlib.Path(os.environ.get("TERN_CACHE", pathlib.Path.home() / ".cache" / "tern"))
OUT = CACHE / "audio"
MODEL = CACHE / "models" / "silero_vad_lstm" / "model.onnx"
TEXT = "Tern runs models on the device. Private audio never leaves the phone."
FRAME, CONTEXT = 512, 64


def run(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def synthesise():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        run("espeak-ng", "-v", "en", "-s", "150", "-w", str(tmp / "raw.wav"), TEXT)
        # 16 kHz mono, 1.5 s of silence before and after.
        run("sox", str(tmp / "raw.wav"), "-r", "16000", "-c", "1", "-b", "16",
            str(tmp / "speech.wav"), "pad", "1.5", "1.5")
        seconds = float(subprocess.run(["soxi", "-D", str(tmp / "speech.wav")], check=True,
                                       capture_output=True, text=True).stdout)
        run("sox", "-n", "-r", "16000", "-c", "1", "-b", "16", str(tmp / "noise.wav"),
            "synth", f"{seconds}", "whitenoise", "vol", "0.01")
        run("sox", "-m", str(tmp / "speech.wav"), str(tmp / "noise.wav"), str(OUT / "speech.wav"))
        run("sox", str(OUT / "speech.wav"), "-t", "f32", str(OUT / "speech.f32"))


def reference(samples):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])
    frames = (samples.size + FRAME - 1) // FRAME
    padded = np.zeros(frames * FRAME, dtype=np.float32)
    padded[: samples.size] = samples
    h = np.zeros((1, 1, 128), dtype=np.float32)
    c = np.zeros((1, 1, 128), dtype=np.float32)
    context = np.zeros(CONTEXT, dtype=np.float32)
    probs = []
    for i in range(frames):
        frame = padded[i * FRAME:(i + 1) * FRAME]
        window = np.concatenate([context, frame])[None, :]
        p, h, c = session.run(["speech_probs", "hn", "cn"], {"input": window, "h": h, "c": c})
        probs.append(float(np.asarray(p).reshape(-1)[0]))
        context = frame[-CONTEXT:].copy()
    return np.asarray(probs, dtype=np.float32)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    done = OUT / "speech_probs.npy"
    if done.exists() and (OUT / "speech.f32").exists():
        return
    synthesise()
    samples = np.fromfile(OUT / "speech.f32", dtype="<f4")
    probs = reference(samples)
    np.save(done, probs)
    print(f"[audio-fixture] {samples.size / 16000:.2f} s of audio, {probs.size} frames, "
          f"{int((probs > 0.5).sum())} with speech (onnxruntime {ort.__version__})")


if __name__ == "__main__":
    main()
