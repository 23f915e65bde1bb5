"""An LVLM LoRA run over a base saved on disk whose stages merge the adapter (``stage.merge_lora``): ``final/``
holds full merged weights, since the last adapter alone over the base on disk would lose the merged stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmalign.adapters.lvlm import score_candidates
from mmalign.adapters.lvlm_family import LVLMFamily
from mmalign.models.lvlm import load_lvlm

from .test_lvlm_family import _batch, _config, _train


@pytest.mark.parametrize("kind", ["patch", "llava"])
def test_merged_stages_survive_the_final_save(kind, tmp_path):
    from mmalign.methods.preference import PreferenceTask

    _, base_run, _ = _train(_config(tmp_path / "base", kind, "dpo", "run.max_steps=1"))
    base_dir = base_run["final_model"]
    cfg = _config(tmp_path / "lora", kind, "dpo", f"model.name_or_path={base_dir}", "lora.enabled=true",
                  "reference.strategy=adapter", "run.max_steps=null",
                  "stages=[{name: a, max_steps: 2}, {name: b, max_steps: 2, merge_lora: true}]")
    task = PreferenceTask(cfg, family=LVLMFamily)
    task, out, _ = _train(cfg, task)
    assert task.family.merged
    final = Path(out["final_model"])
    assert not (final / "adapter_config.json").exists(), "merged stages: full weights"
    loaded, _ = load_lvlm(final)
    base, _ = load_lvlm(base_dir)
    batch = _batch(task.family.inputs, (0, 1, 2))
    task.model.eval()
    with torch.no_grad():
        trained = score_candidates(task.model, batch).logps
        reloaded = score_candidates(loaded.eval(), batch).logps
        before = score_candidates(base.eval(), batch).logps
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-5)
    assert (reloaded - before).abs().max() > 1e-4
