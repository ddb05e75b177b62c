"""Synthetic captioned images in the Kaggle Flickr30k layout, for the demo and tests.

Each image has one coloured shape of a given size at one of nine positions on a light or
dark background; its five captions are drawn from varied templates and are all true.
"""
from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (235, 210, 20), "purple": (140, 40, 170), "orange": (245, 130, 20),
}
SHAPES = ["circle", "square", "triangle"]
SIZES = {"small": 0.14, "large": 0.28}  # half-extent as a fraction of the image side
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
BACKGROUNDS = {"white": (235, 235, 235), "black": (25, 25, 25)}
POSITIONS = {  # name -> (x, y) centre as fractions, and phrases
    "top left": ((0.25, 0.25), ["in the top left corner", "at the top left"]),
    "top": ((0.5, 0.25), ["at the top", "near the top"]),
    "top right": ((0.75, 0.25), ["in the top right corner", "at the top right"]),
    "left": ((0.25, 0.5), ["on the left", "on the left side"]),
    "center": ((0.5, 0.5), ["in the center", "in the middle"]),
    "right": ((0.75, 0.5), ["on the right", "on the right side"]),
    "bottom left": ((0.25, 0.75), ["in the bottom left corner", "at the bottom left"]),
    "bottom": ((0.5, 0.75), ["at the bottom", "near the bottom"]),
    "bottom right": ((0.75, 0.75), ["in the bottom right corner", "at the bottom right"]),
}
TEMPLATES = [
    "a {size} {color} {shape} {pos}",
    "a {color} {shape} {pos} on a {bg} background",
    "there is a {size} {color} {shape} {pos}",
    "a {size} {color} {shape} on a {bg} background",
    "the picture shows a {color} {shape} {pos}",
    "a {bg} image with a {size} {color} {shape} {pos}",
    "one {size} {color} {shape} {pos} of the image",
]


def draw_scene(rng: random.Random, side: int = 128):
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    size, bg, pos = rng.choice(list(SIZES)), rng.choice(list(BACKGROUNDS)), rng.choice(list(POSITIONS))
    jitter = lambda c: tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in c)  # noqa: E731
    img = Image.new("RGB", (side, side), jitter(BACKGROUNDS[bg]))
    d = ImageDraw.Draw(img)
    (fx, fy), _ = POSITIONS[pos]
    cx = (fx + rng.uniform(-0.05, 0.05)) * side
    cy = (fy + rng.uniform(-0.05, 0.05)) * side
    r = SIZES[size] * side * rng.uniform(0.85, 1.15) * (0.8 if size == "large" else 1.0)
    fill = jitter(COLORS[color])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    return img, dict(color=color, shape=shape, size=size, bg=bg, pos=pos)


def captions_for(attrs: dict, rng: random.Random, n: int = 5) -> list[str]:
    out = []
    for tpl in rng.sample(TEMPLATES, n):
        text = tpl.format(size=rng.choice(SIZE_WORDS[attrs["size"]]), color=attrs["color"], shape=attrs["shape"],
                          bg=attrs["bg"], pos=rng.choice(POSITIONS[attrs["pos"]][1]))
        text = re.sub(r"\ba ([aeiou])", r"an \1", text)  # "an orange triangle", "an image"
        out.append(text[0].upper() + text[1:] + " .")  # Flickr30k style: capitalised, " ." at the end
    return out


def generate(out_dir: str | Path, images: int = 1000, seed: int = 0, side: int = 128,
             progress: bool = True, layout: str = "flickr30k") -> Path:
    """Write the images and their captions in one of the layouts `captioner` reads:
    flickr30k: `flickr30k_images/*.jpg` + `results.csv` (Kaggle: `image_name| comment_number|
    comment`, with the file's stray spaces); imagefolder: `*.jpg` + `metadata.jsonl` (Hugging
    Face ImageFolder: one object per image, `file_name` and `text`, here a list of captions);
    csv: `images/*.jpg` + `captions.csv` (header `image,caption`, one caption a row)."""
    if layout not in ("flickr30k", "imagefolder", "csv"):
        raise ValueError(f"unknown layout {layout!r} (flickr30k|imagefolder|csv)")
    out = Path(out_dir)
    img_dir = {"flickr30k": out / "flickr30k_images", "imagefolder": out, "csv": out / "images"}[layout]
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in tqdm(range(images), desc="generate", unit="img", disable=not progress):
        img, attrs = draw_scene(rng, side)
        name = f"{1000000 + seed * 100000 + i}.jpg"
        img.save(img_dir / name, quality=90)
        for j, cap in enumerate(captions_for(attrs, rng)):
            rows.append((name, j, cap))
    if layout == "imagefolder":
        per_image: dict[str, list[str]] = {}
        for name, _, cap in rows:
            per_image.setdefault(name, []).append(cap)
        with open(out / "metadata.jsonl", "w") as f:
            f.writelines(json.dumps({"file_name": n, "text": caps}) + "\n" for n, caps in per_image.items())
    elif layout == "csv":
        with open(out / "captions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            w.writerows((f"images/{name}", cap) for name, _, cap in rows)
    else:
        with open(out / "results.csv", "w", newline="") as f:
            f.write("image_name| comment_number| comment\n")
            for name, j, cap in rows:
                f.write(f"{name}| {j}| {cap}\n")
    return out


def parse_attributes(caption: str) -> dict:
    """Read color / shape / size / position back out of a caption (None where absent)."""
    c = " " + " ".join(caption.lower().replace(".", " ").split()) + " "
    out = {"color": next((k for k in COLORS if f" {k} " in c), None),
           "shape": next((k for k in SHAPES if f" {k} " in c), None),
           "size": next((k for k, words in SIZE_WORDS.items() if any(f" {w} " in c for w in words)), None),
           "position": None}
    for key, (_, phrases) in sorted(POSITIONS.items(), key=lambda kv: -max(len(p) for p in kv[1][1])):
        if any(f" {p} " in c for p in phrases):
            out["position"] = key
            break
    return out


def attribute_accuracy(refs: dict[str, list[str]], hyps: dict[str, str]) -> dict[str, float]:
    """Share of generated captions that state each attribute correctly (truth read from the
    references); an attribute a caption leaves out counts as wrong."""
    hits = {k: 0 for k in ("color", "shape", "size", "position")}
    for img, hyp in hyps.items():
        truth: dict = {}
        for r in refs[img]:
            for k, v in parse_attributes(r).items():
                if v is not None:
                    truth.setdefault(k, v)
        got = parse_attributes(hyp)
        for k in hits:
            hits[k] += int(got[k] is not None and got[k] == truth.get(k))
    return {k: v / max(1, len(hyps)) for k, v in hits.items()}
