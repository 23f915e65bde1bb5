"""Every text method trains end to end through ``mmalign.api.train`` on a tiny Llama.

For each row of the one :data:`mmalign.methods.table.METHODS` table that the causal-LM family can feed
(except the recipes, which have their own tests; and the DPO ``loss_type`` variants) a run of
3 optimizer steps must move every trainable parameter tensor and log only finite metrics. Reference strategies
(adapter-disable under LoRA, precomputed, TR-DPO sync, EMA) get the same check plus one that shows the strategy
is in effect.
"""

from __future__ import annotations

import pytest

from mmalign.adapters.causal_lm_family import CausalLMFamily
from mmalign.methods.table import METHODS, refusal

from .conftest import changed_frozen, config, non_finite_metrics, run, unchanged_trainable

# method -> (data file, extra config sections). Unlearning methods get a retain set.
METHOD_CASES = {
    "dpo": ("pairs", {}),
    "npo_diffusion": ("pairs", {}),  # Diffusion-NPO's reversed DPO: a table row like any other, so text runs it too
    "tdpo": ("pairs", {}),
    "sparsepo": ("pairs", {}),
    "sparsepo_activation": ("pairs", {}),
    "simpo": ("pairs", {}),
    "alphapo": ("pairs", {"loss": {"name": "alphapo", "kwargs": {"alpha": 0.5}}}),
    "cpo": ("pairs", {}),
    "orpo": ("pairs", {}),
    "slic": ("pairs", {}),
    "kto": ("unpaired", {}),
    "bco": ("unpaired", {}),
    "npo": ("sft", {"retain": {"train": ["retain.jsonl"], "max_length": 64}}),
    "simnpo": ("sft", {"retain": {"train": ["retain.jsonl"], "max_length": 64}}),
    "gradient_ascent": ("sft", {}),
    "plackett_luce": ("ranked", {}),
    "rm": ("pairs", {"loss": {"name": "rm", "kwargs": {"center_rewards_coefficient": 0.01}}}),
    "sft": ("sft", {}),
}
DPO_VARIANTS = {
    "ipo": {"loss_type": "ipo"},
    "hinge": {"loss_type": "hinge"},
    "robust": {"loss_type": "robust", "label_smoothing": 0.1},
    "bco_pair": {"loss_type": "bco_pair"},
    "apo_zero": {"loss_type": "apo_zero"},
    "discopop": {"loss_type": "discopop"},
    "sigmoid_norm": {"loss_type": "sigmoid_norm"},
    "js_divergence": {"f_divergence": "js_divergence"},
    "mpo": {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.8, 0.2]},
}
# The reward model scores with its value head only; the LM head is kept (see mmalign.models.text) but gets no
# gradient from the Bradley-Terry loss. (The head's bias cancels in r_w - r_l, hence centering in the rm cases.)
UNUSED_BY_LOSS = {"rm": {"base.lm_head.weight"}}


def _resolve(data_dir, sections: dict) -> dict:
    if "retain" in sections:
        sections = {**sections, "retain": {**sections["retain"],
                                           "train": [str(data_dir / f) for f in sections["retain"]["train"]]}}
    return sections


def _check(r, method: str = "") -> None:
    assert r.summary["global_step"] == 3
    assert len(r.step_records) == 3
    assert not non_finite_metrics(r.step_records)
    unchanged = set(unchanged_trainable(r)) - UNUSED_BY_LOSS.get(method, set())
    assert not unchanged, f"trainable parameters that did not move: {sorted(unchanged)}"
    assert not changed_frozen(r)


def test_every_text_method_is_covered():
    rows = {n for n, m in METHODS.items() if refusal(m, CausalLMFamily) is None and not m.recipe}
    assert set(METHOD_CASES) == rows


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_method_trains(method, data_dir, tokenizer_dir, tmp_path):
    fmt, sections = METHOD_CASES[method]
    sections = {"loss": {"name": method}, **_resolve(data_dir, sections)}
    cfg = config(tmp_path / "out", [data_dir / f"{fmt}.jsonl"], tokenizer=tokenizer_dir, **sections)
    r = run(cfg)
    _check(r, method)
    if "retain" in sections:
        data_event = next(m for m in r.metrics if m.get("event") == "data")
        assert data_event["retain/rows_used"] == 8
        assert all(rec["loss/retain_nll"] > 0 for rec in r.step_records)


@pytest.mark.parametrize("variant", sorted(DPO_VARIANTS))
def test_dpo_variant_trains(variant, data_dir, tokenizer_dir, tmp_path):
    cfg = config(tmp_path / "out", [data_dir / "pairs.jsonl"], tokenizer=tokenizer_dir,
                 loss={"name": "dpo", "kwargs": DPO_VARIANTS[variant]})
    _check(run(cfg))


def test_dpo_with_sft_term(data_dir, tokenizer_dir, tmp_path):
    """RPO-style ``loss.sft_weight``: the NLL of the chosen completion is added and logged."""
    cfg = config(tmp_path / "out", [data_dir / "pairs.jsonl"], tokenizer=tokenizer_dir,
                 loss={"name": "dpo", "sft_weight": 1.0})
    r = run(cfg)
    _check(r)
    assert any(k.startswith("sft") for k in r.step_records[0]), sorted(r.step_records[0])


@pytest.mark.parametrize("method", ["dpo", "rm"])
def test_lora_trains_only_adapters(method, data_dir, tokenizer_dir, tmp_path):
    """LoRA with the adapter-disabled reference: only LoRA (and value-head) weights are trainable and move."""
    kwargs = {"center_rewards_coefficient": 0.01} if method == "rm" else {}
    cfg = config(tmp_path / "out", [data_dir / "pairs.jsonl"], tokenizer=tokenizer_dir,
                 loss={"name": method, "kwargs": kwargs}, lora={"enabled": True, "r": 4, "alpha": 8},
                 reference={"strategy": "adapter" if method == "dpo" else "auto"})
    r = run(cfg)
    assert r.before and all("lora_" in n or n.startswith("v_head.") for n in r.before), sorted(r.before)
    assert any("lora_A" in n for n in r.before) and any("lora_B" in n for n in r.before)
    _check(r, method)
    if method == "dpo":  # step 1: the adapter starts at zero, so policy == base == reference
        assert r.step_records[0]["rewards/margins"] == 0.0
        assert r.step_records[-1]["rewards/margins"] != 0.0


def test_precomputed_reference(data_dir, tokenizer_dir, tmp_path):
    cfg = config(tmp_path / "out", [data_dir / "pairs.jsonl"], tokenizer=tokenizer_dir, loss={"name": "dpo"},
                 reference={"strategy": "precomputed"})
    r = run(cfg)
    _check(r)
    assert r.summary["reference_cache_reused"] is False
    assert list((tmp_path / "out" / "ref_cache").glob("ref_scores-*.pt"))
    # the cached scores are the initial policy's, so the first step sees policy == reference
    assert abs(r.step_records[0]["rewards/margins"]) < 1e-6


def test_precomputed_reference_kto(data_dir, tokenizer_dir, tmp_path):
    """KTO without mismatched reference scores (precomputed) falls back to the batch's own log-ratios for z0."""
    cfg = config(tmp_path / "out", [data_dir / "unpaired.jsonl"], tokenizer=tokenizer_dir, loss={"name": "kto"},
                 reference={"strategy": "precomputed"})
    _check(run(cfg))


@pytest.mark.parametrize("strategy", ["sync", "ema"])
def test_moving_reference(strategy, data_dir, tokenizer_dir, tmp_path):
    """sync (α=1, every step) and EMA (decay 0) copy the policy into the reference after every step, so every
    logged DPO step sees policy == reference; the default frozen copy does not."""
    cfg = config(tmp_path / "out", [data_dir / "pairs.jsonl"], tokenizer=tokenizer_dir, loss={"name": "dpo"},
                 reference={"strategy": strategy, "sync_every": 1, "sync_alpha": 1.0, "ema_decay": 0.0})
    r = run(cfg)
    _check(r)
    assert all(abs(rec["rewards/chosen"]) < 1e-6 for rec in r.step_records), r.step_records
    frozen = run(config(tmp_path / "frozen", [data_dir / "pairs.jsonl"], tokenizer=tokenizer_dir,
                        loss={"name": "dpo"}, reference={"strategy": "copy"}))
    assert abs(frozen.step_records[-1]["rewards/chosen"]) > 1e-6
