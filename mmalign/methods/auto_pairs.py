"""Automatic pair construction (Xu et al. 2023, arXiv 2310.02263): a *data recipe*, not a new Task.

Responses of models of different strength to the same prompts become preference pairs (stronger = chosen,
:func:`mmalign.data.pairs.build_pairs`), each with a difficulty; :func:`mmalign.data.pairs.curriculum_stages`
turns them into an easy→hard ``stages:`` list. Training is then an ordinary text run with any pairwise
row of :data:`~mmalign.methods.table.METHODS` — the paper compares SFT, SLiC (``loss.name:
slic``, reference-free calibration hinge + NLL, arXiv 2305.10425) and DPO (``loss.name: dpo``, arXiv
2305.18290 Eq. 7) — through the one loop, so no recipe class is needed.

Where this follows the paper and where it deviates (the note's recollections are unverified, see
:mod:`mmalign.data.pairs`):

- the paper's sources are fixed API models (GPT-4 > ChatGPT > InstructGPT) answering once per prompt; here
  the sources are local checkpoints (or response files) sampled with the same prompts and seed, so every
  model sees the same prompt list and the same sampling stream;
- the paper needs no reward at all; here a reward (a function or a reward-model checkpoint) is optional and
  only sets the difficulty (and, if asked, drops or flips the pairs it disagrees with — not in the paper);
- a curriculum stage is a contiguous difficulty quantile; the paper switches between source-model pools
  (the same thing when difficulty is the strength gap and every pool has the same size).

Rewards accepted by :func:`resolve_reward`: a name in :data:`REWARDS`, ``module:function`` (a batched
``f(prompts, completions) -> list[float]``), or a reward-model directory (written by a ``loss.name: rm``
run: a causal LM with ``value_head.safetensors``), scored at the completion's last token.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data.pairs import RewardFn, build_pairs, read_responses, score_responses


def _warm_colors(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    from ..data.warm_colors import reward

    return [reward(c) for c in completions]


# name -> batched reward (prompts, completions) -> floats; programmatic rewards of the shipped synthetic tasks
REWARDS: dict[str, RewardFn] = {"warm_colors": _warm_colors}


def reward_model(path: str | Path, *, batch_size: int = 32) -> RewardFn:
    """A reward model checkpoint as a batched reward: the value head at the completion's last token (EOS
    appended, as the text encoder does for training rows)."""
    from ..adapters.causal_lm import score_batch
    from ..models.text import load_causal_lm, load_tokenizer
    from ..sample.text import Samples, samples_to_batch

    tok = load_tokenizer(path)
    model = load_causal_lm(path, value_head=True).eval()

    @torch.no_grad()
    def score(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        out: list[float] = []
        for a in range(0, len(prompts), batch_size):
            ps, cs = list(prompts[a:a + batch_size]), list(completions[a:a + batch_size])
            pids = [tok(p, add_special_tokens=True)["input_ids"] or [tok.bos_token_id] for p in ps]
            cids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in cs]
            batch = samples_to_batch(Samples(ps, cs, pids, cids), tok.pad_token_id)
            out += score_batch(model, batch, compute_values=True).values[:, 0].tolist()
        return out

    return score


def resolve_reward(spec: str | None) -> RewardFn | None:
    """``None``, a :data:`REWARDS` name, ``module:function`` or a reward-model directory (see module doc)."""
    if spec is None or spec == "":
        return None
    if spec in REWARDS:
        return REWARDS[spec]
    if Path(spec).is_dir():
        if not (Path(spec) / "value_head.safetensors").is_file():
            raise ValueError(f"--reward {spec}: the directory has no value_head.safetensors; give a reward model "
                             "trained with loss.name=rm, a reward name in " + str(sorted(REWARDS)) +
                             ", or module:function")
        return reward_model(spec)
    module, sep, fn = spec.partition(":")
    if not sep:
        raise ValueError(f"--reward {spec!r}: not a directory, not one of {sorted(REWARDS)}, and not module:function")
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--reward {spec!r}: cannot import {fn!r} from {module!r} ({err})") from None


def generate_responses(sources: dict[str, str | Path], prompts: Sequence[str], *, seed: int = 0,
                       max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0,
                       batch_size: int = 32, chat: bool = False,
                       chat_template: str | None = None) -> dict[str, list[str]]:
    """Each source's completions for ``prompts``: a checkpoint directory is sampled with
    :func:`mmalign.sample.text.generate` (batched, same prompts and seed for every model); a ``.jsonl`` file
    is read as responses (:func:`mmalign.data.pairs.read_responses`) and must list the same prompts.
    ``chat_template`` (text or a file) replaces each model's own template for ``chat`` prompts."""
    from ..models.chat import set_chat_template
    from ..models.text import load_causal_lm, load_tokenizer
    from ..sample.text import generate

    out: dict[str, list[str]] = {}
    for name, src in sources.items():
        path = Path(src)
        if path.is_file():
            file_prompts, comps = read_responses(path)
            if list(file_prompts) != list(prompts):
                raise ValueError(f"{path}: its prompts differ from the prompts file (first mismatch at row "
                                 f"{_first_mismatch(file_prompts, prompts)}); responses must answer the same "
                                 "prompts in the same order")
            out[name] = comps
            continue
        if not path.is_dir():
            raise ValueError(f"model {name!r}: {src} is neither a checkpoint directory nor a responses .jsonl file")
        model = load_causal_lm(path)
        tok = set_chat_template(load_tokenizer(path), chat_template, where="--chat-template")
        out[name] = generate(model, tok, list(prompts), max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                             chat=chat).completions
        del model
    return out


def _first_mismatch(a: Sequence[str], b: Sequence[str]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def auto_pairs(sources: dict[str, str | Path], strength: dict[str, int], prompts: Sequence[str], *,
               reward: str | RewardFn | None = None, on_disagreement: str = "keep", seed: int = 0,
               **gen_kwargs) -> tuple[list[dict], dict[str, float], dict[str, list[str]]]:
    """Generate (or read) every source's responses and pair them: ``(rows, stats, responses)``.

    ``stats`` also holds ``mean_reward_<model>`` when a reward is given, so the strength
    ordering can be checked against the reward, as the paper did (unverified)."""
    responses = generate_responses(sources, prompts, seed=seed, **gen_kwargs)
    fn = resolve_reward(reward) if isinstance(reward, str) or reward is None else reward
    rewards = score_responses(fn, prompts, responses) if fn is not None else None
    rows, counts = build_pairs(prompts, responses, strength, rewards=rewards, on_disagreement=on_disagreement)
    stats: dict[str, float] = dict(counts)
    if rewards is not None:
        for name, vals in rewards.items():
            stats[f"mean_reward_{name}"] = sum(vals) / max(1, len(vals))
    return rows, stats, responses
