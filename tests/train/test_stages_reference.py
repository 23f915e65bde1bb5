"""Stages and reference handling end to end: re-anchoring, LoRA merges at a stage boundary, the on-disk cache
of precomputed reference scores, and the final model loaded back the way a user would load it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .conftest import config, non_finite_metrics, run


def _stage_records(r, stage: str) -> list[dict]:
    return [m for m in r.step_records if m["stage"] == stage]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("reanchor", [True, False])
def test_sft_then_dpo_reanchors_reference(reanchor, data_dir, tmp_path):
    """Stage 1 trains SFT (no reference forward); stage 2 switches the loss to DPO. With re-anchoring the
    reference is the SFT policy, so the first DPO step has zero rewards; without it, the reference is still the
    random initial model. Uses the ``tiny`` path that trains the tokenizer on all stages' files."""
    stages = [
        {"name": "sft", "max_steps": 3, "train": [str(data_dir / "sft.jsonl")], "loss": {"name": "sft"}},
        {"name": "dpo", "max_steps": 2, "train": [str(data_dir / "pairs.jsonl")], "reanchor_reference": reanchor},
    ]
    cfg = config(tmp_path / "out", [], loss={"name": "dpo"}, reference={"strategy": "copy"}, stages=stages)
    r = run(cfg)
    sft, dpo = _stage_records(r, "sft"), _stage_records(r, "dpo")
    assert len(sft) == 3 and len(dpo) == 2
    assert not non_finite_metrics(r.step_records)
    assert all("rewards/chosen" not in m for m in sft)  # stage 1 really ran the SFT loss
    first = dpo[0]
    if reanchor:
        assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
        assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    else:
        assert abs(first["rewards/chosen"]) > 1e-4
    assert abs(dpo[-1]["rewards/margins"]) > 0  # and DPO then moves away from the reference


def test_lora_merge_at_stage_boundary(data_dir, tokenizer_dir, tmp_path):
    """merge_lora folds stage 1's adapter into the base: the base weights equal a one-stage run's merged model,
    the adapter-disabled reference equals the policy at the start of stage 2, and the final adapter loads with
    peft on top of the saved (merged) base and reproduces the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    common = dict(tokenizer=tokenizer_dir, loss={"name": "dpo"}, lora={"enabled": True, "r": 4, "alpha": 8})
    stages = [{"name": "a", "max_steps": 3}, {"name": "b", "max_steps": 2, "merge_lora": True}]
    r = run(config(tmp_path / "two", [data_dir / "pairs.jsonl"], stages=stages,
                   run={"save_final": True}, **common))
    one = run(config(tmp_path / "one", [data_dir / "pairs.jsonl"], stages=stages[:1], **common))

    b = _stage_records(r, "b")
    assert b[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # reference = merged base = policy
    assert abs(b[-1]["rewards/margins"]) > 0
    merged_one = one.task.model.merge_and_unload().state_dict()
    base_two = {k.replace("base_layer.", ""): v for k, v in r.task.model.get_base_model().state_dict().items()
                if "lora_" not in k}
    assert merged_one.keys() == base_two.keys()
    for k, v in merged_one.items():
        torch.testing.assert_close(base_two[k], v, msg=k)

    final = Path(r.summary["final_model"])
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(adapter_cfg["base_model_name_or_path"])
    loaded = PeftModel.from_pretrained(base, str(final))
    ids = torch.randint(4, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(loaded, ids), _logits(r.task.model, ids))

    from mmalign.models.text import load_causal_lm  # the path `mmalign sample` and later stages take

    torch.testing.assert_close(_logits(load_causal_lm(final), ids), _logits(r.task.model, ids))


def test_final_model_loads_with_transformers(data_dir, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = run(config(tmp_path / "out", [data_dir / "pairs.jsonl"], tokenizer=tokenizer_dir, loss={"name": "dpo"},
                   run={"save_final": True}))
    final = Path(r.summary["final_model"])
    assert final == tmp_path / "out" / "final"
    loaded = AutoModelForCausalLM.from_pretrained(str(final))
    tok = AutoTokenizer.from_pretrained(str(final))
    ids = torch.tensor([tok("add: 1 2 = 3")["input_ids"]])
    assert loaded.config._attn_implementation == "sdpa"  # the saved model loads with the default kernel
    torch.testing.assert_close(_logits(loaded, ids), _logits(r.task.model, ids))  # eager vs sdpa: ~1e-7


def test_precomputed_reference_cache(data_dir, tokenizer_dir, tmp_path):
    """Written on the first run, reused (not recomputed) by a second run on the same data and model, and
    recomputed into a new file when the data or the reference weights change."""
    cache = tmp_path / "cache"

    def go(name: str, data: str, seed: int = 0):
        return run(config(tmp_path / name, [data_dir / data], tokenizer=tokenizer_dir, loss={"name": "dpo"},
                          reference={"strategy": "precomputed", "cache_dir": str(cache)}, run={"seed": seed}))

    first = go("r1", "pairs.jsonl")
    files = sorted(cache.glob("ref_scores-*.pt"))
    assert first.summary["reference_cache_reused"] is False and len(files) == 1
    stamp = files[0].stat().st_mtime_ns

    second = go("r2", "pairs.jsonl")
    assert second.summary["reference_cache_reused"] is True
    assert sorted(cache.glob("ref_scores-*.pt")) == files and files[0].stat().st_mtime_ns == stamp
    # same reference scores => identical first-step metrics
    assert second.step_records[0] == {**first.step_records[0], "time": second.step_records[0]["time"]}

    third = go("r3", "pairs_b.jsonl")
    assert third.summary["reference_cache_reused"] is False
    assert len(list(cache.glob("ref_scores-*.pt"))) == 2

    fourth = go("r4", "pairs.jsonl", seed=1)  # another initial model (the tiny model's weights follow the seed)
    assert fourth.summary["reference_cache_reused"] is False
    assert len(list(cache.glob("ref_scores-*.pt"))) == 3
    assert files[0].stat().st_mtime_ns == stamp
