"""Synthetic coloured shapes: deterministic images with captions, a programmatic reward, and reward-ranked pairs.

Each image is one filled shape (circle, square or triangle) of a *shape colour* on a plain *background colour*,
captioned ``"a red circle on a black background"``. Shapes are anti-aliased (4× supersampling), slightly
jittered in size and position, and always cover the central disc and never reach the outer frame, so the
reward below can read the two colours without locating the shape.

Reward (:func:`reward`), in [0, 1], higher is better: **caption colour agreement**::

    r = 1 − ½·[ mean_{centre disc} ‖x − c_shape‖ + mean_{outer frame} ‖x − c_background‖ ] / √3

with pixels in RGB [0, 1] and ``c_*`` the colours the caption names. A perfect rendering scores ≈ 1; a
wrong shape colour costs up to ½; blur, washed-out colours and speckle noise all lower it. It is a proxy for a
text–image preference model (PickScore-like: does the image show what the prompt asks for), with no
ambiguity about which of two samples is better, so an improvement after DPO is unambiguous.

Pairs (:func:`rank_pairs`): several samples per prompt from a generator, ranked by the reward; chosen = the
best, rejected = the worst (or every pair above a margin), as in reward-ranked self-generated preference data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# Re-exported: the demos and tests reach the ranker and the jsonl writer through this module.
from .pairs import write_jsonl  # noqa: F401
from .ranking import RankedPair, rank_pairs  # noqa: F401

SHAPES = ("circle", "square", "triangle")
SHAPE_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.15),
}
# Disjoint from the shape colours, so the two regions of the reward never ask for the same colour.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
}
# Geometry as fractions of the image side. The central disc (radius CENTRE) plus the largest jitter stays
# inside the smallest shape (a triangle's inradius is half its circumradius), and the largest shape plus
# jitter stays inside the frame (FRAME wide), which the reward relies on.
RADIUS = (0.30, 0.36)
JITTER = 0.03
CENTRE = 0.09
FRAME = 0.10
FADE = 0.75  # faded images keep 25 % of their contrast
_SUPERSAMPLE = 4
_CAPTION = re.compile(r"^an? (\w+) (\w+) on an? (\w+) background$")


@dataclass(frozen=True)
class ShapeSample:
    """One synthetic image: ``image`` is ``[H, W, 3]`` uint8; the attributes are what the caption says."""

    caption: str
    image: np.ndarray
    shape: str
    color: str
    background: str


def caption_for(shape: str, color: str, background: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    bg_article = "an" if background[0] in "aeiou" else "a"
    return f"{article} {color} {shape} on {bg_article} {background} background"


def all_captions() -> list[str]:
    """Every caption of the vocabulary (shape colour × shape × background), in a fixed order."""
    return [caption_for(s, c, b) for c in SHAPE_COLORS for s in SHAPES for b in BACKGROUNDS]


def parse_caption(caption: str) -> tuple[str, str, str]:
    """``(shape, color, background)`` of a caption made by :func:`caption_for`."""
    m = _CAPTION.match(caption.strip().lower())
    if not m or m.group(1) not in SHAPE_COLORS or m.group(2) not in SHAPES or m.group(3) not in BACKGROUNDS:
        raise ValueError(
            f"caption {caption!r} is not a shapes caption; expected 'a <color> <shape> on a <background> "
            f"background' with color in {list(SHAPE_COLORS)}, shape in {list(SHAPES)}, background in "
            f"{list(BACKGROUNDS)}"
        )
    return m.group(2), m.group(1), m.group(3)


def _mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape centred at (cx, cy) with circumradius r (pixels)."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape == "square":
        half = r / math.sqrt(2) * 1.2  # a bit larger than inscribed, still inside the frame at the largest size
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":
        # Upward equilateral triangle with centroid (cx, cy): three half-planes at distance r/2 (the inradius).
        inside = np.ones_like(dx, dtype=bool)
        for angle in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
            # outward normal of the edge opposite the vertex at `angle` points away from that vertex
            nx, ny = -math.cos(angle), math.sin(angle)  # image y grows downwards
            inside &= dx * nx + dy * ny <= r / 2
    else:
        raise ValueError(f"shape={shape!r} is not one of {list(SHAPES)}")
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def render(shape: str, color: str, background: str, *, size: int = 32, radius: float = 0.33,
           offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """``[size, size, 3]`` uint8 image; ``radius`` and ``offset`` are fractions of ``size``."""
    if color not in SHAPE_COLORS:
        raise ValueError(f"color={color!r} is not one of {list(SHAPE_COLORS)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background={background!r} is not one of {list(BACKGROUNDS)}")
    if size < 8:
        raise ValueError(f"size={size} must be >= 8 pixels")
    cover = _mask(shape, size, size / 2 + offset[0] * size, size / 2 + offset[1] * size, radius * size)[..., None]
    img = cover * np.array(SHAPE_COLORS[color]) + (1 - cover) * np.array(BACKGROUNDS[background])
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def shape_samples(n: int, *, seed: int = 0, size: int = 32, captions: Sequence[str] | None = None,
                  faded_prob: float = 0.0, mislabel_prob: float = 0.0) -> list[ShapeSample]:
    """``n`` deterministic samples (same seed → same images); attributes uniform, or drawn from ``captions``.

    Imperfect pre-training data, which a model trained on it reproduces at about the same rate from seed to seed
    (what preference alignment on its own reward-ranked samples can then remove):

    - ``faded_prob``: the fraction of *faded* images (contrast pulled FADE of the way to mid-grey: washed-out
      colours, a low-quality photo);
    - ``mislabel_prob``: the fraction whose shape is drawn in *another* colour than the caption says (caption
      noise). ``ShapeSample.color`` always keeps the captioned colour.
    """
    for name, p in (("faded_prob", faded_prob), ("mislabel_prob", mislabel_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name}={p} must lie in [0, 1]")
    rng = np.random.default_rng(seed)
    pool = [parse_caption(c) for c in captions] if captions else None
    out = []
    for _ in range(n):
        if pool:
            shape, color, background = pool[int(rng.integers(len(pool)))]
        else:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = list(SHAPE_COLORS)[int(rng.integers(len(SHAPE_COLORS)))]
            background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        radius = float(rng.uniform(*RADIUS))
        offset = (float(rng.uniform(-JITTER, JITTER)), float(rng.uniform(-JITTER, JITTER)))
        drawn = color
        if mislabel_prob and rng.random() < mislabel_prob:
            others = [c for c in SHAPE_COLORS if c != color]
            drawn = others[int(rng.integers(len(others)))]
        image = render(shape, drawn, background, size=size, radius=radius, offset=offset)
        if faded_prob and rng.random() < faded_prob:
            image = np.round(image * (1 - FADE) + 127.5 * FADE).astype(np.uint8)
        out.append(ShapeSample(caption_for(shape, color, background), image, shape, color, background))
    return out


def write_images(samples: Sequence[ShapeSample], out_dir: str | Path, *, prefix: str = "img") -> list[Path]:
    """Save each sample as ``<out_dir>/<prefix>_<i>.png``; returns the paths."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(samples):
        p = out_dir / f"{prefix}_{i:05d}.png"
        Image.fromarray(s.image).save(p)
        paths.append(p)
    return paths


def _region_masks(size: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) - size / 2
    d2 = c[None, :] ** 2 + c[:, None] ** 2
    centre = d2 <= (CENTRE * size) ** 2
    frame_px = max(1, round(FRAME * size))
    frame = torch.ones(size, size, dtype=torch.bool, device=device)
    frame[frame_px:-frame_px, frame_px:-frame_px] = False
    return centre, frame


def as_float_images(images: Tensor | np.ndarray | Sequence) -> Tensor:
    """``[B, 3, H, W]`` float in [0, 1] from uint8 HWC arrays, PIL images, or float tensors in [0, 1]."""
    if isinstance(images, Tensor):
        x = images.float()
        if x.dim() == 3:
            x = x[None]
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        return x / 255.0 if images.dtype == torch.uint8 else x
    arrays = [np.asarray(im) for im in (images if not isinstance(images, np.ndarray) or images.ndim == 4
                                        else [images])]
    x = torch.from_numpy(np.stack(arrays)).float()
    if arrays[0].dtype == np.uint8:
        x = x / 255.0
    return x.permute(0, 3, 1, 2)


def reward(images: Tensor | np.ndarray | Sequence, captions: str | Sequence[str]) -> Tensor:
    """``[B]`` caption colour agreement in [0, 1] (see the module docstring); higher is better.

    Args:
        images: ``[B, 3, H, W]`` floats in [0, 1], or uint8 ``[B, H, W, 3]`` / PIL images (square).
        captions: one caption per image (or one for all).
    """
    x = as_float_images(images).clamp(0, 1)
    b, _, h, w = x.shape
    if h != w:
        raise ValueError(f"reward expects square images; got {h}x{w}")
    caps = [captions] * b if isinstance(captions, str) else list(captions)
    if len(caps) != b:
        raise ValueError(f"{len(caps)} captions for {b} images")
    attrs = [parse_caption(c) for c in caps]
    shape_rgb = torch.tensor([SHAPE_COLORS[c] for _, c, _ in attrs], dtype=x.dtype, device=x.device)
    bg_rgb = torch.tensor([BACKGROUNDS[g] for _, _, g in attrs], dtype=x.dtype, device=x.device)
    centre, frame = _region_masks(h, x.device)
    d_centre = (x - shape_rgb[:, :, None, None]).norm(dim=1)  # [B, H, W]
    d_frame = (x - bg_rgb[:, :, None, None]).norm(dim=1)
    err = 0.5 * (d_centre[:, centre].mean(1) + d_frame[:, frame].mean(1))
    return 1.0 - err / math.sqrt(3.0)
