"""Bad VLM rows, generated: every defect class (bad media files, placeholder counts, missing / empty / mistyped
fields, ...) in every row format, placed in a file between good rows. Strict mode: one DataError naming that row
(file:row), the field and the fix; ``skip_bad_rows``: exactly the good rows, the bad one counted under its
reason; never any other exception. A seeded random mutation pass then looks for what the list misses.
Deterministic; a few seconds (media: 32 px, 8 frames)."""

from __future__ import annotations

import copy
import json
import random
import wave
from collections.abc import Callable
from pathlib import Path

import av
import pytest
from PIL import Image

from mmalign.data.rows import ALWAYS_DROPPED, DataError
from mmalign.data.synthetic_video import moving_shape_video
from mmalign.data.vlm_media import MediaSpec
from mmalign.data.vlm_rows import read_vlm_rows

from .test_vlm_rows import make_media

SPEC = MediaSpec(max_frames=4, max_pixels=28 * 28)


def _faststart_mp4(path: Path) -> bytes:
    """An mp4 with its index (moov) before the frames: cut short, its header still promises 8 frames."""
    frames = moving_shape_video(8, 32, seed=5).frames.numpy()
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path.read_bytes()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = make_media(tmp_path_factory.mktemp("fuzz_media"))
    data = _faststart_mp4(d / "fs.mp4")
    mdat = data.find(b"mdat")
    (d / "truncated.mp4").write_bytes(data[: mdat + 8 + (len(data) - mdat) // 3])  # frames cut off mid-stream
    (d / "no_frames.mp4").write_bytes(data[: mdat + 4])  # a header for 8 frames, no frame data at all
    (d / "empty.mp4").write_bytes(b"")
    (d / "empty.png").write_bytes(b"")
    (d / "text.mp4").write_text("not a video\n" * 20)
    with wave.open(str(d / "sound.wav"), "wb") as w:  # a media file FFmpeg opens, with no video stream
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(1600))
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    png = (d / "red.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    Image.new("RGB", (16, 16), (1, 2, 3)).save(d / "still.png")
    return d


def _good(fmt: str) -> list[dict]:
    """Three good rows of a format (different texts, so none is a duplicate)."""
    out = []
    for i, (ch, rj) in enumerate([("red square", "blue disc"), ("moves left", "moves up"), ("a shape", "nothing")]):
        if fmt == "trl_image":
            out.append({"images": ["red.png"], "prompt": [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": f"Q{i}?"}]}],
                "chosen": [{"role": "assistant", "content": ch}], "rejected": [{"role": "assistant", "content": rj}]})
        elif fmt == "trl_video":
            out.append({"videos": ["a.mp4"], "prompt": f"<video>Q{i}?", "chosen": ch, "rejected": rj})
        elif fmt in ("swift_video", "swift_image"):
            kind, col, file = ("video", "videos", "a.mp4") if fmt == "swift_video" else ("image", "images", "red.png")
            out.append({"messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": f"<{kind}>Q{i}?"},
                                     {"role": "assistant", "content": ch}], "rejected_response": rj, col: [file]})
        else:  # temple
            out.append({"prompt": f"Describe {i}.", "chosen": ch, "rejected": rj, "videos": ["a.mp4"],
                        "perturbation": "drop", "magnitude": 4, "video_id": "a"})
    return out


FORMATS = ["trl_image", "trl_video", "swift_video", "swift_image", "temple"]


def _media_col(row: dict) -> str:
    return "images" if "images" in row else "videos"


def _set_media(value, kind: str | None = None) -> Callable[[dict, str], dict | None]:
    """A builder putting ``value`` in the row's media column (only for rows holding ``kind`` media, if given)."""
    def make(row: dict, fmt: str) -> dict | None:
        col = _media_col(row)
        if kind is not None and col != kind:
            return None
        return {**row, col: [value]}
    return make


def _prompt_text(row: dict, fmt: str, text_of: Callable[[str], str]) -> dict:
    row = copy.deepcopy(row)
    if fmt.startswith("swift"):
        row["messages"][1]["content"] = text_of(row["messages"][1]["content"])
    elif fmt == "trl_image":
        row["prompt"][0]["content"].append({"type": "text", "text": text_of("")})
    else:
        row["prompt"] = text_of(row["prompt"])
    return row


def _placeholders(n_extra: int) -> Callable[[dict, str], dict]:
    kind = {"trl_image": "image", "swift_image": "image"}
    return lambda r, f: _prompt_text(r, f, lambda t: t + f"<{kind.get(f, 'video')}>" * n_extra)


def _chosen(value) -> Callable[[dict, str], dict]:
    def make(row: dict, fmt: str) -> dict:
        row = copy.deepcopy(row)
        if fmt.startswith("swift"):
            if value is _DELETE:
                row["messages"] = row["messages"][:-1]
            else:
                row["messages"][-1]["content"] = value
        elif value is _DELETE:
            del row["chosen"]
        else:
            row["chosen"] = [{"role": "assistant", "content": value}] if fmt == "trl_image" else value
        return row
    return make


def _rejected(value) -> Callable[[dict, str], dict]:
    def make(row: dict, fmt: str) -> dict:
        row = copy.deepcopy(row)
        key = "rejected_response" if fmt.startswith("swift") else "rejected"
        if value is _DELETE:
            del row[key]
        elif fmt == "trl_image" and isinstance(value, str):
            row[key] = [{"role": "assistant", "content": value}]
        else:
            row[key] = value
        return row
    return make


_DELETE = object()
_VIDEO_ROWS, _IMAGE_ROWS = "videos", "images"

# name -> (reason counted when skipped, builder(good row, format) -> bad row, raw JSON text, or None if n/a)
DEFECTS: dict[str, tuple[str, Callable]] = {
    "missing_media_file": ("missing_media", lambda r, f: _set_media("nope" + Path(r[_media_col(r)][0]).suffix)(r, f)),
    "media_is_a_directory": ("missing_media", _set_media(".")),
    "empty_video_file": ("empty_media_file", _set_media("empty.mp4", _VIDEO_ROWS)),
    "empty_image_file": ("empty_media_file", _set_media("empty.png", _IMAGE_ROWS)),
    "truncated_video": ("bad_video", _set_media("truncated.mp4", _VIDEO_ROWS)),
    "zero_decodable_frames": ("bad_video", _set_media("no_frames.mp4", _VIDEO_ROWS)),
    "text_file_as_video": ("bad_video", _set_media("text.mp4", _VIDEO_ROWS)),
    "audio_file_as_video": ("bad_video", _set_media("sound.wav", _VIDEO_ROWS)),
    "image_as_video": ("not_a_video", _set_media("still.png", _VIDEO_ROWS)),
    "unreadable_image": ("bad_image", _set_media("bad.png", _IMAGE_ROWS)),
    "truncated_image": ("bad_image", _set_media("truncated.png", _IMAGE_ROWS)),
    "video_as_image": ("bad_image", _set_media("a.mp4", _IMAGE_ROWS)),
    "remote_media": ("remote_media", _set_media("https://example.com/v.mp4")),
    "media_path_not_a_string": ("bad_type", _set_media(7)),
    "media_as_bytes": ("bad_type", _set_media({"bytes": "iVBORw0KGgo=", "path": None})),
    "media_column_a_number": ("bad_type", lambda r, f: {**r, _media_col(r): 7}),
    "more_placeholders_than_media": ("media_count_mismatch", lambda r, f: _placeholders(2)(r, f)),
    "more_media_than_placeholders": ("media_count_mismatch", lambda r, f: None if f == "temple" else {
        **r, _media_col(r): r[_media_col(r)] * 2}),
    "placeholder_without_media": ("media_count_mismatch",
                                  lambda r, f: None if f == "temple" else {k: v for k, v in r.items()
                                                                          if k != _media_col(r)}),
    "placeholder_in_chosen": ("media_in_completion", _chosen("see <video>")),
    "unknown_content_part": ("bad_type", lambda r, f: None if f != "trl_image" else {
        **r, "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}]}]}),
    "missing_chosen": ("missing_field", lambda r, f: None if f.startswith("swift") else _chosen(_DELETE)(r, f)),
    "no_assistant_turn": ("no_assistant_turn", lambda r, f: _chosen(_DELETE)(r, f) if f.startswith("swift") else None),
    "empty_chosen": ("empty_completion", _chosen("  ")),
    "missing_rejected": ("missing_field", _rejected(_DELETE)),
    "empty_rejected": ("empty_completion", _rejected("")),
    "chosen_a_number": ("bad_type", _chosen(5)),
    "rejected_a_list_of_numbers": ("bad_type", _rejected([1, 2])),
    "prompt_a_number": ("bad_type", lambda r, f: None if f.startswith("swift") else {**r, "prompt": 7}),
    "messages_a_string": ("bad_type", lambda r, f: {**r, "messages": "hi"} if f.startswith("swift") else None),
    "identical_candidates": ("identical_candidates", lambda r, f: _rejected(
        r["chosen"][0]["content"] if f == "trl_image" else r["messages"][-1]["content"] if f.startswith("swift")
        else r["chosen"])(r, f)),
    "audio_column": ("unsupported_field", lambda r, f: {**r, "audios": ["sound.wav"]}),
    "rejected_images_column": ("unsupported_field", lambda r, f: {**r, "rejected_images": ["green.png"]}),
    "cut_off_line": ("invalid_json", lambda r, f: json.dumps(r)[:30]),
    "not_an_object": ("not_an_object", lambda r, f: json.dumps([r])),
}

CASES = [(fmt, name) for fmt in FORMATS for name, (_, make) in DEFECTS.items() if make(_good(fmt)[1], fmt) is not None]


def _line(row) -> str:
    return row if isinstance(row, str) else json.dumps(row)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("fmt,defect", CASES, ids=[f"{f}-{d}" for f, d in CASES])
def test_each_defect_is_a_clean_error_or_a_counted_skip(fmt, defect, media, tmp_path):
    reason, make = DEFECTS[defect]
    good = _good(fmt)
    path = _write(tmp_path / "rows.jsonl", [_line(good[0]), _line(make(good[1], fmt)), _line(good[2]), _line(good[0])])
    if reason in ALWAYS_DROPPED:  # well-formed but without a preference: dropped and counted either way
        ex, counts = read_vlm_rows(path, media=SPEC, root=media)
        assert [e.row for e in ex] == [1, 3, 4] and counts.skipped == {reason: 1}
    else:
        with pytest.raises(DataError) as err:
            read_vlm_rows(path, media=SPEC, root=media)
        msg = str(err.value)
        assert f"{path}:2:" in msg and "fix:" in msg and "skip_bad_rows" in msg, msg
        assert "Traceback" not in msg and len(msg) < 2000 and msg.count(f"{path}:") == 1, msg
        assert [p.reason for p in err.value.problems] in ([], [reason])  # [] for lines that are not JSON
    ex, counts = read_vlm_rows(path, media=SPEC, root=media, skip_bad_rows=True)
    assert [e.row for e in ex] == [1, 3, 4] and [e.candidates for e in ex] == [
        _read_one(media, r).candidates for r in (good[0], good[2], good[0])]
    assert counts.read == 4 and counts.good == 3 and counts.skipped == {reason: 1}, counts
    assert all(len(e.videos) + len(e.images) == 1 for e in ex)


def _read_one(media: Path, row: dict):
    path = media / "one.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return read_vlm_rows(path, media=SPEC, root=media)[0][0]


def test_a_whole_file_of_defects_reports_each_row(media, tmp_path):
    """Many bad rows at once: one error listing the first 10, each by its own row number, the rest counted.
    (Lines that are not JSON objects stop the file reader at the first one, as for text rows: left out here.)"""
    good = _good("trl_video")
    defects = [n for f, n in CASES if f == "trl_video"
               and DEFECTS[n][0] not in (*ALWAYS_DROPPED, "invalid_json", "not_an_object")]
    decoded = {"bad_video", "not_a_video"}  # found only by decoding the file
    ordered = [n for n in defects if DEFECTS[n][0] not in decoded] + [n for n in defects if DEFECTS[n][0] in decoded]
    assert len(ordered) - len(decoded) > 10
    lines = [_line(good[0])] + [_line(DEFECTS[n][1](good[1], "trl_video")) for n in ordered]
    path = _write(tmp_path / "all.jsonl", lines)
    with pytest.raises(DataError) as err:
        read_vlm_rows(path, media=SPEC, root=media)
    # past 10 bad rows media are no longer decoded (the run stops anyway): the bad-content videos at the end go
    # unnoticed, and the message says so
    msg = str(err.value)
    assert "bad rows (the first 10 shown)" in msg and "checked to exist but not decoded" in msg, msg
    assert [p.row for p in err.value.problems] == list(range(2, 12))
    ex, counts = read_vlm_rows(path, media=SPEC, root=media, skip_bad_rows=True)
    assert [e.row for e in ex] == [1] and counts.total_skipped == len(defects)
    assert counts.skipped["bad_video"] == 4 and counts.skipped["not_a_video"] == 1


# --------------------------------------------------------------------------------------------------------------
# Random mutations: whatever a seeded mutation of a good row does, the outcome is one of the allowed ones.

POOL = [None, True, 0, -1, 1.5, "", " ", "x", "<video>", "<image><image>", [], {}, [{}], [0, 0], ["a.mp4"],
        ["red.png"], ["a.mp4", "b.mp4"], ["empty.mp4"], ["truncated.mp4"], ["still.png"], ["bad.png"], "a.mp4",
        {"path": "red.png"}, {"type": "video"}, [{"type": "image"}], [{"role": "assistant", "content": "8"}],
        [{"role": "user", "content": [{"type": "video"}]}], [{"role": "assistant", "content": ["8"]}],
        [{"role": "robot", "content": "x"}], {"role": "assistant", "content": "8"}]
KEYS = ["prompt", "chosen", "rejected", "completion", "label", "messages", "rejected_response", "images", "videos",
        "image", "video", "rejected_images", "perturbation", "completions", "ranking"]


def _places(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _places(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _places(v, (*path, i))


def _mutate(row: dict, rng: random.Random) -> str:
    row = copy.deepcopy(row)
    op = rng.choice(["replace", "replace", "replace", "delete", "add", "cut"])
    if op == "cut":
        text = json.dumps(row)
        return text[: rng.randrange(1, len(text))]
    if op == "add":
        row[rng.choice(KEYS)] = copy.deepcopy(rng.choice(POOL))
        return json.dumps(row)
    path = rng.choice([p for p in _places(row) if p])
    parent = row
    for step in path[:-1]:
        parent = parent[step]
    if op == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(rng.choice(POOL))
    return json.dumps(row)


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_mutations_never_escape_as_other_exceptions(fmt, media, tmp_path):
    rng = random.Random(f"vlm-{fmt}")
    good = _good(fmt)
    outcomes = {"kept": 0, "error": 0, "dropped": 0}
    for i in range(25):
        path = _write(tmp_path / f"m{i}.jsonl", [_line(good[0]), _mutate(good[1], rng), _line(good[2])])
        try:
            ex, counts = read_vlm_rows(path, media=SPEC, root=media)
            assert [e.row for e in ex] in ([1, 2, 3], [1, 3]), counts
            outcomes["kept" if len(ex) == 3 else "dropped"] += 1
        except DataError as e:
            assert f"{path}:2:" in str(e) and "fix:" in str(e), str(e)
            outcomes["error"] += 1
            ex, counts = read_vlm_rows(path, media=SPEC, root=media, skip_bad_rows=True)
            assert [e.row for e in ex] == [1, 3] and counts.total_skipped == 1, counts
    assert outcomes["error"] >= 5, outcomes  # the mutations do exercise the error paths
