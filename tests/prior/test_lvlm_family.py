"""The LVLM family (tiny LLaVA and the encoder-free PatchLVLM) under the one preference task.

Checks: candidate scoring equals a naive per-candidate ``[image + prompt + completion]`` forward; the image
encoder runs once per example (and once per batch across a policy and a frozen-encoder reference); DPO and KTO
train through ``PreferenceTask(cfg, family=LVLMFamily)`` and the saved model loads with ``load_lvlm``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from mmalign.adapters.lvlm import lvlm_parts, score_candidates, score_candidates_naive
from mmalign.adapters.lvlm_family import LVLMFamily, _with_mismatched, freeze_image_encoder
from mmalign.data.batches import VisionTextBatch
from mmalign.data.vision_rows import VisionPreferenceDataset, read_vision_rows
from mmalign.models.lvlm import add_image_token, build_tiny_lvlm, load_lvlm
from mmalign.models.tokenizer import train_bpe_tokenizer

from ._tiny import TINY

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "lvlm"


def _tokenizer():
    from mmalign.adapters.lvlm_family import _texts
    from mmalign.data.rows import load_rows

    rows = [r for _, _, r in load_rows([ASSETS / "prefs.jsonl", ASSETS / "kto.jsonl"])]
    texts = [t for r in rows for k in ("prompt", "chosen", "rejected", "completion") for t in _texts(r.get(k))]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    tok.padding_side = "left"
    add_image_token(tok)
    return tok


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def _dataset(inputs, source="prefs.jsonl", **kw):
    examples, stats, fmt = read_vision_rows([ASSETS / source], inputs.tokenizer, image_token_id=inputs.image_token_id,
                                            num_image_tokens=inputs.num_image_tokens, **kw)
    return VisionPreferenceDataset(examples, pad_token_id=inputs.tokenizer.pad_token_id,
                                   pixel_values=inputs.pixel_values, format=fmt), stats


def _batch(inputs, idx=(0, 1, 2, 3, 4), source="prefs.jsonl") -> VisionTextBatch:
    ds, _ = _dataset(inputs, source)
    return ds.collate([ds[i] for i in idx])


def _count_encoder_calls(model):
    """Forward hook on the image encoder; returns the list of batch sizes it ran on."""
    sizes = []
    lvlm_parts(model).encoder.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    return sizes


# -- scoring ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["patch", "llava"])
@pytest.mark.parametrize("share_prompt", [True, False])
def test_scores_equal_a_naive_forward_per_candidate(kind, share_prompt, tok):
    model, inputs = build_tiny_lvlm(kind, copy.deepcopy(tok), seed=0, **TINY)
    batch = _batch(inputs)
    assert bool((batch.prompt_mask == 0).any()), "prompts of two lengths: the batch must be left-padded"
    assert batch.pixel_values.shape[0] == batch.batch_size and batch.num_candidates == 2
    fast = score_candidates(model, batch, share_prompt=share_prompt, chunk_size=3)
    naive = score_candidates_naive(model, batch)
    torch.testing.assert_close(fast.token_logps, naive.token_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.logps, naive.logps, rtol=0, atol=1e-5)
    assert torch.equal(fast.lengths, batch.completion_mask.sum(-1))
    assert bool((fast.logps < 0).all())


def test_padding_candidates_are_skipped_and_score_zero(tok):
    model, inputs = build_tiny_lvlm("patch", copy.deepcopy(tok), seed=0, **TINY)
    batch = _batch(inputs, (0, 1, 2))
    batch.candidate_mask = torch.tensor([[True, True], [True, False], [True, True]])
    s = score_candidates(model, batch)
    assert s.logps[1, 1] == 0 and not bool(s.token_mask[1, 1].any())
    torch.testing.assert_close(s.logps[batch.candidate_mask], score_candidates_naive(model, batch).logps[
        batch.candidate_mask], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["patch", "llava"])
def test_image_encoded_once_per_example_and_shared_with_a_frozen_reference(kind, tok):
    model, inputs = build_tiny_lvlm(kind, copy.deepcopy(tok), seed=0, **TINY)
    batch = _batch(inputs)  # B = 5 examples × K = 2 candidates
    calls = _count_encoder_calls(model)
    score_candidates_naive(model, batch)
    assert calls == [1] * 10, "the naive forward encodes the image once per candidate"
    calls.clear()
    score_candidates(model, batch)
    assert calls == [5], "one encoder pass over the B images, none per candidate"

    # A frozen encoder: the policy pass encodes, a frozen copy (the reference) reuses it on the same batch.
    model, inputs = build_tiny_lvlm(kind, copy.deepcopy(tok), seed=0, **TINY)
    batch = _batch(inputs)
    freeze_image_encoder(model, True)
    reference = copy.deepcopy(model).requires_grad_(False)
    calls, ref_calls = _count_encoder_calls(model), _count_encoder_calls(reference)
    policy = score_candidates(model, batch)
    ref = score_candidates(reference, batch)
    assert (calls, ref_calls, batch.encoder_cache.encoder_calls) == ([5], [], 1)
    torch.testing.assert_close(policy.logps.detach(), ref.logps)
    policy.logps.sum().backward()  # the cached encoding carries no graph; the LM still gets gradients
    assert next(p for n, p in model.named_parameters() if "layers.0" in n and p.requires_grad).grad is not None

    # A trainable encoder is never shared: each model encodes (and the policy's encoder gets gradients).
    lvlm_parts(model).encoder.requires_grad_(True)
    batch = _batch(inputs)
    calls.clear()
    score_candidates(model, batch).logps.sum().backward()
    score_candidates(reference, batch)
    assert calls == [5] and ref_calls == [5]


def test_mismatched_candidate_for_kto_shares_the_prompt(tok):
    model, inputs = build_tiny_lvlm("llava", copy.deepcopy(tok), seed=0, **TINY)
    batch = _batch(inputs, (0, 1, 2, 3), source="kto.jsonl")
    assert batch.num_candidates == 1 and batch.labels[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]
    calls = _count_encoder_calls(model)
    s = score_candidates(model, _with_mismatched(batch))
    assert calls == [4] and s.logps.shape == (4, 2)
    naive = score_candidates_naive(model, _with_mismatched(batch))
    torch.testing.assert_close(s.logps, naive.logps, rtol=0, atol=1e-5)


# -- training through the one preference task --------------------------------------------------------------


def _config(tmp: Path, kind: str, loss: str, *overrides: str, data: str | None = None):
    from mmalign.api import load_train_config

    data = ASSETS / (data or ("kto.jsonl" if loss == "kto" else "prefs.jsonl"))
    return load_train_config(
        {"modality": "prior", "loss": {"name": loss}, "model": {"name_or_path": "tiny", "tiny": dict(TINY)},
         "data": {"train": [str(data)], "max_length": 64}, "prior": {"lvlm": kind},
         "optim": {"lr": 1e-2, "scheduler": "constant"},
         "run": {"output_dir": str(tmp / "run"), "max_steps": 3, "batch_size": 4, "progress": False,
                 "report_to": ["jsonl"], "resume": "never"}},
        list(overrides))


def _train(cfg, task=None):
    from mmalign.api import train
    from mmalign.methods.preference import PreferenceTask

    task = task or PreferenceTask(cfg, family=LVLMFamily)
    before = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    out = train(cfg, task=task)
    changed = [k for k, v in task.model.state_dict().items() if k in before and not torch.equal(before[k], v)]
    return task, out, changed


@pytest.mark.parametrize("kind", ["patch", "llava"])
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_dpo_and_kto_train_and_the_saved_model_loads(kind, loss, tmp_path):
    cfg = _config(tmp_path, kind, loss)
    task, out, changed = _train(cfg)
    final = out["stages"][0]["final"]
    assert out["global_step"] == 3 and math.isfinite(final["loss"])
    assert "rewards/chosen" in final and ("kl" in final) == (loss == "kto")
    assert any(".layers." in k for k in changed), "the language model trained"
    frozen = "patch_embed" if kind == "patch" else "vision_tower"
    assert not [k for k in changed if frozen in k], "the image encoder is frozen by default"
    loaded, io = load_lvlm(out["final_model"])
    assert (io.kind, io.num_image_tokens) == (kind, task.family.inputs.num_image_tokens)
    batch = _batch(task.family.inputs, (0, 1, 2))
    task.model.eval()
    torch.testing.assert_close(score_candidates(loaded.eval(), batch).logps, score_candidates(task.model, batch).logps,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["patch", "llava"])
def test_lora_dpo_with_the_adapter_reference(kind, tmp_path):
    cfg = _config(tmp_path, kind, "dpo", "lora.enabled=true", "reference.strategy=adapter")
    task, out, changed = _train(cfg)
    assert math.isfinite(out["stages"][0]["final"]["loss"])
    assert changed and all("lora_" in k or "modules_to_save" in k for k in changed), changed
    assert not [n for n, _ in task.model.named_parameters() if "vision_tower" in n and "lora_" in n]
    loaded, _ = load_lvlm(out["final_model"])  # LoRA over a tiny in-memory base: saved merged
    batch = _batch(task.family.inputs, (0, 1))
    task.model.eval()
    torch.testing.assert_close(score_candidates(loaded.eval(), batch).logps, score_candidates(task.model, batch).logps,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["patch", "llava"])
def test_conversational_rows_with_activation_checkpointing(kind, tmp_path):
    """TRL's conversational vision rows through the tiny tokenizer's chat template; with activation checkpointing
    the prompt cache is off while training (concatenated path), on for the no-grad reference pass."""
    from mmalign.methods.lvlm import LVLMTask

    cfg = _config(tmp_path, kind, "dpo", "model.gradient_checkpointing=true", "run.max_steps=2",
                  data="prefs_chat.jsonl")
    task, out, changed = _train(cfg, LVLMTask(cfg))
    assert math.isfinite(out["stages"][0]["final"]["loss"]) and changed
    assert out["stages"][0]["data"]["rows_used"] == 6


def test_config_refusals(tmp_path):
    from mmalign.config import ConfigError
    from mmalign.methods.preference import PreferenceTask

    with pytest.raises(ConfigError, match="tdpo.*lvlm family.*not implemented for LVLMs"):
        PreferenceTask(_config(tmp_path, "patch", "tdpo"), family=LVLMFamily)
    from types import SimpleNamespace

    from mmalign.data.rows import DataError

    task = PreferenceTask(_config(tmp_path, "patch", "dpo", data="kto.jsonl"), family=LVLMFamily)
    with pytest.raises(DataError, match="'unpaired' format, but loss 'dpo' reads \\['pairs'\\]"):
        task.stage_data(SimpleNamespace(train=None))
    with pytest.raises(ConfigError, match="patch embedding trains outside the LoRA adapter"):
        PreferenceTask(_config(tmp_path, "patch", "dpo", "lora.enabled=true", "prior.freeze_vision_tower=false"),
                       family=LVLMFamily)
