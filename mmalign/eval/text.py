"""Text evaluation against a reference: mean reward, win-rate and KL(policy ‖ reference) on a prompt set
(``mmalign eval text``, the mid-run evaluation of ``run.eval_prompts`` and the text demo).

For every seed, the policy and the reference each sample ``samples_per_prompt`` completions per prompt with the
same seed (:func:`mmalign.sample.text.generate`, temperature 1 by default); a reward function scores every
completion (``f(prompts, completions) -> list[float]``, the signature of
:func:`mmalign.methods.rewards.load_reward_fn`), and the win-rate compares each policy sample with the reference
sample of the same prompt, seed and index (:mod:`mmalign.eval.paired`).

KL(π ‖ π_ref) per sequence is the Monte-Carlo estimate on the policy's own samples,
``mean_y [log π(y|x) − log π_ref(y|x)]`` with sequence log-probs summed over the completion tokens
(:func:`~mmalign.adapters.causal_lm.score_batch`), the estimator of the RLHF literature (e.g. Rafailov et al.
2023, arXiv 2305.18290, Fig. 2's KL axis). It is unbiased at temperature 1 without top-p; at other settings it is
the mean log-ratio on the tempered samples, not the KL. It needs one vocabulary for both models and is ``None``
when their tokenizers differ. A single sample's estimate can be negative; the mean over many is ≥ 0 in
expectation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..adapters.causal_lm import score_batch
from ..sample.text import Samples, generate, samples_to_batch
from .paired import seed_summary, wins

__all__ = ["ADAPTER_DISABLED", "compare_text", "sequence_logps"]

RewardFn = Callable[[list, list[str]], list[float]]
# ``reference=ADAPTER_DISABLED``: the reference is the policy with its PEFT adapter switched off (LoRA runs).
ADAPTER_DISABLED = "adapter-disabled"
_KEYS = ("reward", "reward_reference", "win_rate", "kl")


@contextmanager
def _reference_view(policy: nn.Module, reference: nn.Module | str):
    """The model that plays the reference: ``reference`` itself, or the policy with its adapter disabled."""
    if isinstance(reference, str):
        if reference != ADAPTER_DISABLED:
            raise ValueError(f"reference={reference!r}: give a model or {ADAPTER_DISABLED!r}")
        inner = getattr(policy, "module", policy)
        with inner.disable_adapter():
            yield policy
    else:
        yield reference


@torch.no_grad()
def sequence_logps(model: nn.Module, samples: Samples, pad_id: int, *, batch_size: int = 32) -> torch.Tensor:
    """``[N]`` summed completion log-probs of generated ``samples`` under ``model`` (in chunks of ``batch_size``)."""
    device = next(model.parameters()).device
    was_training = getattr(model, "training", False)
    model.eval()
    out = []
    for i in range(0, len(samples.prompt_ids), batch_size):
        part = Samples(samples.prompts[i:i + batch_size], samples.completions[i:i + batch_size],
                       samples.prompt_ids[i:i + batch_size], samples.completion_ids[i:i + batch_size])
        batch = samples_to_batch(part, pad_id).to(device)
        out.append(score_batch(model, batch, return_token_logps=False).logps[:, 0].float().cpu())
    model.train(was_training)
    return torch.cat(out)


def _same_vocab(a, b) -> bool:
    return a is b or a.get_vocab() == b.get_vocab()


@torch.no_grad()
def compare_text(
    policy: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    reference: nn.Module | str | None = None,
    reference_tokenizer=None,
    reward_fn: RewardFn | None = None,
    seeds: Sequence[int] = (0,),
    samples_per_prompt: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    chat: bool = False,
    batch_size: int = 32,
    reference_cache: dict | None = None,
) -> dict[str, Any]:
    """Sample, score and compare ``policy`` with ``reference`` (a model, :data:`ADAPTER_DISABLED`, or None: the
    policy alone, reward only) on ``prompts`` × ``seeds`` × ``samples_per_prompt``.

    Returns ``{reward, reward_std, reward_reference, win_rate, kl (each with _std over seeds), n_samples,
    per_seed: [...], samples: [{prompt, seed, policy, reference, reward, reward_reference, kl}, ...]}``; keys
    whose ingredient is missing (no reward function, no reference) are left out. ``reference_cache``: a dict kept
    by the caller between calls whose reference does not change (its samples and rewards are reused by seed)."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt={samples_per_prompt} must be >= 1")
    ref_tok = reference_tokenizer or tokenizer
    gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, chat=chat, batch_size=batch_size)
    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    kl_ok = reference is not None and _same_vocab(tokenizer, ref_tok)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_seed, rows = [], []
    for seed in seeds:
        s_pol = generate(policy, tokenizer, flat, seed=seed, **gen)
        r_pol = reward_fn(list(flat), s_pol.completions) if reward_fn else None
        s_ref = r_ref = kl = None
        if reference is not None:
            cached = reference_cache.get(seed) if reference_cache is not None else None
            with _reference_view(policy, reference) as ref_model:
                if cached is None:
                    s_ref = generate(ref_model, ref_tok, flat, seed=seed, **gen)
                    r_ref = reward_fn(list(flat), s_ref.completions) if reward_fn else None
                    if reference_cache is not None:
                        reference_cache[seed] = (s_ref, r_ref)
                else:
                    s_ref, r_ref = cached
                if kl_ok:
                    ref_logps = sequence_logps(ref_model, s_pol, pad_id, batch_size=batch_size)
            if kl_ok:
                kl = (sequence_logps(policy, s_pol, pad_id, batch_size=batch_size) - ref_logps).tolist()
        w = wins(r_pol, r_ref) if r_pol is not None and r_ref is not None else None
        per_seed.append({"seed": seed, "reward": _mean(r_pol), "reward_reference": _mean(r_ref),
                         "win_rate": _mean(w), "kl": _mean(kl)})
        for i, prompt in enumerate(flat):
            rows.append({"prompt": prompt, "seed": seed, "policy": s_pol.completions[i],
                         **({"reference": s_ref.completions[i]} if s_ref is not None else {}),
                         **({"reward": r_pol[i]} if r_pol is not None else {}),
                         **({"reward_reference": r_ref[i]} if r_ref is not None else {}),
                         **({"kl": kl[i]} if kl is not None else {})})
    return {**seed_summary(per_seed, _KEYS), "n_samples": len(rows), "per_seed": per_seed, "samples": rows}


def _mean(xs) -> float | None:
    return None if xs is None or not len(xs) else float(sum(xs) / len(xs))

