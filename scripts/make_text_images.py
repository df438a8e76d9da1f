"""Renders text-line images for the PP-OCR models: real inputs of the kind they were trained
on, with known answers, made here instead of downloaded.

usage: make_text_images.py OUT_DIR N [SEED]

Writes OUT_DIR/NNN_<angle>.png (angle 0 or 180: the text-direction classifier's two classes)
and OUT_DIR/labels.json {file: {"angle": 0|180, "text": "..."}}. Words are drawn from a fixed
vocabulary with a seeded generator, in dark ink on a light background, with the font size,
position and colours varied a little.
"""
import json
import pathlib
import random
import sys

from PIL import Image, ImageDraw, ImageFont

WORDS = (
    "the quick brown fox jumps over lazy dog tern model edge device inference quantize "
    "battery offline private total invoice date amount paid receipt order number 2026 "
    "12.50 Hello World OCR text line sample 0123456789 station north south coffee"
).split()


def main():
    out, n = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    out.mkdir(parents=True, exist_ok=True)
    labels = {}
    for k in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        size = rng.randint(26, 34)
        font = ImageFont.load_default(size=size)
        left, top, right, bottom = font.getbbox(text)
        w, h = right - left + 16, max(48, bottom - top + 12)
        ink = rng.randint(0, 60)
        paper = rng.randint(200, 255)
        img = Image.new("RGB", (w, h), (paper, paper, paper - rng.randint(0, 20)))
        ImageDraw.Draw(img).text((8 - left, (h - (bottom - top)) // 2 - top), text, font=font, fill=(ink, ink, ink))
        angle = 180 if k % 2 else 0
        if angle:
            img = img.rotate(180)
        name = f"{k:03d}_{angle}.png"
        img.save(out / name)
        labels[name] = {"angle": angle, "text": text}
    (out / "labels.json").write_text(json.dumps(labels, indent=1))


if __name__ == "__main__":
    main()
