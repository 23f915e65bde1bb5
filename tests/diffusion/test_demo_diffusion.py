"""The diffusion demo (mmalign.demos.diffusion) and its data/reward (mmalign.data.shapes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmalign.data import shapes as S


def test_shapes_are_deterministic_and_the_reward_reads_the_caption():
    """Same seed → same pixels; a faithful rendering scores ≈ 1, the same image under a caption with another
    shape colour or background scores clearly less, and noise or a flat grey image scores far less."""
    a, b = S.shape_samples(12, seed=3, size=16), S.shape_samples(12, seed=3, size=16)
    assert all(np.array_equal(x.image, y.image) and x.caption == y.caption for x, y in zip(a, b, strict=True))
    images, captions = [s.image for s in a], [s.caption for s in a]
    right = S.reward(images, captions)
    assert right.shape == (12,) and bool((right > 0.97).all())
    wrong_colour = [S.caption_for(s.shape, next(c for c in S.SHAPE_COLORS if c != s.color), s.background) for s in a]
    wrong_bg = [S.caption_for(s.shape, s.color, next(g for g in S.BACKGROUNDS if g != s.background)) for s in a]
    assert bool((S.reward(images, wrong_colour) < right - 0.05).all())
    assert bool((S.reward(images, wrong_bg) < right - 0.05).all())
    grey = torch.full((12, 3, 16, 16), 0.5)
    assert float(S.reward(grey, captions).mean()) < 0.75
    # uint8 HWC arrays and float CHW tensors give the same reward
    as_tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(S.reward(as_tensor, captions), right)
    with pytest.raises(ValueError, match="not a shapes caption"):
        S.reward(images[:1], "a photo of a dog")


def test_rank_pairs():
    r = torch.tensor([[0.2, 0.9, 0.5], [0.4, 0.4, 0.4], [0.1, 0.3, 0.31]])
    best_worst = S.rank_pairs(r)
    assert [(p.prompt_index, p.chosen, p.rejected) for p in best_worst] == [(0, 1, 0), (2, 2, 0)]
    assert best_worst[0].margin == pytest.approx(0.7)
    every = S.rank_pairs(r, strategy="all", min_margin=0.05, max_pairs_per_prompt=2)
    assert [(p.prompt_index, p.chosen, p.rejected) for p in every] == [(0, 1, 0), (0, 1, 2), (2, 2, 0), (2, 1, 0)]
    assert all(p.margin >= 0.05 for p in every)  # ties and near-ties give no pair
    with pytest.raises(ValueError, match="samples per prompt"):
        S.rank_pairs(torch.zeros(3, 1))


def _check_report(out, report: dict) -> None:
    saved = json.loads((out / "report.json").read_text())
    assert saved == report
    assert {"method", "metric", "before", "after", "higher_is_better", "settings"} <= set(report)
    assert report["method"] == "diffusion_dpo" and report["higher_is_better"] is True
    s = report["settings"]
    for k in ("base", "dpo", "base+npo_cfg", "dpo+npo_cfg", "base+self_npo_cfg", "dpo+self_npo_cfg"):
        assert 0.0 <= s[k] <= 1.0
    assert report["before"] == s["base"] and report["after"] == s["dpo"]
    assert (out / "report.md").is_file() and (out / "training_curves.png").is_file()
    assert all((out / g).is_file() for g in report["grids"].values())


def test_demo_report_shape_with_a_very_short_config(tmp_path):
    """Every stage runs (SFT → pairs → DPO → Diffusion-NPO → Self-NPO → six sampling settings), a few steps each."""
    from mmalign.demos.diffusion import run

    report = run(tmp_path, n_images=48, sft_steps=4, dpo_steps=2, self_npo_steps=2, pair_seeds=3, eval_seeds=2,
                 captions=3, sample_steps=3)
    _check_report(tmp_path, report)
    assert report["pairs"]["pairs"] >= 1


@pytest.mark.slow
def test_demo_dpo_improves_the_reward(tmp_path):
    """The default demo (≈ 6 CPU minutes): DPO on reward-ranked pairs raises the mean reward on held-out seeds and
    NPO-guided CFG with the Diffusion-NPO negative model raises the base model's. Measured under requirements.lock:
    base 0.7346 → DPO 0.7774 (win-rate 0.625); base + NPO-CFG 0.7449; DPO + NPO-CFG 0.7770 — on the DPO model
    NPO-CFG gives no gain here (−0.0004, one evaluation seed set: the open question of the demos issue), so the
    test asserts only that it does not lower the DPO model's reward by more than 0.005. A reduced run (300 SFT /
    100 DPO steps, 6 pair seeds) did not improve (0.700 → 0.694), so this test uses the defaults."""
    from mmalign.demos.diffusion import run

    report = run(tmp_path)
    _check_report(tmp_path, report)
    s = report["settings"]
    assert report["after"] > report["before"] + 0.01
    assert s["win_rate_dpo_vs_base"] > 0.5
    assert s["base+npo_cfg"] > s["base"] and s["dpo+npo_cfg"] >= s["dpo"] - 0.005
