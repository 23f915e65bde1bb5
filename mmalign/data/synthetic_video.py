"""Deterministic synthetic videos for tests and demos: a coloured shape moving across a flat background.

Not from any paper. TEMPLE (Li et al., arXiv 2503.16929) is about temporal order, so each video comes with a
caption whose meaning depends on the order of its segments ("the red square moves left, then up"): reversing or
shuffling the segments (``mmalign.data.perturb``) changes what a faithful caption must say. Consecutive
segments never share a direction and the last differs from the first (with 3+ moves), so the direction sequence
is never a palindrome and the segment-reversed caption always differs from the clean one.

:func:`write_video` encodes with PyAV (bundled FFmpeg, nothing downloaded): ``libx264`` when the build has it,
else ``mpeg4``; pixel format yuv420p, which needs even frame sizes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

CODECS = ("libx264", "mpeg4")  # tried in this order by write_video(codec=None)
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 230),
    "yellow": (230, 220, 30),
    "white": (235, 235, 235),
}
SHAPES = ("square", "disc")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)


@dataclass(frozen=True)
class SyntheticVideo:
    """Frames and their ground truth.

    ``positions[t]`` is the shape's top-left ``(y, x)`` in frame t; ``segments[k]`` is the half-open frame range
    ``(first, end)`` of the k-th move, captioned by ``segment_captions[k]``."""

    frames: torch.Tensor  # uint8 [T, H, W, 3]
    caption: str
    segment_captions: list[str]
    directions: list[str]
    segments: list[tuple[int, int]]
    positions: list[tuple[int, int]]
    colour: str
    shape: str
    shape_size: int
    background: tuple[int, int, int]


def available_codec() -> str:
    """The first encoder of :data:`CODECS` that this PyAV build has."""
    import av

    for name in CODECS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # UnknownCodecError, or a decoder-only build
            continue
        return name
    raise RuntimeError(f"PyAV has none of the encoders {list(CODECS)}; fix: install a PyAV wheel with FFmpeg encoders")


def write_video(path: str | Path, frames, fps: float = 8, *, codec: str | None = None, quality: int = 10) -> Path:
    """Encode uint8 frames ``[T, H, W, 3]`` (tensor or array, RGB) to ``path`` (mp4 by its suffix).

    ``quality``: libx264 CRF / mpeg4 qscale-like knob (lower = closer to the input); the default keeps the
    tests' colour checks within a few levels."""
    import av

    arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got {arr.dtype} {tuple(arr.shape)}")
    h, w = arr.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"frame size {h}x{w} must be even in both sides (yuv420p); fix: crop or pad by one pixel")
    if not fps > 0:
        raise ValueError(f"fps={fps!r} must be > 0")
    codec = codec or available_codec()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(p), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(quality), "preset": "ultrafast"}
        else:  # mpeg4: a high bit rate stands in for quality; these videos are tiny
            stream.bit_rate = max(1, 40 - quality) * 100_000
        for frame in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return p


def _plan_directions(rng: random.Random, n_segments: int) -> list[str]:
    names = list(DIRECTIONS)
    out = [rng.choice(names)]
    while len(out) < n_segments:
        # never the previous direction; the last move also differs from the first, so the sequence is no palindrome
        banned = {out[-1], out[0]} if len(out) == n_segments - 1 and n_segments > 2 else {out[-1]}
        out.append(rng.choice([d for d in names if d not in banned]))
    return out


def moving_shape_video(num_frames: int = 16, size: int | tuple[int, int] = 48, seed: int = 0, *,
                       n_segments: int = 2, shape: str | None = None, colour: str | None = None,
                       shape_size: int | None = None) -> SyntheticVideo:
    """A shape moving in ``n_segments`` straight moves, one direction per move, the frames split evenly.

    ``size``: ``H`` or ``(H, W)``, even (e.g. 32..64). ``shape``/``colour``: drawn from the seed when ``None``.
    The position is a piecewise-linear path from frame 0 to frame T-1, always fully inside the frame.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if num_frames < n_segments or n_segments < 1:
        raise ValueError(f"num_frames={num_frames} must be >= n_segments={n_segments} >= 1")
    if h < 16 or w < 16:
        raise ValueError(f"size {h}x{w} is too small; use at least 16x16")
    rng = random.Random(seed)
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice(list(COLOURS))
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not one of {list(SHAPES)}")
    if colour not in COLOURS:
        raise ValueError(f"colour={colour!r} is not one of {list(COLOURS)}")
    s = shape_size or max(6, min(h, w) // 4)
    directions = _plan_directions(rng, n_segments)
    travel = (min(h, w) - s) // n_segments  # per move; keeps any sequence of moves inside the frame
    # the corners of the path relative to its start, then a start that fits the whole path in the frame
    corners = [(0, 0)]
    for d in directions:
        dy, dx = DIRECTIONS[d]
        corners.append((corners[-1][0] + dy * travel, corners[-1][1] + dx * travel))
    ys, xs = [c[0] for c in corners], [c[1] for c in corners]
    y0 = rng.randint(-min(ys), h - s - max(ys))
    x0 = rng.randint(-min(xs), w - s - max(xs))
    background = tuple(rng.randint(20, 70) for _ in range(3))
    # frame t is in move floor(t * S / (T - 1)) (the last frame closes the last move): the same split as below
    firsts = [math.ceil(k * (num_frames - 1) / n_segments) for k in range(n_segments)] + [num_frames]
    segments = list(zip(firsts[:-1], firsts[1:], strict=True))

    positions = []
    for t in range(num_frames):
        u = t / (num_frames - 1) * n_segments if num_frames > 1 else 0.0
        k = min(n_segments - 1, int(math.floor(u)))
        frac = u - k
        (ay, ax), (by, bx) = corners[k], corners[k + 1]
        positions.append((y0 + round(ay + frac * (by - ay)), x0 + round(ax + frac * (bx - ax))))

    yy, xx = np.mgrid[0:s, 0:s]
    centre = (s - 1) / 2
    mask = np.ones((s, s), bool) if shape == "square" else (yy - centre) ** 2 + (xx - centre) ** 2 <= (s / 2) ** 2
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    frames[:] = np.array(background, np.uint8)
    for t, (py, px) in enumerate(positions):
        frames[t, py:py + s, px:px + s][mask] = COLOURS[colour]

    subject = f"the {colour} {shape}"
    seg_caps = [f"{subject} moves {d}" for d in directions]
    caption = seg_caps[0] + "".join(f", then {d}" for d in directions[1:])
    return SyntheticVideo(torch.from_numpy(frames), caption, seg_caps, directions, segments, positions, colour, shape,
                          s, background)


def write_moving_shape_video(path: str | Path, num_frames: int = 16, size: int | tuple[int, int] = 48, seed: int = 0,
                             *, fps: float = 8, **kwargs) -> SyntheticVideo:
    """:func:`moving_shape_video`, written to ``path`` with :func:`write_video`; returns the ground truth."""
    video = moving_shape_video(num_frames, size, seed, **kwargs)
    write_video(path, video.frames, fps)
    return video
