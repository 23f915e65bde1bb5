"""A VLM LoRA run whose stages merge the adapter (TEMPLE's curriculum, ``stage.merge_lora``) over a base saved on
disk: ``final/`` must hold the merged stages too. Saving only the last adapter (whose ``adapter_config.json`` names
the original base) loses every merged stage on reload, so the family saves full merged weights instead, in a full
fine-tune's layout; on one process and through the gathered (sharded-run) state dict."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import mmalign.train.loop as loop
from mmalign.adapters.vlm import score_candidates
from mmalign.api import load_train_config, train
from mmalign.methods.vlm import VLMTask
from mmalign.models.vlm import fold_lora, load_vlm, save_vlm

from ._tiny_vlm import tiny, write_rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vlm_merge_save")
    model, inputs = tiny("qwen2_vl")
    save_vlm(model, inputs, d / "base")
    return {"base": d / "base", "pairs": write_rows(d, "pairs", n=4)}


def _config(files, tmp: Path, *overrides: str):
    return load_train_config(
        {"modality": "vlm", "loss": {"name": "dpo"}, "model": {"name_or_path": str(files["base"])},
         "lora": {"enabled": True, "r": 4, "alpha": 8}, "reference": {"strategy": "adapter"},
         "data": {"train": [str(files["pairs"])], "max_length": 256}, "vlm": {"arch": "qwen2_vl", "max_frames": 4},
         "optim": {"lr": 3e-2, "scheduler": "constant"},
         "run": {"output_dir": str(tmp / "run"), "batch_size": 2, "progress": False, "report_to": ["jsonl"],
                 "resume": "never", "save_every": 0},
         "stages": [{"name": "a", "max_steps": 2}, {"name": "b", "max_steps": 2, "merge_lora": True}]},
        list(overrides))


def _logps(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return score_candidates(model.eval(), batch).logps


@pytest.mark.parametrize("gathered", [False, True], ids=["one_process", "gathered_state"])
def test_merged_stages_survive_the_final_save(gathered, files, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "FORCE_GATHERED_SAVE", gathered)
    cfg = _config(files, tmp_path)
    task = VLMTask(cfg)
    out = train(cfg, task=task)
    assert out["global_step"] == 4 and all(math.isfinite(s["final"]["loss"]) for s in out["stages"])
    assert task.family.merged
    final = Path(out["final_model"])
    loaded, _ = load_vlm(final)
    ds, _ = task.family.dataset([str(files["pairs"])], "auto")
    batch = ds.collate([ds[i] for i in range(2)])
    trained, reloaded = _logps(task.model, batch), _logps(loaded, batch)
    base, _ = load_vlm(files["base"])
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-5)
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists(), \
        "merged stages: full weights, as a full fine-tune saves them"
    assert not hasattr(loaded, "peft_config")
    assert (reloaded - _logps(base, batch)).abs().max() > 1e-3, "the trained weights, not the base's"
    # the first stage's (merged) training counts: the last adapter alone over the base scores differently
    with task.model.disable_adapter():
        merged_only = _logps(task.model, batch)
    assert (merged_only - _logps(base, batch)).abs().max() > 1e-3


def test_fold_lora_equals_merge_and_unload(files):
    from peft import LoraConfig, get_peft_model

    model, inputs = load_vlm(files["base"])
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    state = fold_lora(peft)
    assert not [k for k in state if "lora_" in k or ".base_layer." in k]
    import copy

    expected = copy.deepcopy(peft).merge_and_unload().state_dict()
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v.cpu(), rtol=1e-6, atol=1e-6, msg=k)
    gathered = fold_lora(peft, {k: v.clone() for k, v in peft.state_dict().items()})
    for k, v in expected.items():
        torch.testing.assert_close(gathered[k], v.cpu(), rtol=1e-6, atol=1e-6, msg=k)
