"""Deterministic synthetic image–caption data for the CLIP tests, assets and demo: shapes × colours × positions.

Every image is one coloured shape (circle, square, triangle, cross) in one of four colours, placed in the left,
right, top or bottom part of a small noisy canvas, with random size and jitter. Each image has several captions
from different templates (so "one random caption per image per epoch" has something to choose from). Zero-shot
classes are the 16 colour–shape combinations ("red circle"), with the prompt template "a photo of a {}.".

Everything is drawn from ``random.Random(seed)``: the same seed gives the same pixels and captions on any machine.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
POSITIONS = ("left", "right", "top", "bottom")
CAPTION_TEMPLATES = (
    "a {colour} {shape} on the {position}",
    "a photo of a {colour} {shape}.",
    "{colour} {shape} at the {position}",
    "the {shape} is {colour}",
)
ZEROSHOT_TEMPLATES = ("a photo of a {}.",)


@dataclass(frozen=True)
class ShapeSample:
    shape: str
    colour: str
    position: str
    seed: int

    @property
    def classname(self) -> str:
        return f"{self.colour} {self.shape}"

    def captions(self) -> list[str]:
        return [t.format(colour=self.colour, shape=self.shape, position=self.position) for t in CAPTION_TEMPLATES]


def render(sample: ShapeSample, size: int = 32) -> Image.Image:
    """Draw one sample (RGB, ``size × size``)."""
    rng = random.Random(sample.seed)
    base = rng.randint(200, 245)
    img = Image.new("RGB", (size, size), (base, base, base))
    px = img.load()
    for _ in range(size * size // 8):  # sparse grey noise so images are not piecewise constant
        x, y, v = rng.randrange(size), rng.randrange(size), rng.randint(170, 255)
        px[x, y] = (v, v, v)
    r = rng.uniform(0.13, 0.2) * size
    half = size / 2
    centres = {"left": (half / 2, half), "right": (half * 1.5, half), "top": (half, half / 2),
               "bottom": (half, half * 1.5)}
    cx, cy = centres[sample.position]
    cx += rng.uniform(-0.06, 0.06) * size
    cy += rng.uniform(-0.06, 0.06) * size
    colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[sample.colour])
    draw = ImageDraw.Draw(img)
    box = (cx - r, cy - r, cx + r, cy + r)
    if sample.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif sample.shape == "square":
        draw.rectangle(box, fill=colour)
    elif sample.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        w = r / 2.5
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    return img


def make_samples(n: int, seed: int = 0) -> list[ShapeSample]:
    """``n`` samples cycling through all 64 combinations in a seeded order (balanced classes)."""
    rng = random.Random(seed)
    combos = [(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]
    out: list[ShapeSample] = []
    while len(out) < n:
        rng.shuffle(combos)
        out += [ShapeSample(s, c, p, rng.randrange(2**31)) for s, c, p in combos[: n - len(out)]]
    return out


def write_pairs(out_dir: str | Path, n: int, *, seed: int = 0, size: int = 32, name: str = "pairs",
                captions_per_image: int = len(CAPTION_TEMPLATES)) -> Path:
    """Write ``n`` PNGs under ``out_dir/images/`` and ``out_dir/{name}.jsonl`` rows
    ``{"image": "images/x.png", "caption": [...], "label": "red circle"}``; returns the jsonl path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, s in enumerate(make_samples(n, seed)):
        rel = f"images/{name}_{i:05d}.png"
        render(s, size).save(out / rel, optimize=True)
        caps = s.captions()[:captions_per_image]
        lines.append(json.dumps({"image": rel, "caption": caps, "label": s.classname}))
    path = out / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_zeroshot(out_dir: str | Path, per_class: int, *, seed: int = 0, size: int = 32) -> Path:
    """A zero-shot set: ``out_dir/<colour>_<shape>/k.png`` for the 16 classes, ``classnames.txt`` (one name per
    line, in sorted folder order) and ``templates.txt``; returns ``out_dir``."""
    out = Path(out_dir)
    rng = random.Random(seed)
    classes = sorted((c, s) for s in SHAPES for c in COLOURS)
    for colour, shape in classes:
        folder = out / f"{colour}_{shape}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            sample = ShapeSample(shape, colour, rng.choice(POSITIONS), rng.randrange(2**31))
            render(sample, size).save(folder / f"{k:03d}.png", optimize=True)
    (out / "classnames.txt").write_text("".join(f"{c} {s}\n" for c, s in classes))
    (out / "templates.txt").write_text("".join(f"{t}\n" for t in ZEROSHOT_TEMPLATES))
    return out
