"""The VLM family under the one preference task: short ``mmalign.api.train`` runs with DPO, KTO and SFT rows on
images and video, LoRA with the vision tower frozen or trained, activation checkpointing, bf16, the config
checks, the shipped configs (the TEMPLE one trained 2 steps from a tiny Qwen2.5-VL checkpoint saved locally), and
DPO's value ln 2 at policy == reference."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmalign.adapters.vlm import score_candidates
from mmalign.api import load_train_config, train
from mmalign.config import ConfigError
from mmalign.methods.vlm import VLMTask
from mmalign.models.vlm import load_vlm, save_vlm

from ._tiny_vlm import TINY, tiny, write_rows

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("vlm_rows")
    return {kind: write_rows(d, kind) for kind in ("pairs", "unpaired", "sft")}


def _config(tmp: Path, data: Path, loss: str = "dpo", *overrides: str, arch: str = "qwen2_vl"):
    return load_train_config(
        {"modality": "vlm", "loss": {"name": loss}, "model": {"name_or_path": "tiny", "tiny": dict(TINY)},
         "data": {"train": [str(data)], "max_length": 256}, "vlm": {"arch": arch, "max_frames": 4},
         "optim": {"lr": 1e-2, "scheduler": "constant"},
         "run": {"output_dir": str(tmp / "run"), "max_steps": 2, "batch_size": 3, "progress": False,
                 "report_to": ["jsonl"], "resume": "never"}},
        list(overrides))


def _train(cfg):
    task = VLMTask(cfg)
    before = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    out = train(cfg, task=task)
    changed = [k for k, v in task.model.state_dict().items() if k in before and not torch.equal(before[k], v)]
    return task, out, changed


@pytest.mark.parametrize("loss,kind", [("dpo", "pairs"), ("kto", "unpaired"), ("sft", "sft")])
def test_dpo_kto_sft_train_and_the_saved_model_loads(loss, kind, rows, tmp_path):
    cfg = _config(tmp_path, rows[kind], loss)
    task, out, changed = _train(cfg)
    final = out["stages"][0]["final"]
    assert out["global_step"] == 2 and math.isfinite(final["loss"])
    assert ("kl" in final) == (loss == "kto") and ("rewards/chosen" in final) == (loss != "sft")
    assert out["stages"][0]["data"]["rows_used"] == 6
    assert any("language_model.layers" in k for k in changed), "the language model trained"
    assert not [k for k in changed if ".visual." in k], "the vision tower and merger are frozen by default"
    loaded, io = load_vlm(out["final_model"])
    ds = task.stage_data(cfg.stages[0] if cfg.stages else type("S", (), {"train": None})()).train
    batch = ds.collate([ds[i] for i in range(3)])
    task.model.eval()
    torch.testing.assert_close(score_candidates(loaded.eval(), batch).logps, score_candidates(task.model, batch).logps,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frozen", [True, False])
def test_lora_with_the_vision_tower_frozen_or_trained(frozen, rows, tmp_path):
    cfg = _config(tmp_path, rows["pairs"], "dpo", "lora.enabled=true", "lora.r=4",
                  f"vlm.freeze_vision_tower={str(frozen).lower()}", arch="qwen2_5_vl")
    task, out, changed = _train(cfg)
    assert math.isfinite(out["stages"][0]["final"]["loss"]) and changed
    assert all("lora_" in k for k in changed), changed
    visual_lora = [k for k in changed if ".visual." in k]
    assert bool(visual_lora) == (not frozen)
    assert not [k for k in changed if ".visual.merger." in k], "the merger (projector) stays frozen"
    loaded, _ = load_vlm(out["final_model"])  # LoRA over a tiny in-memory base: saved merged
    assert not hasattr(loaded, "peft_config")


def test_activation_checkpointing_and_bf16_weights(rows, tmp_path):
    cfg = _config(tmp_path, rows["pairs"], "dpo", "model.gradient_checkpointing=true", "model.dtype=bfloat16",
                  arch="llava_onevision")
    task, out, changed = _train(cfg)
    assert next(task.model.parameters()).dtype == torch.bfloat16
    assert math.isfinite(out["stages"][0]["final"]["loss"]) and changed


def test_policy_equal_to_reference_gives_dpo_ln2(rows, tmp_path):
    import copy

    cfg = _config(tmp_path, rows["pairs"], "dpo")
    task = VLMTask(cfg)
    ds = task.stage_data(type("S", (), {"train": None})()).train
    batch = ds.collate([ds[i] for i in range(4)])
    reference = copy.deepcopy(task.model).requires_grad_(False)
    policy = task.score(task.model, batch)
    with torch.no_grad():
        ref = task.score(reference, batch)
    assert batch.encoder_cache.encoder_calls == 1, "the reference reused the frozen tower's features"
    out = task.loss(policy, ref, batch)
    torch.testing.assert_close(out.loss.detach(), torch.tensor(math.log(2.0)), rtol=0, atol=1e-6)


def test_config_errors_are_reported_together(rows, tmp_path):
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, rows["pairs"], "dpo", "vlm.fps=-1", "vlm.max_frames=0", "vlm.min_pixels=100",
                "vlm.max_pixels=10")
    text = str(err.value)
    for needle in ("fps=-1", "max_frames=0", "min_pixels=100 must be <= max_pixels=10"):
        assert needle in text, needle
    with pytest.raises(ConfigError, match="vlm.arch: 'llava' is not allowed.*qwen2_5_vl"):
        _config(tmp_path, rows["pairs"], "dpo", "vlm.arch=llava")
    with pytest.raises(ConfigError, match="tdpo.*vlm family.*not implemented for VLMs"):
        VLMTask(_config(tmp_path, rows["pairs"], "tdpo"))
    from mmalign.data.rows import DataError

    task = VLMTask(_config(tmp_path, rows["unpaired"], "dpo"))
    with pytest.raises(DataError, match="'unpaired' format, but loss 'dpo' reads"):
        task.stage_data(type("S", (), {"train": None})())


def test_tiny_config_validates_and_trains(tmp_path):
    cfg = load_train_config(REPO / "configs/vlm/tiny_qwen2vl_dpo.yaml",
                            [f"run.output_dir={tmp_path / 'run'}", "run.max_steps=2", "run.progress=false",
                             f"data.train=[{REPO / 'assets/lvlm/prefs.jsonl'}]", "data.eval=[]"])
    out = train(cfg)
    assert out["global_step"] == 2 and math.isfinite(out["stages"][0]["final"]["loss"])


def test_temple_config_trains_two_steps_from_a_local_tiny_qwen25vl(rows, tmp_path):
    model, inputs = tiny("qwen2_5_vl")
    save_vlm(model, inputs, tmp_path / "qwen25vl")
    cfg = load_train_config(REPO / "configs/vlm/qwen2.5-vl-7b_temple_lora.yaml")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.optim.lr, cfg.vlm.fps, cfg.model.dtype) == (32, 64, 5e-6, 1.0, "bfloat16")
    assert cfg.vlm.freeze_vision_tower and cfg.model.gradient_checkpointing and len(cfg.stages) == 4
    cfg = load_train_config(REPO / "configs/vlm/qwen2.5-vl-7b_temple_lora.yaml", [
        f"model.name_or_path={tmp_path / 'qwen25vl'}", f"data.train=[{rows['pairs']}]", "stages=[]",
        "data.max_length=256", "run.max_steps=2", "run.epochs=1", "run.batch_size=2", "run.grad_accum=1",
        "run.mixed_precision=no", "model.attn_implementation=eager", "vlm.min_pixels=null", "optim.lr=1e-2",
        f"run.output_dir={tmp_path / 'run'}", "run.progress=false", "run.report_to=[jsonl]", "run.save_every=0"])
    task, out, changed = _train(cfg)
    assert out["global_step"] == 2 and math.isfinite(out["stages"][0]["final"]["loss"])
    assert changed and all("lora_" in k for k in changed) and not [k for k in changed if ".visual." in k]
    assert (Path(out["final_model"]) / "adapter_config.json").is_file(), "a base on disk: the adapter is saved"
