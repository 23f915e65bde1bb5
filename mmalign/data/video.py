"""Read frames from video files: frame-index rules, ``decord`` and PyAV backends, clear errors.

TEMPLE (Li et al., arXiv 2503.16929; research note ``video_audio_clip_prior.md`` §1.2) decodes with
``decord.VideoReader`` (native bridge) and calls ``get_batch`` in chunks of 1000 indices, giving uint8 THWC
frames (reference: ``lscpku/TEMPLE`` ``tools/loader.py``). This module does the same and adds PyAV (``av``) as a
second backend, so that a machine without a working decord still reads the same frames:

- ``backend="decord"``: ``decord.VideoReader`` + chunked ``get_batch`` (random access).
- ``backend="av"``: PyAV, decoding from the start and keeping the wanted frames (sequential: slower for a few
  frames late in a long video, but it needs no seeking and so gets frame numbers right on any container).
- ``backend="auto"``: decord when it is installed and opens the file, else PyAV.

Both backends convert to RGB with FFmpeg's swscale; on the synthetic mp4s of the tests (libx264 and mpeg4,
yuv420p) they return **exactly equal** frames (checked in ``tests/video/test_video_data.py``).

Frame sampling follows the reference's uniform rule, index_i = start + floor(i·L/(n+1)) for i = 1..n, which
skips both ends of the clip. Deviation: the reference computes ``int(L/(n+1)*i)`` in floating point, which is one
frame lower in rare cases (L=30, n=21, i=11 gives 14 instead of 15); here the floor is exact integer arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .rows import DataError

BACKENDS = ("auto", "decord", "av")
DECORD_CHUNK = 1000  # the reference's get_batch chunk: bounds the peak memory of one call


class FrameIndexError(DataError):
    """Frame indices outside the video: the file is fine, so ``backend="auto"`` does not try another backend."""


class VideoInfo(NamedTuple):
    """What :func:`video_info` returns; unpacks as ``(num_frames, fps, height, width)``."""

    num_frames: int
    fps: float
    height: int
    width: int


# --------------------------------------------------------------------------------------------- indices


def uniform_indices(num_frames_in_clip: int, n: int, start: int = 0) -> list[int]:
    """TEMPLE's uniform rule: ``start + floor(i * L / (n + 1))`` for ``i = 1..n``, ``L = num_frames_in_clip``.

    The n frames sit at the interior points of n+1 equal intervals, so the first and last frames of the clip
    are never taken. ``start`` offsets a clip inside a longer video (the reference passes the clip's first
    frame). With ``n >= L`` some indices repeat, as in the reference.
    """
    _check_count(num_frames_in_clip, "num_frames_in_clip")
    _check_count(n, "n")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start={start!r} must be an int >= 0 (the clip's first frame)")
    return [start + (i * num_frames_in_clip) // (n + 1) for i in range(1, n + 1)]


def evenly_spaced_indices(num_frames: int, n: int) -> list[int]:
    """``n`` indices evenly spaced over ``0..num_frames-1`` including both ends (rounded to the nearest frame).

    Not TEMPLE's rule (see :func:`uniform_indices`); the usual choice when the first and last frames matter."""
    _check_count(num_frames, "num_frames")
    _check_count(n, "n")
    if n == 1:
        return [(num_frames - 1) // 2]
    return [int(round(i * (num_frames - 1) / (n - 1))) for i in range(n)]


def _check_count(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1")


# --------------------------------------------------------------------------------------------- backends


def _decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such video file; fix: check the path (relative to {Path.cwd()})")
    if not path.is_file():
        raise DataError(f"{path}: is a directory, not a video file; fix: point to a video file (.mp4, .webm, ...)")


def _unreadable(path: Path, why: str) -> DataError:
    return DataError(f"{path}: cannot be read as a video ({why}); fix: check that it is a complete, playable video "
                     "file (re-encode it, e.g. `ffmpeg -i in -c:v libx264 -pix_fmt yuv420p out.mp4`) or drop it")


def _decord_open(path: Path):
    import decord

    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0))
    except Exception as e:  # decord raises DECORDError (a RuntimeError) with the FFmpeg message
        raise _unreadable(path, f"decord: {str(e).splitlines()[0][:200]}") from e


def _av_open(path: Path):
    import av

    try:
        container = av.open(str(path))
    except Exception as e:  # av.error.InvalidDataError and friends
        raise _unreadable(path, f"PyAV: {e}") from e
    if not container.streams.video:
        container.close()
        raise _unreadable(path, "PyAV: the file has no video stream")
    return container


def _decord_info(path: Path) -> VideoInfo:
    vr = _decord_open(path)
    n = len(vr)
    if n < 1:
        raise _unreadable(path, "decord: 0 frames")
    h, w = vr[0].shape[:2]
    return VideoInfo(n, float(vr.get_avg_fps()), int(h), int(w))


def _av_info(path: Path) -> VideoInfo:
    with _av_open(path) as container:
        stream = container.streams.video[0]
        n = stream.frames
        if not n:  # some containers (webm, mkv) store no frame count: count packets, no decoding needed
            n = sum(1 for p in container.demux(stream) if p.size > 0)
        rate = stream.average_rate or stream.guessed_rate or 0
        h, w = stream.codec_context.height, stream.codec_context.width
    if n < 1:
        raise _unreadable(path, "PyAV: 0 frames")
    return VideoInfo(int(n), float(rate), int(h), int(w))


def _decord_read(path: Path, vr, indices: list[int], chunk: int) -> np.ndarray:
    _check_indices(path, indices, len(vr))
    parts = []
    try:
        for i in range(0, len(indices), chunk):
            parts.append(vr.get_batch(indices[i:i + chunk]).asnumpy())
    except Exception as e:
        raise _unreadable(path, f"decord failed while decoding: {str(e).splitlines()[0][:200]}") from e
    return np.concatenate(parts, axis=0).astype(np.uint8, copy=False)


def _av_read(path: Path, indices: list[int], num_frames: int) -> np.ndarray:
    _check_indices(path, indices, num_frames)
    wanted = set(indices)
    last = max(indices)
    got: dict[int, np.ndarray] = {}
    i = -1
    with _av_open(path) as container:
        try:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
        except Exception as e:
            raise _unreadable(path, f"PyAV failed while decoding frame {i + 1}: {e}") from e
    missing = sorted(wanted - set(got))
    if missing:
        raise _unreadable(path, f"PyAV: the stream ended before frame {missing[0]} although the header says "
                                f"{num_frames} frames")
    return np.stack([got[i] for i in indices])


def _check_indices(path: Path, indices: list[int], num_frames: int) -> None:
    bad = [i for i in indices if i < 0 or i >= num_frames]
    if bad:
        raise FrameIndexError(f"{path}: frame indices {bad[:5]} out of range: the video has {num_frames} frames "
                              f"(valid: 0..{num_frames - 1}); fix: sample indices from video_info(path).num_frames, "
                              f"e.g. uniform_indices({num_frames}, n)")


_INFO = {"decord": _decord_info, "av": _av_info}


def _backends(backend: str) -> list[str]:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    if backend == "auto":
        return ["decord", "av"] if _decord_available() else ["av"]
    if backend == "decord" and not _decord_available():
        raise ImportError("backend='decord' needs the decord package; fix: pip install decord, or use backend='av'")
    return [backend]


def _first_working(path: Path, backend: str, fn):
    """Run ``fn(name)`` with each candidate backend; with ``auto`` a decord failure falls back to PyAV."""
    names = _backends(backend)
    errors = []
    for name in names:
        try:
            return fn(name)
        except FrameIndexError:
            raise
        except DataError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    raise DataError(f"{path}: no backend could read it:\n" + "\n".join(f"  - {e}" for e in errors))


# --------------------------------------------------------------------------------------------- public API


def video_info(path: str | Path, *, backend: str = "auto") -> VideoInfo:
    """``(num_frames, fps, height, width)`` of a video file.

    Raises:
        DataError: missing file, not a video, or a corrupt file (naming the file and the fix).
    """
    p = Path(path)
    _check_file(p)
    return _first_working(p, backend, lambda name: _INFO[name](p))


def read_frames(path: str | Path, indices: Sequence[int] | None = None, *, num_frames: int | None = None,
                backend: str = "auto", chunk_size: int = DECORD_CHUNK) -> torch.Tensor:
    """Frames of a video as a uint8 tensor ``[T, H, W, 3]`` (RGB).

    Args:
        indices: frame numbers to read, in the order wanted (repeats allowed); ``None`` with ``num_frames``
            takes :func:`uniform_indices` over the whole video; both ``None`` reads every frame.
        num_frames: how many uniformly spaced frames to take (TEMPLE's rule); not together with ``indices``.
        backend: ``"auto"`` | ``"decord"`` | ``"av"`` (see the module docstring).
        chunk_size: indices per decord ``get_batch`` call.

    Raises:
        DataError: missing file, not a video / corrupt file, or indices out of range.
    """
    if indices is not None and num_frames is not None:
        raise ValueError("give either indices or num_frames, not both")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1")
    p = Path(path)
    _check_file(p)
    if indices is not None:
        idx = [int(i) for i in indices]
        if any(int(i) != i for i in indices):
            raise ValueError(f"indices must be integers, got {list(indices)[:5]}")
        if not idx:
            raise ValueError(f"{p}: indices is empty; pass at least one frame index")

    def read(name: str) -> np.ndarray:
        vr = _decord_open(p) if name == "decord" else None  # one reader for the count and the frames
        total = len(vr) if vr is not None else _av_info(p).num_frames
        if total < 1:
            raise _unreadable(p, f"{name}: 0 frames")
        if indices is not None:
            want = idx
        elif num_frames is not None:
            want = uniform_indices(total, num_frames)
        else:
            want = list(range(total))
        if vr is not None:
            return _decord_read(p, vr, want, chunk_size)
        return _av_read(p, want, total)

    return torch.from_numpy(np.ascontiguousarray(_first_working(p, backend, read)))
