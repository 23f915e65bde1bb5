"""``mmalign eval av``: retrieval and offset arithmetic on hand-built tables, and the command on synthetic videos."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mmalign.cli import app
from mmalign.eval.av import offset_accuracy, pair_scores, retrieval_metrics


def test_retrieval_recall_on_a_hand_built_table():
    """Rows = videos, diagonal = true pairs. Video 0: own audio ranked 1st; video 1: 2nd; video 2: 3rd.
    Audio (columns): audio 0 ranks video 0 first; audio 1 ranks video 1 first (col 1 = [0.8, 0.9, 0.1]);
    audio 2 ranks video 2 last (col 2 = [0.5, 0.2, 0.0])."""
    sims = torch.tensor([[1.0, 0.8, 0.5],
                         [0.3, 0.9, 0.2],
                         [0.6, 0.1, 0.0]])
    m = retrieval_metrics(sims, ks=(1, 2, 3))
    assert m["v2a_recall@1"] == pytest.approx(2 / 3)  # video 2's best is audio 0
    assert m["v2a_recall@2"] == pytest.approx(2 / 3) and m["v2a_recall@3"] == 1.0
    assert m["a2v_recall@1"] == pytest.approx(2 / 3) and m["a2v_recall@2"] == pytest.approx(2 / 3)
    assert m["a2v_recall@3"] == 1.0
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(torch.zeros(2, 3))


def test_offset_accuracy_counts_strict_wins_of_the_aligned_column():
    scores = torch.tensor([[0.1, 0.9, 0.2],   # aligned wins
                           [0.9, 0.5, 0.1],   # shifted −k wins
                           [0.5, 0.5, 0.1],   # tie: a miss
                           [0.0, 0.3, 0.2]])  # aligned wins
    assert offset_accuracy(scores) == 0.5
    assert offset_accuracy(scores[:, [1, 0, 2]], aligned=0) == 0.5


def test_pair_scores_is_the_reward_of_every_pair_and_chunking_is_exact():
    g = torch.Generator().manual_seed(0)
    v = (torch.randn(5, 8, generator=g), torch.randn(5, 4, 8, generator=g))
    a = (torch.randn(5, 8, generator=g), torch.randn(5, 4, 8, generator=g))
    full = pair_scores(v, a, weights=(1.0, 0.5))
    assert torch.allclose(full, pair_scores(v, a, weights=(1.0, 0.5), chunk=2))
    cos = torch.nn.functional.cosine_similarity
    want = cos(v[0][1], a[0][3], dim=0) + 0.5 * cos(v[1][1], a[1][3], dim=-1).mean()
    assert full[1, 3].item() == pytest.approx(want.item(), rel=1e-5)


def test_eval_command_prints_and_writes_the_metrics(av_rows, tmp_path):
    out = tmp_path / "av.json"
    res = CliRunner().invoke(app, ["eval", "av", "--model", "tiny", "--data", str(av_rows), "--offset", "2",
                                   "--max-videos", "6", "--out", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads(out.read_text())["tiny"]
    assert metrics["videos"] == 6 and 0 <= metrics["offset_acc@2"] <= 1
    assert {"v2a_recall@1", "a2v_recall@10"} <= set(metrics) and metrics["v2a_recall@10"] == 1.0  # 6 < 10
    bad = CliRunner().invoke(app, ["eval", "av", "--model", "tiny", "--data", str(tmp_path / "nope.jsonl")])
    assert bad.exit_code == 2 and "error:" in bad.output
