"""Media for vision-language preference rows: how frames are sampled and resized, and loading images and videos.

:class:`MediaSpec` states what the model's processor takes, in Qwen2-VL's terms (``qwen_vl_utils``, the helper
package of the Qwen2-VL / Qwen2.5-VL model cards, ``vision_process.py``; that package is not installed here, so
its rules are recalled [unverified]; the parts that ``transformers``' Qwen2-VL processors share are checked
against them):

- **Frames.** With ``fps`` set, ``n = floor(num_frames / video_fps * fps)`` frames (the clip's duration times
  the sampling rate), clamped to ``[min_frames, min(max_frames, num_frames)]`` and rounded down to a multiple of
  ``frame_factor`` (``smart_nframes``). Without ``fps``: ``n = min(max_frames, num_frames)`` (uniform). Either
  way the indices are ``round(linspace(0, num_frames - 1, n))`` (both ends included, as ``qwen_vl_utils`` reads
  with decord; here in float64, where it uses float32: the same indices except at exact .5 ties), and the
  effective fps passed on with the frames is ``n / num_frames * video_fps`` (its ``sample_fps``). In fps mode
  ``n`` equals ``transformers``' ``Qwen2VLVideoProcessor.sample_frames`` (checked on a sweep in the tests);
  its indices differ (``floor(i * num_frames / n)``: from frame 0, never the last frame).
  Defaults differ from ``qwen_vl_utils``: ``min_frames=1`` and ``frame_factor=1`` here (it uses 4 and 2, the
  temporal patch size; Qwen2-VL's video processor repeats the last frame to fill an odd count, so 1 works);
  ``max_frames=16`` (it: 768). ``MediaSpec(fps=2, min_frames=4, max_frames=768, frame_factor=2)`` is its rule.
- **Pixels.** :func:`smart_resize` is ``qwen_vl_utils.smart_resize``: each side rounded to a multiple of
  ``factor`` (28 = patch 14 x merge 2; Qwen3-VL uses 32), then scaled (keeping the aspect ratio) to bring
  ``H*W`` into ``[min_pixels, max_pixels]``; aspect ratios above 200 are refused. Deviations: with neither bound
  set nothing is resized (the processor then resizes with its own defaults); one bound alone leaves the other
  open; ``qwen_vl_utils``' per-video ``total_pixels`` budget (``max_pixels`` shrunk as frames grow) is not
  applied -- ``max_pixels`` holds per frame. The same rule resizes images and video frames; frames are resized
  with PIL bicubic (``qwen_vl_utils`` uses torchvision bicubic with antialiasing: close, not bit-equal).

Loading (:class:`MediaLoader`): paths relative to ``root``, else to the data file's folder; each file decoded
once per loader (rows sharing a video, as TEMPLE's twelve pairs per video do, share the array); a bad file is a
:class:`BadRow` naming the file and the fix, counted under one of the reasons in :data:`MEDIA_REASONS`.

Placeholders: :func:`flatten_text` / :func:`to_parts` / :func:`parts_to_text` convert chat content between TRL's
content parts (``{"type": "image"}``, ``{"type": "video"}``) and ms-swift's markers (``<image>``, ``<video>``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .image import to_rgb
from .rows import DataError
from .video import BACKENDS, read_frames, video_info

MEDIA_KINDS = ("image", "video")
MARKER = re.compile(r"<(image|video)>")  # ms-swift's / LLaVA's placeholders in string contents
MAX_ASPECT = 200  # qwen_vl_utils' MAX_RATIO
MEDIA_REASONS = ("missing_media", "empty_media_file", "remote_media", "bad_image", "bad_video", "not_a_video",
                 "too_few_frames", "bad_aspect_ratio")


class BadRow(Exception):
    """One bad row: ``details = (reason, field, value, message, fix)``, a :class:`RowProblem` without origin."""

    def __init__(self, reason: str, field: str, value: Any, message: str, fix: str):
        super().__init__(message)
        self.details = (reason, field, value, message, fix)

    @property
    def reason(self) -> str:
        return self.details[0]


def _positive_int(value: Any, name: str, errors: list[str], allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        errors.append(f"{name}={value!r} must be an int >= 1" + (" or None" if allow_none else ""))


@dataclass(frozen=True)
class MediaSpec:
    """Frame sampling and resizing as Qwen2-VL's processor takes media (see the module docstring).

    Attributes:
        fps: frames per second to sample; ``None`` samples ``max_frames`` uniformly.
        max_frames: the most frames per video.
        min_pixels / max_pixels: bounds on ``H*W`` per image or frame; both ``None``: no resize.
        factor: each resized side is a multiple of this (28 for Qwen2/2.5-VL, 32 for Qwen3-VL).
        min_frames: the fewest frames in fps mode (a short clip is sampled above ``fps``; ``qwen_vl_utils``: 4).
        frame_factor: the frame count is a multiple of this (``qwen_vl_utils``: 2, the temporal patch).
        backend: video decoder, ``"auto"`` | ``"decord"`` | ``"av"`` (:mod:`mmalign.data.video`).
    """

    fps: float | None = None
    max_frames: int = 16
    min_pixels: int | None = None
    max_pixels: int | None = None
    factor: int = 28
    min_frames: int = 1
    frame_factor: int = 1
    backend: str = "auto"

    def __post_init__(self) -> None:
        errors: list[str] = []
        if self.fps is not None and (isinstance(self.fps, bool) or not isinstance(self.fps, (int, float))
                                     or not math.isfinite(self.fps) or self.fps <= 0):
            errors.append(f"fps={self.fps!r} must be a finite number > 0, or None for uniform sampling")
        _positive_int(self.max_frames, "max_frames", errors)
        _positive_int(self.min_pixels, "min_pixels", errors, allow_none=True)
        _positive_int(self.max_pixels, "max_pixels", errors, allow_none=True)
        _positive_int(self.factor, "factor", errors)
        _positive_int(self.min_frames, "min_frames", errors)
        _positive_int(self.frame_factor, "frame_factor", errors)
        if self.backend not in BACKENDS:
            errors.append(f"backend={self.backend!r} is not one of {list(BACKENDS)}")
        if not errors:
            if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
                errors.append(f"min_pixels={self.min_pixels} > max_pixels={self.max_pixels}")
            if self.max_pixels is not None and self.max_pixels < self.factor ** 2:
                errors.append(f"max_pixels={self.max_pixels} is below one {self.factor}x{self.factor} patch "
                              f"({self.factor ** 2}); raise it or lower factor")
            if self.min_frames > self.max_frames:
                errors.append(f"min_frames={self.min_frames} > max_frames={self.max_frames}")
            if self.max_frames < self.frame_factor:
                errors.append(f"max_frames={self.max_frames} < frame_factor={self.frame_factor}")
        if errors:
            raise ValueError("MediaSpec: " + "; ".join(errors))

    @property
    def resizes(self) -> bool:
        return self.min_pixels is not None or self.max_pixels is not None


# ------------------------------------------------------------------------------------------------ arithmetic


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> tuple[int, int]:
    """``(H', W')``: multiples of ``factor``, aspect kept, ``min_pixels <= H'*W' <= max_pixels`` (None: open).

    ``qwen_vl_utils.smart_resize`` = ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize``
    (equal to the latter on a sweep, ``tests/vlm/test_vlm_rows.py``): round each side to the factor; if the area
    is too large, scale both sides by ``sqrt(H*W / max_pixels)`` and floor to the factor (at least ``factor``);
    if too small, scale up and ceil. Deviations: where that ceil overshoots ``max_pixels`` (bounds too close
    together) the floor is taken, so ``max_pixels`` wins; with no ``min_pixels`` a side that rounds to 0 becomes
    ``factor``. A floor can still land below ``min_pixels`` when the bounds are tight. ValueError for an aspect
    ratio above 200.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} of a {height}x{width} "
                         f"image is above {MAX_ASPECT}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if max_pixels is not None and h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif min_pixels is not None and h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
        if max_pixels is not None and h * w > max_pixels:  # bounds closer than a patch row: max_pixels wins
            h = max(factor, math.floor(height * beta / factor) * factor)
            w = max(factor, math.floor(width * beta / factor) * factor)
    return max(factor, h), max(factor, w)


def sample_frame_indices(num_frames: int, video_fps: float, spec: MediaSpec) -> tuple[list[int], float]:
    """``(indices, effective fps)`` for a video of ``num_frames`` frames at ``video_fps`` (module docstring).

    Raises ValueError when the video has fewer frames than ``spec.frame_factor`` (``qwen_vl_utils`` raises too).
    """
    if num_frames < 1 or not video_fps > 0:
        raise ValueError(f"a video needs >= 1 frame and a frame rate > 0, got {num_frames} frames at {video_fps} fps")
    ff = spec.frame_factor
    if spec.fps is None:
        n = min(spec.max_frames, num_frames)
    else:
        lo = math.ceil(spec.min_frames / ff) * ff
        hi = math.floor(min(spec.max_frames, num_frames) / ff) * ff
        n = min(max(num_frames / video_fps * spec.fps, lo), hi, num_frames)
    n = math.floor(n / ff) * ff
    if n < 1:
        raise ValueError(f"{num_frames} frame(s) are fewer than frame_factor={ff}")
    idx = np.round(np.linspace(0, num_frames - 1, n)).astype(int).tolist()
    return idx, n / num_frames * video_fps


# ------------------------------------------------------------------------------------------------ loading


def _resize(image, spec: MediaSpec, field: str, value: Any):
    from PIL import Image

    if not spec.resizes:
        return image
    try:
        h, w = smart_resize(image.height, image.width, factor=spec.factor, min_pixels=spec.min_pixels,
                            max_pixels=spec.max_pixels)
    except ValueError as e:
        raise BadRow("bad_aspect_ratio", field, value, f"cannot be resized: {e}",
                     "crop or pad the media to a less extreme shape, or remove the row") from None
    return image if (h, w) == (image.height, image.width) else image.resize((w, h), Image.Resampling.BICUBIC)


class MediaLoader:
    """Resolves, decodes, samples and resizes the media of rows, caching each file's result (also failures).

    ``load_image`` / ``load_video`` raise :class:`BadRow` (reasons in :data:`MEDIA_REASONS`)."""

    def __init__(self, spec: MediaSpec, root: str | Path | None = None):
        self.spec = spec
        self.root = None if root is None else Path(root).expanduser()
        self._cache: dict[tuple[str, str], Any] = {}

    def resolve(self, value: Any, file: str, field: str, kind: str) -> Path:
        if isinstance(value, dict) and isinstance(value.get("path"), str):  # HF Image / ms-swift {"path": ...}
            value = value["path"]
        elif isinstance(value, dict) and value.get("bytes"):
            raise BadRow("bad_type", field, "<bytes>", f"holds the {kind}'s bytes, not a path; media are read from "
                         "files", f"save the {kind}s to files and list their paths")
        if not isinstance(value, str) or not value.strip():
            raise BadRow("bad_type", field, value, f"must be a {kind} file path (a non-empty string)",
                         f"give the {kind} as a path relative to the data file's folder (or to root=)")
        if "://" in value:
            raise BadRow("remote_media", field, value, "is a URL; media are read from local files only",
                         "download the file and give its local path")
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (self.root if self.root is not None else Path(file).parent) / path
        return Path(os.path.abspath(path))  # absolute, so that rows written elsewhere still find the file

    def check(self, value: Any, file: str, field: str, kind: str) -> Path:
        """The resolved path of an existing, non-empty file (not decoded)."""
        path = self.resolve(value, file, field, kind)
        self._check_file(path, value, field, kind)
        return path

    def _cached(self, key: tuple[str, str], load):
        if key not in self._cache:
            try:
                self._cache[key] = load()
            except BadRow as bad:
                self._cache[key] = bad
        hit = self._cache[key]
        if isinstance(hit, BadRow):
            raise BadRow(*hit.details)
        return hit

    def _check_file(self, path: Path, value: Any, field: str, kind: str) -> None:
        base = "root=" if self.root is not None else "the data file's folder"
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise BadRow("missing_media", field, value, f"points to {str(path)!r}, which {what}",
                         f"fix the {kind} path (relative paths start from {base}; pass root= to change that)")
        if path.stat().st_size == 0:
            raise BadRow("empty_media_file", field, value, f"points to {str(path)!r}, an empty (0-byte) file",
                         f"replace the {kind} file (an interrupted download or copy?) or remove the row")

    def load_image(self, value: Any, file: str, field: str):
        """``(RGB PIL image, resolved path)``, resized by the spec."""
        path = self.resolve(value, file, field, "image")
        return self._cached(("image", str(path)), lambda: (self._image(path, value, field), path))

    def _image(self, path: Path, value: Any, field: str):
        from PIL import Image

        self._check_file(path, value, field, "image")
        try:
            with Image.open(path) as im:
                image = to_rgb(im)  # forces the full decode (a truncated file fails here); 16-bit scaled
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, DecompressionBombError...
            raise BadRow("bad_image", field, value, f"points to {str(path)!r}, which is not a readable image "
                         f"({type(e).__name__}: {str(e)[:120]})", "replace it with a valid PNG/JPEG or remove the "
                         "row") from None
        return _resize(image, self.spec, field, value)

    def load_video(self, value: Any, file: str, field: str) -> tuple[np.ndarray, float, Path]:
        """``(uint8 frames [T, H, W, 3], effective fps, resolved path)``, sampled and resized by the spec."""
        path = self.resolve(value, file, field, "video")
        return self._cached(("video", str(path)), lambda: (*self._video(path, value, field), path))

    def _video(self, path: Path, value: Any, field: str) -> tuple[np.ndarray, float]:
        self._check_file(path, value, field, "video")
        if _is_still_image(path):  # FFmpeg reads a PNG/JPEG as a one-frame video: almost surely a wrong column
            raise BadRow("not_a_video", field, value, f"points to {str(path)!r}, which is a still image",
                         "list it under 'images' (and use an image placeholder), or point to the video file")
        fix = ("re-encode it (e.g. `ffmpeg -i in -c:v libx264 -pix_fmt yuv420p out.mp4`) or remove the row")
        try:
            info = video_info(path, backend=self.spec.backend)
        except DataError as e:
            raise BadRow("bad_video", field, value, f"cannot be read as a video: {_first_line(e)}", fix) from None
        try:
            indices, fps = sample_frame_indices(info.num_frames, info.fps, self.spec)
        except ValueError as e:
            reason = "too_few_frames" if info.fps > 0 else "bad_video"
            raise BadRow(reason, field, value, f"({str(path)!r}) cannot be sampled: {e}",
                         "lower frame_factor / min_frames, or remove the row" if info.fps > 0 else fix) from None
        try:
            frames = read_frames(path, indices, backend=self.spec.backend).numpy()
        except DataError as e:  # a truncated file: the header promises frames the stream does not hold
            raise BadRow("bad_video", field, value, f"cannot be decoded: {_first_line(e)}", fix) from None
        if self.spec.resizes:
            from PIL import Image

            frames = np.stack([np.asarray(_resize(Image.fromarray(f), self.spec, field, value)) for f in frames])
        return np.ascontiguousarray(frames, dtype=np.uint8), fps


def _first_line(e: Exception) -> str:
    lines = [ln.strip(" -") for ln in str(e).splitlines() if ln.strip()]
    text = lines[-1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
    return text.split("; fix:")[0][:240]


def _is_still_image(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) <= 1  # an animated GIF / APNG is a video to FFmpeg and to us
    except Exception:  # not an image format PIL knows: let the video decoders judge it
        return False


# ------------------------------------------------------------------------------------------------ placeholders
# Chat content in two spellings: TRL's parts ({"type": "image"}) and ms-swift's markers ("<image>" in a string).


def flatten_text(value: Any, key: str) -> Any:
    """A text field with TRL content parts written as ``<image>`` / ``<video>`` markers in string contents.

    Non-list values come back unchanged (:func:`~mmalign.data.rows.parse_rows` reports their type)."""
    if not isinstance(value, list):
        return value
    out = []
    for i, msg in enumerate(value):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            out.append(msg)
            continue
        text = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in MEDIA_KINDS:
                text.append(f"<{kind}>")
            elif kind == "text" and isinstance(part.get("text"), str):
                text.append(part["text"])
            else:
                raise BadRow("bad_type", f"{key}[{i}].content[{j}]", part, "must be {'type': 'text', 'text': str}, "
                             "{'type': 'image'} or {'type': 'video'}", "write content parts as TRL's "
                             "conversational vision rows do, or give the content as a string")
        out.append({**msg, "content": "".join(text)})
    return out


def _parts(text: str) -> list[dict]:
    parts: list[dict] = []
    for i, piece in enumerate(MARKER.split(text)):
        if i % 2:  # re.split puts the captured marker names at odd positions
            parts.append({"type": piece})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def to_parts(prompt: Any, prepend: dict[str, int] | None = None) -> list[dict]:
    """A validated prompt (string or messages with string contents) as messages with content parts; ``prepend``
    puts that many media parts of each kind at the start of the first user turn (the first turn if none)."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    for m in msgs:
        m["content"] = _parts(m["content"])
    extra = [{"type": kind} for kind, n in (prepend or {}).items() for _ in range(n)]
    if extra:
        at = next((i for i, m in enumerate(msgs) if m["role"] == "user"), 0)
        msgs[at]["content"] = extra + msgs[at]["content"]
    return msgs


def parts_to_text(content: list[dict] | str) -> str:
    """Content parts back to ms-swift's string form with ``<image>`` / ``<video>`` markers."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] if p["type"] == "text" else f"<{p['type']}>" for p in content)
