"""Synthetic negatives for sequence-level contrastive training on plain SFT data (Feng et al. 2025).

Feng et al., "Sequence-level Large Language Model Training with Contrastive Preference Optimization"
(arXiv 2502.16433, NAACL 2025 Findings; research/llm_losses.md §1.1): the ground-truth continuation of a prompt is
the positive and the negatives are made without labels. The four generators, under their paper abbreviations:

- **AN** :func:`autoregressive_negatives` — continuations sampled from the model (batched ``generate`` with KV
  cache on the batch's own left-padded prompt ids), seeded, so the same (seed, batch) gives the same samples.
- **BN** :func:`batch_negatives` — other rows' positives of the same batch (InfoNCE-like). A row whose
  positive is token-identical to this row's (two "add: 4 5 =" rows) is never used: it is not a negative.
- **MN** :func:`mean_field_negatives` — ``round(c·L)`` random positions of the positive (at least one) are
  replaced by the model's prediction given the ground-truth prefix (argmax, or a sample), all from one
  teacher-forced forward. Positions where the prediction equals the ground truth stay unchanged, so a
  negative changes *at most* ``round(c·L)`` tokens.
- **TN** :func:`truncation_negatives` — a strict prefix of the positive's content followed by EOS.

Choices the paper (as read; no public code) leaves open, made here and marked *unverified*:

- the trailing EOS of the positive is never replaced (MN) nor counted in its length (TN, MN), so every
  negative is a terminated sequence; MN's rate c counts content tokens;
- a negative token-identical to its positive is dropped (:func:`build_candidates`): it would be scored as both
  the winner and a loser of the same list;
- the similarity that orders ranked negatives ("…R" variants) was not visible in the digest; we use the
  ROUGE-L F1 of token ids, ``2·LCS(a, b) / (|a| + |b|)`` (:func:`lcs_ratio`), content tokens only.

The generators that run the model (AN, MN) take ``lm``, the transformers causal LM itself: the caller reaches it
through DDP / value-head / PEFT wrappers (``mmalign.adapters.causal_lm.unwrap_causal_lm(model).lm``; LoRA layers
are injected in place, so they are active in it), which keeps this data module free of adapter imports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .batches import TextBatch

# Candidate kind codes stored in ``extras["candidate_kind"]`` ([B, K] long; -1 = padding candidate).
KINDS = ("autoregressive", "batch", "mean_field", "truncation")
KIND_CODES = {"positive": 0, **{k: i + 1 for i, k in enumerate(KINDS)}}

Negatives = list[list[list[int]]]  # per row, a list of token-id completions


def positives(batch: TextBatch) -> list[list[int]]:
    """Candidate 0 of every row (the ground truth), as token-id lists without padding."""
    ids, mask = batch.completion_ids[:, 0].tolist(), batch.completion_mask[:, 0].tolist()
    return [[t for t, m in zip(row, mrow, strict=True) if m] for row, mrow in zip(ids, mask, strict=True)]


def content(ids: Sequence[int], eos_id: int | None) -> list[int]:
    """``ids`` without its trailing EOS (if it has one)."""
    ids = list(ids)
    return ids[:-1] if ids and eos_id is not None and ids[-1] == eos_id else ids


def truncation_negatives(pos: Sequence[Sequence[int]], *, eos_id: int, num: int,
                         generator: torch.Generator) -> Negatives:
    """TN: ``content[:j] + [EOS]`` with ``j`` uniform in ``[0, len(content))``: always a strict prefix.

    Rows whose content is empty (the positive is just EOS) have no strict prefix and get no TN."""
    out: Negatives = []
    for ids in pos:
        body = content(ids, eos_id)
        if not body:
            out.append([])
            continue
        cuts = torch.randint(0, len(body), (num,), generator=generator).tolist()
        out.append([body[:j] + [eos_id] for j in cuts])
    return out


def batch_negatives(pos: Sequence[Sequence[int]], *, num: int, generator: torch.Generator) -> Negatives:
    """BN: up to ``num`` positives of other rows, drawn without replacement, never equal to this row's own."""
    out: Negatives = []
    for i, own in enumerate(pos):
        others = [j for j in range(len(pos)) if j != i and list(pos[j]) != list(own)]
        pick = torch.randperm(len(others), generator=generator)[:num].tolist() if others else []
        out.append([list(pos[others[p]]) for p in pick])
    return out


@torch.no_grad()
def teacher_forced_logits(lm: nn.Module, batch: TextBatch) -> Tensor:
    """Next-token logits ``[B, C, V]`` at every completion position of candidate 0, given the prompt and the
    ground-truth prefix (one forward of ``[prompt; positive]``; left pads do not shift the positions)."""
    p = batch.prompt_ids.shape[1]
    c = batch.completion_ids.shape[2]
    ids = torch.cat([batch.prompt_ids, batch.completion_ids[:, 0]], 1)
    attn = torch.cat([batch.prompt_mask, batch.completion_mask[:, 0]], 1)
    position_ids = (attn.long().cumsum(-1) - 1).clamp_min(0)
    was_training = lm.training
    lm.eval()  # no dropout in the data step
    try:
        logits = lm(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=False).logits
    finally:
        lm.train(was_training)
    return logits[:, p - 1: p - 1 + c].float()  # position t predicts completion token t


def teacher_forced_predictions(logits: Tensor, *, sample: bool, temperature: float,
                               generator: torch.Generator, num: int = 1) -> Tensor:
    """``[num, B, C]`` predictions from :func:`teacher_forced_logits`: argmax, or samples at ``temperature``."""
    if not sample or temperature <= 0:
        return logits.argmax(-1).cpu().unsqueeze(0).expand(num, -1, -1)
    probs = torch.softmax(logits / temperature, -1).cpu()
    b, c, v = probs.shape
    draws = torch.multinomial(probs.reshape(b * c, v), num, replacement=True, generator=generator)
    return draws.T.reshape(num, b, c)


def mean_field_negatives(lm: nn.Module | None, batch: TextBatch, *, rate: float, num: int, eos_id: int | None,
                         generator: torch.Generator, sample: bool = False, temperature: float = 1.0,
                         predictions: Tensor | None = None) -> Negatives:
    """MN: replace ``max(1, round(rate·L))`` random content positions of the positive (``L`` content tokens) by
    the model's teacher-forced prediction there. ``predictions`` ``[num, B, C]`` skips the forward (tests)."""
    pos = positives(batch)
    if predictions is None:
        logits = teacher_forced_logits(lm, batch)
        predictions = teacher_forced_predictions(logits, sample=sample, temperature=temperature,
                                                 generator=generator, num=num)
    preds = predictions.tolist()
    out: Negatives = []
    for i, ids in enumerate(pos):
        n_content = len(content(ids, eos_id))
        negs = []
        for n in range(num if n_content else 0):
            k = max(1, round(rate * n_content))
            neg = list(ids)
            for t in torch.randperm(n_content, generator=generator)[:k].tolist():
                neg[t] = preds[n][i][t]
            negs.append(neg)
        out.append(negs)
    return out


@torch.no_grad()
def autoregressive_negatives(lm: nn.Module, batch: TextBatch, *, num: int, max_new_tokens: int,
                             temperature: float, top_p: float, seed: int, eos_id: int, pad_id: int) -> Negatives:
    """AN: ``num`` sampled continuations per prompt (``temperature=0``: greedy), cut after the first EOS.

    Same recipe as :func:`mmalign.sample.text.generate` (left-padded batch, KV cache, ``top_k=0``, torch's RNG
    seeded from ``seed``) but on the batch's token ids rather than re-tokenised strings, so chat-templated and
    truncated prompts are exactly the ones being scored. The global RNG is forked: training's random stream
    does not depend on how many tokens were sampled (exact resume)."""
    prompt_ids = batch.prompt_ids.repeat_interleave(num, 0)
    prompt_mask = batch.prompt_mask.repeat_interleave(num, 0)
    was_training = lm.training
    lm.eval()
    dev = prompt_ids.device
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id,
                      "eos_token_id": eos_id, "use_cache": True}
            if temperature > 0:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
            seqs = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
    finally:
        lm.train(was_training)
    new = seqs[:, prompt_ids.shape[1]:].tolist()
    out: Negatives = [[] for _ in range(batch.batch_size)]
    for r, toks in enumerate(new):
        if eos_id in toks:
            toks = toks[: toks.index(eos_id) + 1]
        elif pad_id != eos_id:
            toks = [t for t in toks if t != pad_id]
        out[r // num].append(toks)
    return out


def lcs_ratio(a: Sequence[int], b: Sequence[int]) -> float:
    """ROUGE-L F1 on token ids: ``2·LCS(a, b) / (|a| + |b|)`` in [0, 1]; 1 for two empty sequences.

    Our choice for the "…R" ranking (the paper's similarity was not visible: unverified)."""
    if not a and not b:
        return 1.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return 2.0 * prev[-1] / (len(a) + len(b))


def build_candidates(batch: TextBatch, negatives: Sequence[Sequence[tuple[str, list[int]]]], *, pad_id: int,
                     eos_id: int | None, rank_by_similarity: bool = False) -> TextBatch:
    """The batch with K = 1 + (most negatives of any row) candidates: the positive first, then its negatives.

    ``labels``: 0 for the positive; negatives get ranks 1, 2, ... by decreasing :func:`lcs_ratio` to the positive
    with ``rank_by_similarity`` (ties keep generation order), else NaN (unranked: "the positive beats all of
    them", the top-1 form). Negatives equal to their positive are dropped. ``candidate_mask`` marks real
    candidates; ``extras["candidate_kind"]`` holds :data:`KIND_CODES` (-1 for padding)."""
    pos = positives(batch)
    rows = []
    for i, own in enumerate(pos):
        kept = [(kind, ids) for kind, ids in negatives[i] if ids and list(ids) != own]
        if rank_by_similarity:
            base = content(own, eos_id)
            sims = [lcs_ratio(base, content(ids, eos_id)) for _, ids in kept]
            kept = [kept[j] for j in sorted(range(len(kept)), key=lambda j: -sims[j])]
        rows.append(kept)
    b = batch.batch_size
    k = 1 + max(len(r) for r in rows)
    width = max([len(p) for p in pos] + [len(ids) for r in rows for _, ids in r])
    dev = batch.completion_ids.device
    ids_t = torch.full((b, k, width), pad_id, dtype=torch.long)
    mask_t = torch.zeros((b, k, width), dtype=torch.long)
    cand = torch.zeros((b, k), dtype=torch.bool)
    labels = torch.full((b, k), float("nan"))
    kinds = torch.full((b, k), -1, dtype=torch.long)
    for i, own in enumerate(pos):
        for j, (kind, ids) in enumerate([("positive", own), *rows[i]]):
            if ids:
                ids_t[i, j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask_t[i, j, : len(ids)] = 1
            cand[i, j] = True
            kinds[i, j] = KIND_CODES[kind]
            if j == 0 or rank_by_similarity:
                labels[i, j] = float(j)
    extras = {**batch.extras, "candidate_kind": kinds.to(dev)}
    meta = [{**m, "negative_kinds": [kind for kind, _ in rows[i]]} for i, m in
            enumerate(batch.meta or [{} for _ in range(b)])]
    return TextBatch(batch.prompt_ids, batch.prompt_mask, ids_t.to(dev), mask_t.to(dev), cand.to(dev),
                     labels.to(dev), meta, extras)
