"""VLM preference rows (``mmalign.data.vlm_rows``) and their media (``mmalign.data.vlm_media``): every row format,
the frame-sampling and resize arithmetic (Qwen2-VL's ``qwen_vl_utils`` rules), placeholders, and the ms-swift
writer's round trip. Media are tiny synthetic files (≤ 32 px, ≤ 8 frames) made per module."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmalign.data.pairs import write_jsonl
from mmalign.data.rows import DataError
from mmalign.data.synthetic_video import write_moving_shape_video
from mmalign.data.temple import VideoResponses, build_temple_pairs
from mmalign.data.video import read_frames
from mmalign.data.vlm_media import MediaSpec, sample_frame_indices, smart_resize
from mmalign.data.vlm_rows import VLMExample, read_vlm_rows, write_swift_video_dpo

T, FPS, SIZE = 8, 8, 32
RED, GREEN = (200, 10, 10), (10, 200, 10)


def make_media(d: Path) -> Path:
    """a.mp4: 8 frames at 8 fps, 32x32; b.mp4: 6 frames at 4 fps, 16x32; red.png 32x24; green.png 20x20."""
    write_moving_shape_video(d / "a.mp4", T, SIZE, seed=1, fps=FPS)
    write_moving_shape_video(d / "b.mp4", 6, (16, 32), seed=2, fps=4)
    Image.new("RGB", (32, 24), RED).save(d / "red.png")
    Image.new("RGB", (20, 20), GREEN).save(d / "green.png")
    return d


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return make_media(tmp_path_factory.mktemp("media"))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


def assistant(content) -> list[dict]:
    return [{"role": "assistant", "content": content}]


# --------------------------------------------------------------------------------------------- arithmetic


def test_smart_resize_worked_examples():
    # no bounds given to smart_resize: each side only rounds to the factor (32/28 -> 1 patch)
    assert smart_resize(32, 32) == (28, 28)
    # too large: 112x196 rounded > 3136, beta = sqrt(100*200/3136) = 2.525; floor(39.6/28)=1, floor(79.2/28)=2
    assert smart_resize(100, 200, max_pixels=28 * 28 * 4) == (28, 56)
    # too small: 28x56 rounded < 12544, beta = sqrt(12544/1800) = 2.640; ceil(79.2/28)=3, ceil(158.4/28)=6
    assert smart_resize(30, 60, min_pixels=28 * 28 * 16) == (84, 168)
    assert smart_resize(64, 64, factor=32, max_pixels=32 * 32) == (32, 32)  # Qwen3-VL's factor
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201)


def test_smart_resize_keeps_bounds_factor_and_aspect():
    rng = random.Random(0)
    for _ in range(500):
        h = rng.randint(8, 3000)
        w = max(1, int(h * rng.uniform(0.25, 4)))
        factor = rng.choice([14, 28, 32])
        lo = rng.randint(1, 64) * factor * factor
        tight = lo + rng.randint(0, 8) * factor * factor
        rh, rw = smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=tight)
        assert rh % factor == 0 and rw % factor == 0 and rh * rw <= tight, (h, w, factor, lo, tight, rh, rw)
        # bounds 4x apart (and >= 16 patches) always leave room: a floor loses at most half of each side
        wide = 4 * lo + rng.randint(16, 256) * factor * factor
        rh, rw = smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=wide)
        assert rh % factor == 0 and rw % factor == 0 and rh >= factor and rw >= factor
        assert lo <= rh * rw <= wide, (h, w, factor, lo, wide, rh, rw)
        # aspect kept up to one factor of rounding on each side
        assert (rh - factor) / (rw + factor) <= h / w <= (rh + factor) / max(rw - factor, 1)
    # 20x20 with bounds [2 patches, 3 patches]: ceil gives 56x56 > max, so the floor (28x28) is taken
    assert smart_resize(20, 20, min_pixels=2 * 784, max_pixels=3 * 784) == (28, 28)


def test_smart_resize_equals_transformers_qwen2_vl():
    """Where the deviation (max_pixels winning over a ceil that overshoots it) does not apply, the result is the
    installed transformers' Qwen2-VL smart_resize (the one its image and video processors use)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    rng = random.Random(1)
    compared = 0
    for _ in range(2000):
        h, w = rng.randint(1, 2000), rng.randint(1, 2000)
        if max(h, w) / min(h, w) > 200:
            continue
        factor = rng.choice([14, 28, 32])
        lo = rng.randint(1, 400) * factor * factor
        hi = lo + rng.randint(0, 2000) * factor * factor
        want = reference(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
        if want[0] * want[1] <= hi:
            assert smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi) == want, (h, w, factor, lo, hi)
            compared += 1
    assert compared > 1500


def test_frame_count_equals_transformers_qwen2_vl_in_fps_mode(monkeypatch):
    """The count n, as transformers' sample_frames computes it. Its indices come from a float
    ``arange(0, total, total / n)``, which can hold n + 1 entries (839 frames, n = 26: 26 x 32.269... < 839), so n
    is read from the step it passes to arange rather than from the length of its result."""
    import torch
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    steps = []
    arange = torch.arange
    monkeypatch.setattr(torch, "arange", lambda *a, **k: (steps.append(a), arange(*a, **k))[1])
    processor = Qwen2VLVideoProcessor()
    rng = random.Random(2)
    for _ in range(300):
        total, video_fps = rng.randint(4, 900), rng.choice([8.0, 24.0, 25.0, 29.97, 30.0, 60.0])
        fps, tp = rng.choice([0.5, 1.0, 2.0, 4.0]), rng.choice([1, 2])
        # min_frames a multiple of the temporal patch: qwen_vl_utils (and here) ceil it to one, transformers not
        lo, hi = rng.choice([2, 4]) if tp == 2 else rng.choice([1, 2, 4]), rng.choice([4, 8, 16, 64, 768])
        processor.sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps), fps=fps, min_frames=lo,
                                max_frames=hi, temporal_patch_size=tp)
        start, end, step = steps[-1]
        spec = MediaSpec(fps=fps, min_frames=lo, max_frames=hi, frame_factor=tp)
        idx, eff = sample_frame_indices(total, video_fps, spec)
        assert (start, end) == (0, total) and len(idx) == round(total / step), (total, video_fps, fps, tp, lo, hi)
        assert eff == pytest.approx(len(idx) / total * video_fps)


def test_frame_sampling_arithmetic():
    # fps mode: 8 frames at 8 fps = 1 s; at 4 fps -> 4 frames, round(linspace(0, 7, 4)) = [0, 2, 5, 7]
    assert sample_frame_indices(8, 8.0, MediaSpec(fps=4)) == ([0, 2, 5, 7], 4.0)
    # the max_frames cap: 10 s at 30 fps, 2 fps -> 20, capped at 16; effective fps 16/300*30 = 1.6
    idx, fps = sample_frame_indices(300, 30.0, MediaSpec(fps=2, max_frames=16))
    assert len(idx) == 16 and idx[0] == 0 and idx[-1] == 299 and fps == pytest.approx(1.6)
    # never above the frame count; a short clip sampled faster than the video is sampled at its own rate
    assert sample_frame_indices(8, 8.0, MediaSpec(fps=100)) == (list(range(8)), 8.0)
    # uniform mode: min(max_frames, num_frames) frames, ends included (3.5 rounds half to even -> 4)
    assert sample_frame_indices(8, 8.0, MediaSpec(max_frames=3)) == ([0, 4, 7], 3.0)
    assert sample_frame_indices(5, 2.0, MediaSpec(max_frames=16)) == ([0, 1, 2, 3, 4], 2.0)
    # fps mode floors: 9 frames at 1 fps, 1 fps -> 9; 0.5 s at 2 fps -> floor(1.0) = 1 frame (min_frames=1)
    assert len(sample_frame_indices(9, 1.0, MediaSpec(fps=1))[0]) == 9
    assert sample_frame_indices(4, 8.0, MediaSpec(fps=2)) == ([0], 2.0)


def test_frame_sampling_with_qwen_vl_utils_settings():
    qwen = MediaSpec(fps=2, min_frames=4, max_frames=768, frame_factor=2)
    assert len(sample_frame_indices(300, 30.0, qwen)[0]) == 20  # 10 s x 2 fps
    idx, fps = sample_frame_indices(30, 30.0, qwen)  # 1 s -> 2 frames, raised to min_frames = 4
    assert idx == [0, 10, 19, 29] and fps == 4.0
    assert len(sample_frame_indices(9, 1.0, MediaSpec(fps=1, frame_factor=2))[0]) == 8  # floored to even
    with pytest.raises(ValueError, match="fewer than frame_factor"):
        sample_frame_indices(1, 8.0, qwen)


def test_media_spec_reports_every_bad_value():
    with pytest.raises(ValueError) as err:
        MediaSpec(fps=0, max_frames=0, min_pixels=-1, factor=True, backend="cv2")
    msg = str(err.value)
    for bad in ("fps=0", "max_frames=0", "min_pixels=-1", "factor=True", "backend='cv2'"):
        assert bad in msg, msg
    with pytest.raises(ValueError, match="min_pixels=5000 > max_pixels=4000"):
        MediaSpec(min_pixels=5000, max_pixels=4000)
    with pytest.raises(ValueError, match="below one 28x28 patch"):
        MediaSpec(max_pixels=100)


# --------------------------------------------------------------------------------------------- formats


def test_trl_image_rows_parts_and_markers(media, tmp_path):
    rows = [
        {"images": ["red.png"], "prompt": user([{"type": "image"}, {"type": "text", "text": "Colour?"}]),
         "chosen": assistant([{"type": "text", "text": "red"}]), "rejected": assistant("green")},
        {"image": "green.png", "prompt": "<image>Colour?", "chosen": "green", "rejected": "red"},
        {"images": ["red.png", "green.png"], "prompt": "First <image> then <image>: colours?",
         "chosen": "red, green", "rejected": "green, red"},
    ]
    ex, counts = read_vlm_rows(write_rows(tmp_path / "r.jsonl", rows), media=MediaSpec(), root=media)
    assert [e.candidates for e in ex] == [["red", "green"], ["green", "red"], ["red, green", "green, red"]]
    assert ex[0].prompt == user([{"type": "image"}, {"type": "text", "text": "Colour?"}])
    assert ex[1].prompt == ex[0].prompt  # the string marker gives the same parts
    assert ex[2].prompt[0]["content"] == [{"type": "text", "text": "First "}, {"type": "image"},
                                          {"type": "text", "text": " then "}, {"type": "image"},
                                          {"type": "text", "text": ": colours?"}]
    assert ex[0].images[0].size == (32, 24) and ex[0].images[0].getpixel((3, 3)) == RED  # no bounds: no resize
    assert [im.getpixel((0, 0)) for im in ex[2].images] == [RED, GREEN]
    assert all(e.kind == "pairs" and e.label is None and e.format == "trl" and not e.videos for e in ex)
    assert counts.as_dict() == {"rows_read": 3, "rows_used": 3, "rows_skipped": 0, "format/trl": 3}


def test_trl_video_rows_sample_and_resize(media, tmp_path):
    rows = [{"videos": ["a.mp4"], "prompt": user([{"type": "video"}, {"type": "text", "text": "What moves?"}]),
             "chosen": assistant("a shape"), "rejected": assistant("nothing")},
            {"video": "b.mp4", "prompt": "<video>What moves?", "chosen": "a shape", "rejected": "nothing"}]
    path = write_rows(tmp_path / "v.jsonl", rows)
    ex, _ = read_vlm_rows(path, media=MediaSpec(fps=4), root=media)
    assert ex[0].video_fps == [4.0] and ex[0].videos[0].dtype == np.uint8
    assert np.array_equal(ex[0].videos[0], read_frames(media / "a.mp4", [0, 2, 5, 7]).numpy())
    # b.mp4: 6 frames at 4 fps = 1.5 s -> floor(6) = 6 frames at 4 fps
    assert ex[1].videos[0].shape == (6, 16, 32, 3) and ex[1].video_fps == [4.0]
    assert ex[1].prompt == ex[0].prompt
    small, _ = read_vlm_rows(path, media=MediaSpec(max_frames=3, max_pixels=28 * 28 * 2), root=media)
    assert small[0].videos[0].shape == (3, 28, 28, 3) and small[0].video_fps == [3.0]
    # 16x32 rounds to 28x28 (round(16/28) = round(32/28) = 1 patch); fps 3/6 x 4
    assert small[1].videos[0].shape == (3, 28, 28, 3) and small[1].video_fps == [2.0]
    big, _ = read_vlm_rows(path, media=MediaSpec(max_frames=2, min_pixels=56 * 56), root=media)
    assert big[0].videos[0].shape == (2, 56, 56, 3)


def test_unpaired_and_ranked_rows(media, tmp_path):
    rows = [{"videos": ["a.mp4"], "prompt": "Describe.", "completion": "a moving shape", "label": True},
            {"videos": ["a.mp4"], "prompt": "Describe.", "completion": "a cat", "label": "no"}]
    ex, _ = read_vlm_rows(write_rows(tmp_path / "u.jsonl", rows), media=MediaSpec(), root=media)
    assert [(e.kind, e.candidates, e.label) for e in ex] == [("unpaired", ["a moving shape"], True),
                                                            ("unpaired", ["a cat"], False)]
    assert ex[0].videos[0] is ex[1].videos[0]  # one decode per file and call
    ranked = [{"images": ["red.png"], "prompt": "Colour?", "completions": ["blue", "red", "pink"],
               "ranking": [2, 0, 1]},
              {"images": ["red.png"], "prompt": "Colour?", "completions": ["red", "blue"], "scores": [0.9, 0.1]}]
    ex, _ = read_vlm_rows(write_rows(tmp_path / "k.jsonl", ranked), media=MediaSpec(), root=media)
    assert [e.candidates for e in ex] == [["red", "pink", "blue"], ["red", "blue"]]  # best first


def test_swift_rows(media, tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<video>Describe."},
                          {"role": "assistant", "content": "a shape moves"}],
             "rejected_response": "nothing moves", "videos": ["a.mp4"]},
            {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"},
                          {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes"}],
             "rejected_response": "no", "images": ["red.png"]}]
    ex, counts = read_vlm_rows(write_rows(tmp_path / "s.jsonl", rows), media=MediaSpec(max_frames=2), root=media)
    assert ex[0].prompt == [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe."}]}]
    assert ex[0].candidates == ["a shape moves", "nothing moves"] and ex[0].videos[0].shape[0] == 2
    assert [m["role"] for m in ex[1].prompt] == ["user", "assistant", "user"] and ex[1].candidates == ["yes", "no"]
    assert counts.formats == {"swift": 2}
    kto = [{**rows[0], "label": False}, {**rows[0], "label": True}]
    for r in kto:
        del r["rejected_response"]
    ex, _ = read_vlm_rows(write_rows(tmp_path / "kto.jsonl", kto), media=MediaSpec(max_frames=2), root=media)
    assert [(e.kind, e.label, e.candidates) for e in ex] == [("unpaired", False, ["a shape moves"]),
                                                            ("unpaired", True, ["a shape moves"])]
    sft = [{k: v for k, v in rows[0].items() if k != "rejected_response"}]
    ex, _ = read_vlm_rows(write_rows(tmp_path / "sft.jsonl", sft), media=MediaSpec(max_frames=2), root=media)
    assert ex[0].kind == "sft" and ex[0].label is None and ex[0].candidates == ["a shape moves"]


def test_swift_rejected_context_is_refused_with_swift_field_names(media, tmp_path):
    rows = [{**_swift_row(), "rejected_images": ["green.png"]}, {**_swift_row(), "rejected_response": ""}]
    with pytest.raises(DataError) as err:
        read_vlm_rows(write_rows(tmp_path / "s.jsonl", rows), media=MediaSpec(), root=media)
    assert [(p.row, p.reason, p.field) for p in err.value.problems] == [
        (1, "unsupported_field", "rejected_images"), (2, "empty_completion", "rejected_response")]


def _swift_row() -> dict:
    return {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
            "rejected_response": "green", "images": ["red.png"]}


@pytest.mark.parametrize("video_token", ["", "<video>"])
def test_temple_pair_rows(media, tmp_path, video_token):
    responses = [VideoResponses("a.mp4", "the shape moves left, then up, then right",
                                {"drop_2": "the shape moves left", "reverse_4": "the shape moves right, then up, "
                                 "then left"})]
    rows, stats = build_temple_pairs(responses, base_dir=media, video_token=video_token)
    assert stats["pairs"] == 2
    pairs = write_jsonl(rows, tmp_path / "out" / "pairs.jsonl")  # paths stay relative to the videos' folder
    with pytest.raises(DataError, match="pass root="):
        read_vlm_rows(pairs, media=MediaSpec(max_frames=4))
    ex, counts = read_vlm_rows(pairs, media=MediaSpec(max_frames=4), root=media)
    assert counts.formats == {"temple": 2} and [e.meta["perturbation"] for e in ex] == ["drop", "reverse"]
    assert ex[0].meta["magnitude"] == 2 and ex[0].candidates == [rows[0]["chosen"], rows[0]["rejected"]]
    assert ex[0].prompt[0]["content"][0] == {"type": "video"} and len(ex[0].prompt[0]["content"]) == 2
    assert ex[0].videos[0].shape == (4, SIZE, SIZE, 3) and ex[0].videos[0] is ex[1].videos[0]


def test_media_paths_relative_to_the_data_file(media, tmp_path):
    rows = [{"images": [str(media / "red.png")], "prompt": "<image>?", "chosen": "red", "rejected": "blue"},
            {"images": ["red.png"], "prompt": "<image>?", "chosen": "red", "rejected": "blue"}]
    ex, _ = read_vlm_rows(write_rows(media / "local.jsonl", rows), media=MediaSpec())
    assert ex[0].image_paths == ex[1].image_paths == [str(media / "red.png")]
    (media / "local.jsonl").unlink()


def test_placeholders_are_added_or_must_match(media, tmp_path):
    base = {"chosen": "x", "rejected": "y"}
    good = [{"prompt": [{"role": "system", "content": "S"}, *user("Q")], "chosen": assistant("x"),
             "rejected": assistant("y"), "images": ["red.png"], "videos": ["a.mp4"]},
            {**base, "prompt": "no media at all"}]  # a text-only row inside VLM data (TRL allows it)
    ex, _ = read_vlm_rows(write_rows(tmp_path / "p.jsonl", good), media=MediaSpec(max_frames=2), root=media)
    assert ex[0].prompt[1]["content"] == [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Q"}]
    assert ex[1].prompt == user([{"type": "text", "text": "no media at all"}]) and not ex[1].images
    bad = [{**base, "prompt": "<video><video>Q", "videos": ["a.mp4"]},
           {**base, "prompt": "<image>Q"},
           {**base, "prompt": "Q", "images": ["red.png"], "chosen": "see <image>"}]
    with pytest.raises(DataError) as err:
        read_vlm_rows(write_rows(tmp_path / "b.jsonl", bad), media=MediaSpec(), root=media)
    assert [(p.row, p.reason) for p in err.value.problems] == [
        (1, "media_count_mismatch"), (2, "media_count_mismatch"), (3, "media_in_completion")]
    assert "lists 1 video(s) but the prompt holds 2 <video> placeholder(s)" in str(err.value)


def test_rows_of_one_call_share_one_kind(media, tmp_path):
    rows = [_swift_row(), _swift_row(), {k: v for k, v in _swift_row().items() if k != "rejected_response"},
            {**_swift_row(), "label": True, "rejected_response": None}]
    path = write_rows(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError) as err:
        read_vlm_rows(path, media=MediaSpec(), root=media)
    assert [(p.row, p.reason, p.field) for p in err.value.problems] == [
        (3, "missing_field", "rejected_response"), (4, "mixed_kinds", "<row>")]
    ex, counts = read_vlm_rows(path, media=MediaSpec(), root=media, skip_bad_rows=True)
    assert [e.row for e in ex] == [1, 2] and counts.skipped == {"missing_field": 1, "mixed_kinds": 1}


def test_unpaired_rows_need_labels_and_some_row_must_survive(media, tmp_path):
    rows = [{"images": ["red.png"], "prompt": "<image>?", "completion": "red", "label": True},
            {"images": ["red.png"], "prompt": "<image>?", "completion": "red"},
            {"images": ["red.png"], "prompt": "<image>?", "completion": "blue", "label": 0}]
    with pytest.raises(DataError, match=r"u.jsonl:2: field 'label' is missing \(the other rows are unpaired rows\)"):
        read_vlm_rows(write_rows(tmp_path / "u.jsonl", rows), media=MediaSpec(), root=media)
    with pytest.raises(DataError, match=r"no usable VLM rows \(1 read, skipped: \{'missing_media': 1\}\)"):
        read_vlm_rows(write_rows(tmp_path / "n.jsonl", [{**rows[0], "images": ["gone.png"]}]), media=MediaSpec(),
                      root=media, skip_bad_rows=True)


def test_formats_restriction(media, tmp_path):
    rows = [_swift_row(), {"images": ["red.png"], "prompt": "<image>?", "chosen": "red", "rejected": "blue"}]
    path = write_rows(tmp_path / "f.jsonl", rows)
    ex, counts = read_vlm_rows(path, media=MediaSpec(), root=media, formats=["trl"], skip_bad_rows=True)
    assert [e.row for e in ex] == [2] and counts.skipped == {"format_not_allowed": 1}
    with pytest.raises(ValueError, match="choose from"):
        read_vlm_rows(path, media=MediaSpec(), formats=["llava"])


# --------------------------------------------------------------------------------------------- writing


def _same(a: list[VLMExample], b: list[VLMExample]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.prompt, x.candidates, x.label, x.kind, x.meta) == (y.prompt, y.candidates, y.label, y.kind, y.meta)
        assert (x.image_paths, x.video_paths, x.video_fps) == (y.image_paths, y.video_paths, y.video_fps)
        assert all(np.array_equal(u, v) for u, v in zip(x.videos, y.videos, strict=True))
        assert all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(x.images, y.images, strict=True))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_swift_round_trip(media, tmp_path, suffix):
    rows = [{"videos": ["a.mp4"], "prompt": [{"role": "system", "content": "S"}, *user("Describe.")],
             "chosen": assistant("left then up"), "rejected": assistant("up then left"), "perturbation": "reverse",
             "magnitude": 2},
            {"images": ["red.png", "green.png"], "prompt": "<image> and <image>?", "chosen": "red, green",
             "rejected": "green, red"},
            _swift_row()]
    spec = MediaSpec(fps=4, max_pixels=28 * 28)
    first, _ = read_vlm_rows(write_rows(tmp_path / "in.jsonl", rows), media=spec, root=media)
    out = write_swift_video_dpo(first, media / f"swift{suffix}")  # media under the output's folder: relative
    written = json.loads(out.read_text()) if suffix == ".json" else [json.loads(x) for x in out.read_text().split("\n")
                                                                     if x]
    assert written[0]["videos"] == ["a.mp4"] and written[0]["messages"][1]["content"] == "<video>Describe."
    assert written[0]["rejected_response"] == "up then left" and written[0]["magnitude"] == 2
    again, counts = read_vlm_rows(out, media=spec)
    _same(first, again)
    assert counts.formats == {"swift": 3}
    elsewhere = write_swift_video_dpo(again, tmp_path / "x" / f"swift{suffix}")  # outside: absolute paths
    _same(first, read_vlm_rows(elsewhere, media=spec)[0])
    out.unlink()


def test_writer_takes_raw_rows_and_unpaired_examples(media, tmp_path):
    raw = [{"videos": ["a.mp4"], "prompt": "Describe.", "chosen": "x", "rejected": "y", "perturbation": "drop",
            "magnitude": 4, "video_id": "a"}]
    out = write_swift_video_dpo(raw, tmp_path / "t.jsonl", root=media)
    row = json.loads(out.read_text())
    assert row["messages"] == [{"role": "user", "content": "<video>Describe."}, {"role": "assistant", "content": "x"}]
    assert row["videos"] == [str(media / "a.mp4")] and row["video_id"] == "a"
    with pytest.raises(DataError, match=r"<rows>:1: field 'videos\[0\]'"):
        write_swift_video_dpo([{**raw[0], "videos": ["gone.mp4"]}], tmp_path / "t.jsonl", root=media)
    kto = VLMExample(user([{"type": "text", "text": "Q"}]), ["a"], label=False)
    assert json.loads(write_swift_video_dpo([kto], tmp_path / "k.jsonl").read_text())["label"] is False
    with pytest.raises(ValueError, match="split ranked lists into pairs"):
        write_swift_video_dpo([VLMExample(user("Q"), ["a", "b", "c"])], tmp_path / "r.jsonl")


def test_media_spec_defaults_are_the_documented_ones():
    spec = MediaSpec()
    assert (spec.fps, spec.max_frames, spec.min_pixels, spec.max_pixels) == (None, 16, None, None)
    assert (spec.factor, spec.min_frames, spec.frame_factor, spec.backend) == (28, 1, 1, "auto")
    assert not spec.resizes and MediaSpec(max_pixels=28 * 28).resizes
