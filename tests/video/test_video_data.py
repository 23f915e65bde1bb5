"""Video I/O (``mmalign.data.video``) and synthetic videos (``mmalign.data.synthetic_video``)."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from mmalign.data import video as V
from mmalign.data.rows import DataError
from mmalign.data.synthetic_video import (
    COLOURS,
    DIRECTIONS,
    moving_shape_video,
    write_moving_shape_video,
    write_video,
)
from mmalign.data.video import evenly_spaced_indices, read_frames, uniform_indices, video_info

T, H, W, FPS = 16, 48, 64, 8


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "shape.mp4"
    # red, not white or grey, so that a channel swap (BGR) would fail the colour checks
    truth = write_moving_shape_video(path, T, (H, W), seed=3, fps=FPS, colour="red")
    return path, truth


# --------------------------------------------------------------------------------------------- indices


def test_uniform_indices_follow_temple_rule():
    assert uniform_indices(16, 4) == [3, 6, 9, 12]
    assert uniform_indices(16, 4, start=100) == [103, 106, 109, 112]
    # exact floor: the reference's float int(30/22*11) gives 14
    assert uniform_indices(30, 21)[10] == 15
    for length in (1, 5, 17, 300):
        for n in (1, 3, 8, 40):
            idx = uniform_indices(length, n, start=7)
            assert idx == [7 + (i * length) // (n + 1) for i in range(1, n + 1)]
            assert all(7 <= i < 7 + length for i in idx) and idx == sorted(idx)
    assert uniform_indices(2, 3) == [0, 1, 1]  # n >= L repeats, as in the reference


def test_evenly_spaced_includes_ends():
    assert evenly_spaced_indices(16, 4) == [0, 5, 10, 15]
    assert evenly_spaced_indices(10, 1) == [4]
    assert evenly_spaced_indices(3, 5) == [0, 0, 1, 2, 2]


@pytest.mark.parametrize("args", [(0, 4), (16, 0), (16, True), (16, 2.0)])
def test_index_rules_reject_bad_counts(args):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        uniform_indices(*args)
    with pytest.raises(ValueError, match="must be an int >= 1"):
        evenly_spaced_indices(*args)
    with pytest.raises(ValueError, match="start"):
        uniform_indices(16, 4, start=-1)


# --------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("backend", ["decord", "av", "auto"])
def test_video_info(clip, backend):
    path, _ = clip
    info = video_info(path, backend=backend)
    assert info == (T, float(FPS), H, W)
    assert info.num_frames == T and info.width == W


def _interior_mean(frame: torch.Tensor, pos, size, margin=2):
    y, x = pos
    return frame[y + margin:y + size - margin, x + margin:x + size - margin].float().reshape(-1, 3).mean(0)


@pytest.mark.parametrize("backend", ["decord", "av"])
def test_round_trip_content(clip, backend):
    path, truth = clip
    frames = read_frames(path, backend=backend)
    assert frames.dtype == torch.uint8 and frames.shape == (T, H, W, 3)
    colour = torch.tensor(COLOURS[truth.colour], dtype=torch.float32)
    bg = torch.tensor(truth.background, dtype=torch.float32)
    for t in range(T):
        # the shape is where the generator put it, in its colour (allowing for yuv420p/codec loss)
        assert (_interior_mean(frames[t], truth.positions[t], truth.shape_size) - colour).abs().max() < 20
    # the shape moved: where it ends is background in the first frame
    first, last = truth.positions[0], truth.positions[-1]
    assert max(abs(first[0] - last[0]), abs(first[1] - last[1])) >= truth.shape_size
    assert (_interior_mean(frames[0], last, truth.shape_size) - bg).abs().max() < 12
    # overall close to what was written
    assert (frames.float() - truth.frames.float()).abs().mean() < 4


def test_backends_return_identical_frames(clip):
    path, _ = clip
    a, b = read_frames(path, backend="decord"), read_frames(path, backend="av")
    assert torch.equal(a, b)  # exactly equal here (both convert with swscale); see the module docstring
    idx = [15, 0, 5, 5, 9]
    sel_a, sel_b = read_frames(path, idx, backend="decord"), read_frames(path, idx, backend="av")
    assert torch.equal(sel_a, sel_b) and torch.equal(sel_a, a[idx])


def test_num_frames_and_chunking(clip):
    path, _ = clip
    full = read_frames(path)
    got = read_frames(path, num_frames=4)
    assert torch.equal(got, full[uniform_indices(T, 4)])
    idx = list(range(T))[::-1]
    assert torch.equal(read_frames(path, idx, backend="decord", chunk_size=3), full[idx])
    assert torch.equal(read_frames(path, np.array([2, 3])), full[[2, 3]])


def test_auto_falls_back_to_av(clip, monkeypatch):
    path, _ = clip
    expected = read_frames(path, backend="av")

    def broken(p):
        raise V._unreadable(p, "decord: simulated failure")

    monkeypatch.setattr(V, "_decord_open", broken)
    assert torch.equal(read_frames(path, backend="auto"), expected)
    assert video_info(path, backend="auto").num_frames == T
    with pytest.raises(DataError, match="simulated failure"):
        read_frames(path, backend="decord")


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", ["decord", "av", "auto"])
def test_missing_file(tmp_path, backend):
    missing = tmp_path / "nope.mp4"
    for fn in (read_frames, video_info):
        with pytest.raises(DataError, match=r"nope\.mp4: no such video file; fix: check the path"):
            fn(missing, backend=backend)


@pytest.mark.parametrize("backend", ["decord", "av", "auto"])
def test_corrupt_file(tmp_path, backend):
    bad = tmp_path / "noise.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for fn in (read_frames, video_info):
        with pytest.raises(DataError) as e:
            fn(bad, backend=backend)
        msg = str(e.value)
        assert "noise.mp4" in msg and "cannot be read as a video" in msg and "fix:" in msg
    if backend == "auto":  # both backends tried, both named
        assert "decord" in msg and "PyAV" in msg


def test_directory_is_not_a_video(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_frames(tmp_path)


@pytest.mark.parametrize("backend", ["decord", "av", "auto"])
def test_indices_out_of_range(clip, backend):
    path, _ = clip
    for idx in ([0, T], [-1]):
        with pytest.raises(V.FrameIndexError) as e:  # a DataError; auto does not hide it behind a fallback
            read_frames(path, idx, backend=backend)
        msg = str(e.value)
        assert str(path) in msg and f"has {T} frames" in msg and "uniform_indices" in msg


def test_bad_arguments(clip):
    path, _ = clip
    with pytest.raises(ValueError, match="not both"):
        read_frames(path, [0], num_frames=2)
    with pytest.raises(ValueError, match="backend"):
        read_frames(path, backend="opencv")
    with pytest.raises(ValueError, match="empty"):
        read_frames(path, [])
    with pytest.raises(ValueError, match="integers"):
        read_frames(path, [1.5])


# --------------------------------------------------------------------------------------------- synthetic


def test_moving_shape_video_is_deterministic_and_ordered():
    a, b = moving_shape_video(12, 32, seed=5), moving_shape_video(12, 32, seed=5)
    assert torch.equal(a.frames, b.frames) and a.caption == b.caption and a.positions == b.positions
    others = [moving_shape_video(12, 32, seed=s) for s in range(6)]
    assert len({o.caption for o in others}) > 1
    assert len({o.frames.numpy().tobytes() for o in others}) == len(others)
    many = [moving_shape_video(13, (32, 48), seed=s, n_segments=k) for s in range(10) for k in (3, 4)]
    for v in [*others, *many]:
        t, h, w, _ = v.frames.shape
        assert v.caption == v.segment_captions[0] + "".join(f", then {d}" for d in v.directions[1:])
        assert all(x != y for x, y in pairwise(v.directions))  # order always matters
        assert v.directions[::-1] != v.directions
        assert v.segments[0][0] == 0 and v.segments[-1][1] == t
        assert all(e == s2 for (_, e), (s2, _) in pairwise(v.segments))
        assert all(0 <= y <= h - v.shape_size and 0 <= x <= w - v.shape_size for y, x in v.positions)
        for (start, end), d in zip(v.segments, v.directions, strict=True):
            # within each move the shape goes only the way the caption says, and it does go
            dy, dx = DIRECTIONS[d]
            (y0, x0), (y1, x1) = v.positions[start], v.positions[end - 1]
            assert end - 1 > start and np.sign(y1 - y0) == dy and np.sign(x1 - x0) == dx
            for (ya, xa), (yb, xb) in pairwise(v.positions[start:end]):
                assert (yb - ya) * dy >= 0 and (xb - xa) * dx >= 0 and (yb - ya) * dx == 0 and (xb - xa) * dy == 0


def test_write_video_checks_and_mpeg4(tmp_path):
    frames = moving_shape_video(8, 32, seed=0).frames
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", frames[:, :31], 8)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", frames.float(), 8)
    path = write_video(tmp_path / "m4.mp4", frames, 8, codec="mpeg4")
    got = read_frames(path, backend="av")
    assert got.shape == frames.shape and (got.float() - frames.float()).abs().mean() < 6
    assert torch.equal(got, read_frames(path, backend="decord"))
