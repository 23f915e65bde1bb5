"""Text generation for qualitative checks, evaluation and online methods.

Batched, left-padded, KV-cached generation through ``model.generate``; seeded so that the same prompts and
seed give the same samples for the policy and the reference (before/after comparisons are paired).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..models.chat import chat_prompt_ids


@dataclass
class Samples:
    prompts: list[str]
    completions: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    chat: bool = False,
) -> Samples:
    """Sample one completion per prompt. ``temperature=0`` is greedy decoding.

    Prompts are encoded like the training data (chat template when ``chat``), left-padded so that one
    forward fills the KV cache for the whole batch.
    """
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out_c, out_pi, out_ci = [], [], []
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        if chat:
            ids = [chat_prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in chunk]
        else:
            # with special tokens (BOS for Llama-style tokenizers), as the text encoder tokenises training prompts
            ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in chunk]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, width - len(x):] = torch.tensor(x)
            attn[i, width - len(x):] = 1
        # generate() draws from torch's global RNG: seed it per chunk from our own generator for reproducibility
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id,
                  "eos_token_id": tokenizer.eos_token_id}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        seqs = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device), **kwargs)
        for i, x in enumerate(ids):
            new = seqs[i, width:].tolist()
            if tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id) + 1]
            new = [t for t in new if t != pad_id or t == tokenizer.eos_token_id]
            out_pi.append(x)
            out_ci.append(new)
            out_c.append(tokenizer.decode(new, skip_special_tokens=True))
    model.train(was_training)
    return Samples(prompts=list(prompts), completions=out_c, prompt_ids=out_pi, completion_ids=out_ci)


def samples_to_batch(samples: Samples, pad_id: int, *, extra_completions: Sequence[list[int]] | None = None):
    """Pack generated samples as a K=1 (or K=2 with ``extra_completions``) TextBatch for scoring."""
    from ..data.batches import TextBatch

    n = len(samples.prompt_ids)
    comps = [[c] for c in samples.completion_ids]
    if extra_completions is not None:
        comps = [[a, b] for a, b in zip(samples.completion_ids, extra_completions, strict=True)]
    k = len(comps[0])
    pw = max(len(p) for p in samples.prompt_ids)
    cw = max(1, max(len(c) for cs in comps for c in cs))
    prompt_ids = torch.full((n, pw), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, pw), dtype=torch.long)
    completion_ids = torch.full((n, k, cw), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((n, k, cw), dtype=torch.long)
    for i, p in enumerate(samples.prompt_ids):
        prompt_ids[i, pw - len(p):] = torch.tensor(p)
        prompt_mask[i, pw - len(p):] = 1
        for j, c in enumerate(comps[i]):
            if c:
                completion_ids[i, j, : len(c)] = torch.tensor(c)
                completion_mask[i, j, : len(c)] = 1
    return TextBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                     completion_mask=completion_mask)
