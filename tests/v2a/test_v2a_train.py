"""End to end through ``mmalign.api.train``: conditional flow matching (the ``sft`` row) lowers the held-out flow
error, flow DPO from its ``final/`` starts at ln 2, and KTO / Plackett–Luce / NPO / LoRA runs train and save."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmalign.api import build_task, load_train_config, train
from mmalign.models.v2a import load_v2a
from mmalign.schema import StageConfig

from . import tiny_config


def _eval_error(task) -> float:
    """Mean flow-matching error of the eval split (fixed noise and time, no null condition)."""
    data = task.stage_data(StageConfig())
    batch = data.collate([data.eval[i] for i in range(len(data.eval))])
    with torch.no_grad():
        return task.family.score(task.model, batch).extras["err"].mean().item()


def _losses(out_dir) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and r.get("event") is None]


def test_flow_matching_then_flow_dpo(tmp_path, v2a_data):
    sft = tiny_config(tmp_path / "sft", v2a_data["sft"], loss={"name": "sft"}, reference={"strategy": "auto"},
                      data={"eval": [str(v2a_data["sft"])]}, optim={"lr": 5e-3},
                      run={"max_steps": 24, "batch_size": 4}, v2a={"null_condition_probability": 0.1})
    task = build_task(load_train_config(sft))
    before = _eval_error(task)
    train(sft, task=task)
    after = _eval_error(task)
    assert after < 0.8 * before, (before, after)  # measured on 8 clips: 4.08 -> 1.30
    final = tmp_path / "sft" / "final"
    info = json.loads((final / "v2a_config.json").read_text())["info"]
    assert info["method"] == "sft"

    dpo = tiny_config(tmp_path / "dpo", v2a_data["pairs"], model={"name_or_path": str(final)},
                      run={"max_steps": 3, "batch_size": 2})
    task = build_task(load_train_config(dpo))
    start = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    summary = train(dpo, task=task)
    losses = _losses(tmp_path / "dpo")
    assert math.isclose(losses[0], math.log(2), abs_tol=1e-5)  # policy == reference before the first update
    assert all(math.isfinite(v) for v in summary["stages"][0]["final"].values())
    moved = [n for n, p in task.model.named_parameters() if not torch.equal(p.detach(), start[n])]
    assert moved
    back = load_v2a(tmp_path / "dpo" / "final")
    assert back.spec == task.components.spec
    assert json.loads((tmp_path / "dpo" / "final" / "v2a_config.json").read_text())["info"]["method"] == "dpo"


@pytest.mark.parametrize("name,fmt,extra", [
    ("kto", "unpaired", {}),
    ("plackett_luce", "ranked", {}),
    ("npo_diffusion", "pairs", {}),
    ("dpo", "pairs", {"lora": {"enabled": True, "r": 4, "alpha": 4}, "reference": {"strategy": "adapter"}}),
    ("dpo", "pairs", {"v2a": {"latent": "vae", "frame_encoder": "clip"}, "loss": {"kwargs": {"beta": 50}}}),
])
def test_methods_train_and_save(tmp_path, v2a_data, name, fmt, extra):
    extra = {**extra, "loss": {"name": name, **extra.get("loss", {})}}
    cfg = tiny_config(tmp_path, v2a_data[fmt], **extra)
    task = build_task(load_train_config(cfg))
    if "lora" in extra:  # diffusers zero-inits the DiT's output layer: from a random base, LoRA on the attention
        # projections gets no gradient (a pre-trained base has a non-zero one)
        torch.nn.init.normal_(task.components.denoiser.transformer.proj_out.weight, std=0.1)
    trainable = {n: p.detach().clone() for n, p in task.model.named_parameters() if p.requires_grad}
    summary = train(cfg, task=task)
    final = summary["stages"][0]["final"]
    assert all(math.isfinite(v) for v in final.values()), final
    after = dict(task.model.named_parameters())
    assert any(not torch.equal(p, after[n].detach()) for n, p in trainable.items())
    back = load_v2a(tmp_path / "final")
    assert back.spec.latent == task.components.spec.latent
    if "lora" in extra:  # the saved model is the merged policy: same predictions as the trained LoRA model
        batch_x = torch.randn(1, *back.spec.latent_shape)
        feats = torch.randn(1, back.spec.num_frames, back.spec.feature_dim)
        t = torch.tensor([0.5])
        with torch.no_grad():
            assert torch.allclose(task.model(batch_x, t, feats), back.denoiser(batch_x, t, feats), atol=1e-5)


def test_config_errors(tmp_path, v2a_data):
    from mmalign.config import ConfigError

    with pytest.raises(ConfigError, match="needs \\['pairs'\\] rows"):
        train(tiny_config(tmp_path, v2a_data["sft"]))
    with pytest.raises(ConfigError, match="v2a.noise=fixed"):
        train(tiny_config(tmp_path, v2a_data["pairs"], reference={"strategy": "precomputed"}))
    with pytest.raises(ConfigError, match="mel has unknown keys"):
        load_train_config(tiny_config(tmp_path, v2a_data["pairs"], v2a={"mel": {"nfft": 3}}))
    with pytest.raises(ConfigError, match="unknown key for a tiny v2a model"):
        load_train_config(tiny_config(tmp_path, v2a_data["pairs"], model={"tiny": {"hidden_size": 8}}))
