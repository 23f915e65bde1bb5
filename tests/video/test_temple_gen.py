"""TEMPLE caption-mode response generation with a tiny causal LM, and the pairs/stages it feeds."""

from __future__ import annotations

import pytest
import torch

from mmalign.config import ConfigError
from mmalign.data.rows import DataError
from mmalign.data.temple import build_temple_pairs, magnitude_stages
from mmalign.methods.temple_gen import caption_prompt, generate_temple_responses

CAPTIONS = ["a red square enters from the left", "the square moves up", "it turns around", "the square moves right",
            "it stops in the corner", "the square fades out", "a blue circle appears", "the circle grows"]


@pytest.fixture(scope="module")
def lm():
    from mmalign.models.text import build_tiny_causal_lm
    from mmalign.models.tokenizer import train_bpe_tokenizer

    torch.set_num_threads(1)
    tok = train_bpe_tokenizer([caption_prompt(CAPTIONS)] * 4 + CAPTIONS, vocab_size=300)
    model = build_tiny_causal_lm(len(tok), seed=0, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                 intermediate_size=64)
    return model, tok


def test_prompt_lists_the_clips_in_the_given_order():
    p = caption_prompt(["b", "a"])
    assert "1. b\n2. a" in p and p.index("1. b") < p.index("2. a")


def test_responses_cover_every_perturbation_and_feed_pairs_and_stages(lm, tmp_path):
    model, tok = lm
    rows = [{"video": f"v{i}.mp4", "clip_captions": CAPTIONS[i:] + CAPTIONS[:i]} for i in range(2)]
    kw = dict(kinds=("drop", "reverse"), magnitudes=(8, 2), seed=3, max_new_tokens=6, temperature=1.0)
    out = generate_temple_responses(model, tok, rows, **kw)
    again = generate_temple_responses(model, tok, rows, **kw)
    assert [o.video for o in out] == ["v0.mp4", "v1.mp4"] and all(o.chosen for o in out)
    # every (kind, magnitude) changes an 8-clip list (drop keeps 1 or 4 clips; reverse flips 8 or 2 chunks)
    assert all(set(o.rejected) == {("drop", 8), ("drop", 2), ("reverse", 8), ("reverse", 2)} for o in out)
    assert [(o.chosen, o.rejected) for o in out] == [(o.chosen, o.rejected) for o in again]  # seeded
    rows_out, stats = build_temple_pairs(out, seed=0, check_videos=False)
    skipped = sum(v for k, v in stats.items() if k.startswith("skip_"))
    assert stats["videos"] == 2 and stats["pairs"] == len(rows_out) and stats["pairs"] + skipped == 8
    assert all(r["videos"] in (["v0.mp4"], ["v1.mp4"]) for r in rows_out)
    assert rows_out, stats  # random 6-token samples rarely trip the filters; a change here is worth a look
    by_m = {m: [r for r in rows_out if r["magnitude"] == m] for m in {r["magnitude"] for r in rows_out}}
    stages = magnitude_stages(by_m, tmp_path, magnitudes=sorted(by_m, reverse=True))
    assert len(stages) == len(by_m) and not stages[0]["reanchor_reference"]


def test_identity_perturbations_give_no_rejected_response(lm):
    model, tok = lm
    out = generate_temple_responses(model, tok, [{"video": "one.mp4", "clip_captions": ["only clip"]}],
                                    kinds=("shuffle", "reverse"), magnitudes=(2,), max_new_tokens=2)
    assert out[0].rejected == {}  # one clip: nothing to shuffle or reverse


def test_bad_rows_and_options_are_named():
    with pytest.raises(DataError, match=r"row 1 \(a.mp4\): field 'clip_captions'"):
        generate_temple_responses(None, None, [{"video": "a.mp4", "clip_captions": []}])
    with pytest.raises(ConfigError, match="kinds must be among"):
        generate_temple_responses(None, None, [{"video": "a.mp4", "clip_captions": ["x"]}], kinds=("none",))


def test_temple_pairs_cli_writes_pairs_and_stages(lm, tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from mmalign.cli import app

    model, tok = lm
    model.save_pretrained(str(tmp_path / "lm"))
    tok.save_pretrained(str(tmp_path / "lm"))
    rows = []
    for i in range(6):  # enough videos that each magnitude keeps a pair after the length filter
        (tmp_path / f"v{i}.mp4").write_bytes(b"")  # existence is checked, contents are not read here
        rows.append(json.dumps({"video": f"v{i}.mp4", "clip_captions": CAPTIONS[i:] + CAPTIONS[:i]}))
    (tmp_path / "videos.jsonl").write_text("\n".join(rows) + "\n")
    res = CliRunner().invoke(app, ["temple-pairs", "--model", str(tmp_path / "lm"), "--videos",
                                   str(tmp_path / "videos.jsonl"), "--out", str(tmp_path / "out"), "--kinds", "drop",
                                   "--magnitudes", "8,2", "--max-new-tokens", "6", "--temperature", "1.0"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)  # stdout only: progress bars go to stderr
    stages = yaml.safe_load((tmp_path / "out" / "stages.yaml").read_text())["stages"]
    assert [s["name"] for s in stages] == ["temple_r8", "temple_r2"] and stages[1]["reanchor_reference"]
    assert report["pairs"] == sum(1 for _ in open(tmp_path / "out" / "pairs.jsonl"))
    bad = CliRunner().invoke(app, ["temple-pairs", "--model", str(tmp_path / "lm"), "--videos",
                                   str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "missing.jsonl" in bad.output
