"""``mmalign sample vlm`` (mmalign/cli/vlm.py, mmalign/sample/vlm.py): answers of a saved tiny VLM for images and
videos beside a reference's, written as markdown, JSON and PNG frame strips."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from mmalign.cli import app
from mmalign.models.vlm import save_vlm
from mmalign.sample.vlm import frame_strip, generate_answers

from ._tiny_vlm import examples, tiny, write_rows


def test_generate_answers_is_deterministic_per_seed():
    model, inputs = tiny("qwen2_5_vl")
    exs = examples("both")[:4]
    greedy = generate_answers(model, inputs, exs, max_new_tokens=4)
    assert len(greedy) == 4 and greedy == generate_answers(model, inputs, exs, max_new_tokens=4)
    sampled = generate_answers(model, inputs, exs, max_new_tokens=4, temperature=1.0, seed=3)
    assert sampled == generate_answers(model, inputs, exs, max_new_tokens=4, temperature=1.0, seed=3)


def test_frame_strip_tiles_evenly_spaced_frames(tmp_path):
    frames = [np.full((16, 24, 3), 10 * i, dtype=np.uint8) for i in range(20)]
    path = frame_strip(frames, tmp_path / "s.png", height=32, max_frames=5)
    im = np.asarray(Image.open(path))
    assert im.shape == (32, 5 * 48 + 4 * 2, 3)
    assert im[0, 0, 0] == 0 and im[0, -1, 0] == 190, "first and last frames are both shown"


def test_cli_writes_markdown_json_and_frame_strips(tmp_path):
    for name, seed in (("model", 0), ("ref", 1)):
        model, inputs = tiny("llava_next_video", seed=seed)
        save_vlm(model, inputs, tmp_path / name)
    data = write_rows(tmp_path, "pairs", n=3)  # rows 0-1: images, row 2: a video
    out = CliRunner().invoke(app, ["sample", "vlm", "--model", str(tmp_path / "model"), "--reference",
                                   str(tmp_path / "ref"), "--data", str(data), "--max-new-tokens", "3",
                                   "--max-frames", "4", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert out.exit_code == 0, out.output
    rows = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert len(rows) == 3 and all("model" in r and "reference" in r for r in rows)
    assert rows[2]["videos"] and all((tmp_path / "out" / r["frames"]).is_file() for r in rows)
    md = (tmp_path / "out" / "samples.md").read_text()
    assert md.startswith("| # | frames | question | model | reference |") and md.count("![") == 3
    bad = CliRunner().invoke(app, ["sample", "vlm", "--model", str(tmp_path / "model"), "--video",
                                   str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "missing.mp4" in bad.output
