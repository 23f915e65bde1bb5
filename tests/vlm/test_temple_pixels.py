"""TEMPLE's pixel path (mmalign.methods.temple_pixels, ``mmalign temple-pairs-vlm``): frame / clip perturbations,
batched generation equal to one-by-one generation, the model's own responses on clean vs perturbed videos, the
released code's filters, and the pair files (jsonl per magnitude, ms-swift JSON, stages) read back as VLM rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mmalign.data.synthetic_video import write_moving_shape_video
from mmalign.data.temple import VideoResponses
from mmalign.data.vlm_media import MediaSpec
from mmalign.data.vlm_rows import read_vlm_rows
from mmalign.methods.temple_pixels import (
    batched_generate,
    generate_pixel_responses,
    load_pixel_videos,
    perturb_frames,
    write_pixel_pairs,
)
from mmalign.models.vlm import save_vlm

from ._tiny_vlm import tiny

SPEC = MediaSpec(fps=None, max_frames=8, factor=8, frame_factor=2)


def _frames(n: int) -> np.ndarray:
    # frame t is filled with value t: the order of the output is readable from its pixels
    return np.stack([np.full((4, 4, 3), t, np.uint8) for t in range(n)])


def _order(frames: np.ndarray) -> list[int]:
    return [int(f[0, 0, 0]) for f in frames]


def test_frame_and_clip_perturbations_follow_the_reference_semantics():
    f = _frames(8)
    out, idx = perturb_frames(f, "drop", 4, seed=1)
    assert len(idx) == 2 and _order(out) == sorted(_order(out)) and _order(out) == idx
    out, idx = perturb_frames(f, "reverse", 16, seed=0)
    assert _order(out) == list(range(7, -1, -1))
    out, _ = perturb_frames(f, "reverse", 2, seed=0)
    assert _order(out) == [4, 5, 6, 7, 0, 1, 2, 3], "segment reversal keeps order inside a chunk"
    out, idx = perturb_frames(f, "reverse", 16, seed=0, unit="clip", clip_len=2)
    assert _order(out) == [6, 7, 4, 5, 2, 3, 0, 1] and idx == [3, 2, 1, 0], "clips keep their frames' order"
    out, idx = perturb_frames(f, "shuffle", 16, seed=3)
    assert sorted(_order(out)) == list(range(8)) and _order(out) == idx
    out, _ = perturb_frames(f, "none", 1, seed=0)
    assert _order(out) == list(range(8))
    out, idx = perturb_frames(f, "drop", 16, seed=2, frame_factor=2)
    assert len(idx) == 1 and _order(out) == idx * 2, "padded with its last frame to the temporal patch"
    with pytest.raises(ValueError, match="unit='tube'"):
        perturb_frames(f, "drop", 2, seed=0, unit="tube")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("temple_videos")
    for i in range(3):
        write_moving_shape_video(d / f"v{i}.mp4", 8, 16, seed=i, n_segments=2, fps=4)
    (d / "videos.jsonl").write_text("".join(json.dumps({"video": f"v{i}.mp4"}) + "\n" for i in range(3)))
    return d


def test_batched_generation_equals_one_by_one(videos):
    model, inputs = tiny("qwen2_vl")
    decoded = load_pixel_videos([{"video": f"v{i}.mp4"} for i in range(3)], media=SPEC, root=videos)
    frames = [d.frames for d in decoded]
    questions = ["what happens", "describe the video in detail", "what"]  # prompts of different lengths: padding
    batched = batched_generate(model, inputs, frames, [4.0] * 3, questions, max_new_tokens=6, batch_size=3)
    single = [batched_generate(model, inputs, [f], [4.0], [q], max_new_tokens=6)[0]
              for f, q in zip(frames, questions, strict=True)]
    assert batched == single
    sampled = batched_generate(model, inputs, frames, [4.0] * 3, questions, max_new_tokens=6, temperature=1.0,
                               seed=5)
    assert sampled == batched_generate(model, inputs, frames, [4.0] * 3, questions, max_new_tokens=6,
                                       temperature=1.0, seed=5), "sampling is seeded"


def test_the_model_answers_clean_and_perturbed_videos(videos):
    model, inputs = tiny("qwen2_5_vl")
    decoded = load_pixel_videos([{"video": f"v{i}.mp4"} for i in range(2)], media=SPEC, root=videos)
    out = generate_pixel_responses(model, inputs, decoded, magnitudes=(8, 2), max_new_tokens=5, keep_frames=True)
    assert [r.video_id for r in out] == ["v0", "v1"]
    for r in out:
        assert isinstance(r.chosen, str)
        # drop and reverse always change 8 frames at m = 8 and 2; a shuffle that drew the identity is left out
        assert {("drop", 8), ("drop", 2), ("reverse", 8), ("reverse", 2)} <= set(r.rejected)
        assert set(r.rejected) <= {(k, m) for k in ("drop", "shuffle", "reverse") for m in (8, 2)}
        frames, idx = r.perturbed[("reverse", 8)]
        assert idx == list(range(7, -1, -1)) and len(frames) == 8
        assert len(r.perturbed[("drop", 8)][0]) == 2, "one kept frame, padded to Qwen's temporal patch"
    with pytest.raises(ValueError, match="kinds must be among"):
        generate_pixel_responses(model, inputs, decoded, kinds=("blur",))


def test_pairs_are_filtered_and_written_per_magnitude(videos, tmp_path):
    responses = [
        VideoResponses("v0.mp4", "the red square moves left, then up",
                       {("drop", 16): "the red square", ("reverse", 16): "the red square moves up, then left",
                        ("drop", 2): "the red square moves left, then up and on",  # longer: drop_not_shorter
                        ("shuffle", 2): "x"}),  # length ratio above 1.5
        VideoResponses("v1.mp4", "a blue disc moves down", {("reverse", 2): "a blue disc moves up"}),
    ]
    res = write_pixel_pairs(responses, tmp_path / "pairs", magnitudes=(16, 8, 2), base_dir=videos)
    assert res["pairs"] == 3 and res["skip_drop_not_shorter"] == 1 and res["skip_length_ratio"] == 1
    assert res["magnitudes"] == [16, 2] and res["empty_magnitudes"] == [8]
    stages = yaml.safe_load((tmp_path / "pairs" / "stages.yaml").read_text())["stages"]
    assert [s["name"] for s in stages] == ["temple_r16", "temple_r2"]
    assert [s["merge_lora"] for s in stages] == [False, True] == [s["reanchor_reference"] for s in stages]
    swift = json.loads((tmp_path / "pairs" / "temple_r16.json").read_text())
    assert len(swift) == 2 and swift[0]["messages"][-1]["content"] == "the red square moves left, then up"
    assert {r["rejected_response"] for r in swift} == {"the red square", "the red square moves up, then left"}
    for file in ("temple_r16.jsonl", "temple_r16.json", "temple_r2.json"):
        examples, counts = read_vlm_rows(tmp_path / "pairs" / file, media=SPEC)
        assert counts.good == len(examples) >= 1 and examples[0].videos[0].shape[0] == 8
        assert examples[0].kind == "pairs" and examples[0].meta.get("magnitude") in (16, 2)


def test_cli_writes_pairs_from_a_saved_model(videos, tmp_path):
    from mmalign.cli import app

    model, inputs = tiny("qwen2_vl")
    save_vlm(model, inputs, tmp_path / "model")
    args = ["temple-pairs-vlm", "--model", str(tmp_path / "model"), "--videos", str(videos / "videos.jsonl"),
            "--out", str(tmp_path / "out"), "--magnitudes", "4,2", "--max-frames", "8", "--max-new-tokens", "8",
            "--temperature", "1.0", "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{\n"):])  # after any loading progress bar
    assert summary["videos"] == 3 and summary["pairs"] >= 1 and (tmp_path / "out" / "responses.jsonl").is_file()
    bad = CliRunner().invoke(app, [*args[:4], str(tmp_path / "missing.jsonl"), *args[5:]])
    assert bad.exit_code == 2 and "missing.jsonl" in bad.output
