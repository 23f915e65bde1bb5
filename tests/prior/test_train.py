"""2-step PRIOR runs through the one loop (``mmalign.train``) for both LVLM settings: the text-only reference is
trained first (and reused by a second task on the same data), parameters change, losses are finite, the final
model loads back with ``load_lvlm``; ``prior.enabled=false`` (plain NTP) with LoRA takes the same path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmalign.api import load_train_config, train
from mmalign.methods.prior import PriorTask
from mmalign.models.lvlm import load_lvlm
from mmalign.schema import StageConfig
from mmalign.train.metrics_log import read_metrics

from ._tiny import caption_tokenizer, config, write_rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("train"), n=8)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _run(cfg):
    task = PriorTask(cfg)
    before = _snapshot(task.model)
    summary = train(cfg, task=task)
    after = dict(task.model.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    losses = [r["loss"] for r in read_metrics(cfg.run.output_dir) if "loss" in r]
    return task, summary, before, changed, losses


@pytest.mark.parametrize("lvlm", ["llava", "patch"])
def test_two_step_prior_run(tmp_path, data, lvlm):
    cfg = config(tmp_path, data, f"prior.lvlm={lvlm}", "prior.floor=0.05")
    task, summary, before, changed, losses = _run(cfg)
    assert summary["global_step"] == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    # (LLaVA reads the penultimate vision layer; the recipe freezes the last one, which gets no gradient.)
    assert not any("layers.1." in n and "vision" in n for n in before)
    frozen = [n for n in before if n not in changed]
    assert not frozen, f"trainable parameters that did not change: {frozen}"
    must = ["lm_head.weight", "patch_embed.weight"] if lvlm == "patch" else ["lm_head.weight", "linear_1.weight"]
    assert all(any(n.endswith(m) for n in changed) for m in must)
    stats = summary["stages"][0].get("data") or {}
    ref_final = tmp_path / "run" / "prior_reference" / "final"
    assert (ref_final / "config.json").is_file()
    assert stats.get("prior/cache_computed", len(task.family.caption_dataset(cfg.data.train)[0])) > 0
    loaded, io = load_lvlm(summary["final_model"])
    assert io.kind == lvlm
    # A second task on the same data and settings reuses the trained reference instead of training again.
    mtime = (ref_final / "model.safetensors").stat().st_mtime_ns
    PriorTask(cfg)
    assert (ref_final / "model.safetensors").stat().st_mtime_ns == mtime


def test_plain_ntp_with_lora_takes_the_same_path(tmp_path, data):
    cfg = config(tmp_path, data, "prior.enabled=false", "lora.enabled=true", "lora.r=4")
    _, summary, before, changed, losses = _run(cfg)
    assert all(math.isfinite(x) for x in losses) and len(losses) == 2
    assert changed and all("lora_" in n or "multi_modal_projector" in n for n in changed)
    assert not (tmp_path / "run" / "prior_reference").exists()
    final = summary["stages"][0]["final"]
    assert "prior/raw_weight_mean" not in final and math.isclose(final["loss"], final["nll/token_mean"],
                                                                 rel_tol=1e-5)
    load_lvlm(summary["final_model"])  # merged (the tiny base exists nowhere else)


def test_checkpoint_lvlm_with_lora_and_its_own_language_model_as_reference(tmp_path, data):
    """The real-checkpoint path: a saved LLaVA directory, LoRA (adapter-only save, since the base is on disk),
    projector trained in full, and the reference started from the LVLM's extracted language model."""
    from mmalign.adapters.lvlm import score_captions
    from mmalign.models.lvlm import build_tiny_lvlm, save_lvlm

    from ._tiny import TINY

    model, inputs = build_tiny_lvlm("llava", caption_tokenizer(config(tmp_path, data)), **TINY)
    save_lvlm(model, inputs, tmp_path / "base")
    real = load_train_config(Path(__file__).resolve().parents[2] / "configs/prior/llava15_7b_lora_prior.yaml")
    cfg = config(tmp_path, data, f"model.name_or_path={tmp_path / 'base'}", "lora.enabled=true", "lora.r=4",
                 f"lora.target_modules={real.lora.target_modules}", "prior.freeze_vision_tower=true",
                 "prior.reference_init=lvlm", "prior.reference_steps=1")
    task, summary, before, changed, losses = _run(cfg)
    assert all(math.isfinite(x) for x in losses)
    assert any("multi_modal_projector" in n for n in changed) and not any("vision_tower" in n for n in before)
    assert (tmp_path / "run" / "prior_reference" / "init" / "config.json").is_file()
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    loaded, _ = load_lvlm(final)
    stage = task.stage_data(StageConfig(name="main"))
    batch = stage.collate([stage.train[i] for i in range(4)])
    task.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(score_captions(loaded.eval(), batch).token_logps,
                                   score_captions(task.model, batch).token_logps, rtol=1e-5, atol=1e-5)
