"""Preference pairs from a reward table: ``[prompts, samples]`` scores → (chosen, rejected) index pairs.

Shared by the self-generated-pair recipes: the diffusion demo (images ranked by a programmatic reward) and the
AVP-RPO ranking step (:mod:`mmalign.data.av_ranking`, audio candidates ranked by an audio-visual reward).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class RankedPair:
    """Indices into one prompt's samples: ``chosen`` scored higher than ``rejected`` by ``margin``."""

    prompt_index: int
    chosen: int
    rejected: int
    margin: float


def rank_pairs(rewards: Tensor | np.ndarray, *, strategy: str = "best_worst", min_margin: float = 0.0,
               max_pairs_per_prompt: int | None = None) -> list[RankedPair]:
    """Pairs from a ``[P, N]`` reward table (P prompts × N samples each).

    ``best_worst``: one pair per prompt, the highest against the lowest sample (the usual choice for
    self-generated pairs: largest margin, least label noise). ``all``: every pair with margin ≥ ``min_margin``,
    largest margins first. Prompts whose best margin is below ``min_margin`` give no pair (ties carry no
    preference; Diffusion-DPO drops tied Pick-a-Pic pairs).
    """
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.dim() != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, samples] with >= 2 samples per prompt; got {tuple(r.shape)}")
    if strategy not in ("best_worst", "all"):
        raise ValueError(f"strategy={strategy!r} is not one of ['all', 'best_worst']")
    pairs: list[RankedPair] = []
    for p in range(r.shape[0]):
        row = r[p]
        if strategy == "best_worst":
            hi, lo = int(row.argmax()), int(row.argmin())
            margin = float(row[hi] - row[lo])
            if margin > 0 and margin >= min_margin:
                pairs.append(RankedPair(p, hi, lo, margin))
            continue
        cand = [RankedPair(p, i, j, float(row[i] - row[j])) for i in range(len(row)) for j in range(len(row))
                if row[i] - row[j] > 0 and row[i] - row[j] >= min_margin]
        cand.sort(key=lambda q: -q.margin)
        pairs.extend(cand[:max_pairs_per_prompt] if max_pairs_per_prompt else cand)
    return pairs
