"""``modality: av`` through the one loop (:func:`mmalign.api.train`): a short run lowers the CAVP loss on a fixed
batch, clamps the logit scales, saves a model that loads back; config errors are caught before building."""

from __future__ import annotations

import pytest
import torch

from mmalign.api import build_task, load_train_config, train
from mmalign.config import ConfigError
from mmalign.models.cavp import load_sf_cavp
from mmalign.schema import StageConfig

from .conftest import base_overrides


@torch.no_grad()
def _loss(task, batch) -> float:
    task.model.eval()
    out = task.loss(task.score(task.model, batch), None, batch).loss.item()
    task.model.train()
    return out


def test_short_run_lowers_the_loss_and_saves_a_loadable_model(av_rows, tmp_path):
    cfg = load_train_config(None, base_overrides(av_rows, tmp_path / "run", "run.max_steps=16"))
    task = build_task(cfg)
    data = task.stage_data(StageConfig())  # the run's data.train
    batch = data.collate([data.train[i] for i in range(8)])
    before = _loss(task, batch)
    summary = train(cfg, task=task)
    after = _loss(task, batch)
    assert summary["global_step"] == 16 and after < before - 0.5, (before, after)
    final = summary["stages"][0]["final"]
    assert {"loss/slow", "loss/intra", "loss/temporal", "reward/pair"} <= set(final)
    m = task.model
    assert 0 <= m.logit_scale_slow.item() <= 4.6052 and 0 <= m.logit_scale_fast.item() <= 4.6052
    back = load_sf_cavp(summary["final_model"])
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m.state_dict().values(), strict=True))


def test_config_errors_are_reported_together_before_building(av_rows, tmp_path):
    cfg = load_train_config(None, base_overrides(
        av_rows, tmp_path, "loss.kwargs={slow_weight: -1.0, semantic: frames, bogus: 1}", "lora.enabled=true",
        "av.clip_seconds=0.01"))
    with pytest.raises(ConfigError) as err:
        build_task(cfg)
    text = str(err.value)
    for needle in ("kwargs.bogus: not an option of loss 'cavp'", "semantic='frames' is not one of",
                   "slow_weight=-1.0 must be a number >= 0", "lora.enabled=true is not supported", "av: "):
        assert needle in text, needle


def test_other_families_refuse_cavp_and_av_refuses_other_rows(av_rows, tmp_path):
    clip = load_train_config(None, ["modality=clip", "loss.name=cavp", f"data.train=[{av_rows}]"])
    with pytest.raises(ConfigError, match="recipe of the av_contrastive family"):
        build_task(clip)
    av = load_train_config(None, base_overrides(av_rows, tmp_path, "loss.name=clip"))
    with pytest.raises(ConfigError, match="av_contrastive family trains"):
        build_task(av)
