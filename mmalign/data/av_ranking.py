"""AVP-RPO's ranking step: score K generated audios per video with an SF-CAVP-style reward, then build pairs.

MultiSoundGen (Yang et al., arXiv 2509.19999) ranks the generator's candidates with its SF-CAVP model and trains
on the result ("AVP-RPO"); the paper's code, reward formula, K and margins are not public
(research/video_audio_clip_prior.md §2.1). What is here is the **MultiSoundGen-style** design of §2.2, an
inferred design, not a reproduction:

- :func:`av_reward` (§2.2 step 2): r(v, a) = w_s·cos(f_v^slow, f_a^slow) + w_f·mean_t cos(f_v,t^fast, f_a,t^fast).
  The slow (semantic) stream compares pooled embeddings; the fast (dynamic) stream compares embeddings frame by
  frame, so audio whose events are shifted against the picture loses reward even when its content is right.
  The summaries mention cosine similarity; the weights and the per-time-step mean are inferred [unverified].
- :func:`rank_av_pairs` (§2.2 step 3): chosen = best, rejected = worst (``best_worst``), or every pair above a
  margin (``all``). It is a thin wrapper over :func:`mmalign.data.ranking.rank_pairs` (the diffusion demo's
  generic ranker over a ``[prompts, samples]`` reward table), adding video ids, candidate names, captions, input
  checks and the strict tie rule below.

Tie rule: a pair needs margin > ``min_margin`` (strictly; margin = 0 never gives a pair). ``ranking.rank_pairs``
keeps margin == ``min_margin`` when ``min_margin > 0``; the pairs at exactly the threshold are dropped here
after its call, which is exact because its ``all`` list is sorted by falling margin before truncation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError
from .ranking import rank_pairs
from .rows import DataError

STRATEGIES = ("all", "best_worst")  # dispatched by ranking.rank_pairs; listed here for validation messages


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


def av_reward(video_slow: Tensor, audio_slow: Tensor, video_fast: Tensor | None = None,
              audio_fast: Tensor | None = None, weights: tuple[float, float] = (1.0, 1.0), *,
              fast_mask: Tensor | None = None) -> Tensor:
    """SF-CAVP-style reward ``[...]`` (``[B]`` for ``[B, D]`` inputs), in [−(w_s+w_f), w_s+w_f].

    Args:
        video_slow, audio_slow: ``[..., D]`` pooled embeddings (normalisation is not needed: cosine).
        video_fast, audio_fast: ``[..., T, D]`` per-time-step embeddings on a common time grid (resample the
            faster stream first); both or neither. Without them only the slow term is used.
        weights: ``(w_s, w_f)``, finite and >= 0.
        fast_mask: ``[..., T]``, True = valid time step; the mean runs over the valid steps (a row with none
            gets a fast term of 0).

    Leading dims broadcast, so ``video_slow[:, None]`` (``[V, 1, D]``) against ``audio_slow`` (``[V, K, D]``)
    scores K candidates per video into ``[V, K]``, the input of :func:`rank_av_pairs`.
    """
    w_s, w_f = (float(w) for w in weights)
    if not all(math.isfinite(w) and w >= 0 for w in (w_s, w_f)) or w_s + w_f == 0:
        raise ConfigError(f"av_reward weights={tuple(weights)} must be finite, >= 0 and not both 0")
    if video_slow.shape[-1] != audio_slow.shape[-1]:
        raise ValueError(f"slow features differ in width: video {tuple(video_slow.shape)} vs audio "
                         f"{tuple(audio_slow.shape)}")
    reward = w_s * _cosine(video_slow, audio_slow)
    if (video_fast is None) != (audio_fast is None):
        raise ValueError("pass both video_fast and audio_fast, or neither")
    if video_fast is None:
        return reward
    if video_fast.dim() < 2 or video_fast.shape[-2:] != audio_fast.shape[-2:]:
        raise ValueError(f"fast features must be [..., T, D] with equal T and D; got video "
                         f"{tuple(video_fast.shape)} and audio {tuple(audio_fast.shape)}; fix: interpolate both "
                         "streams to a common number of time steps")
    per_step = _cosine(video_fast, audio_fast)  # [..., T]
    if fast_mask is None:
        fast = per_step.mean(-1)
    else:
        m = fast_mask.to(per_step.dtype)
        fast = (per_step * m).sum(-1) / m.sum(-1).clamp_min(1.0)
    return reward + w_f * fast


def _candidate_names(candidates: Sequence[Sequence[Any]] | None, v: int, k: int) -> list[list[Any]]:
    if candidates is None:
        return [list(range(k)) for _ in range(v)]
    names = [list(c) for c in candidates]
    if len(names) != v or any(len(c) != k for c in names):
        raise DataError(f"candidates must list K={k} audios for each of the V={v} videos; got "
                        f"{[len(c) for c in names]} (fix: one list of K candidate paths/ids per video, in the "
                        "column order of the score table)")
    return names


def rank_av_pairs(scores: Tensor, video_ids: Sequence[Any], *, strategy: str = "best_worst",
                  min_margin: float = 0.0, max_pairs_per_video: int | None = None,
                  candidates: Sequence[Sequence[Any]] | None = None, prompts: Sequence[Any] | None = None,
                  captions: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """Preference rows from a ``[V, K]`` table of reward scores (V videos × K generated audios each).

    Returns one dict per pair: ``video``, ``chosen``, ``rejected`` (entries of ``candidates[v]``, or the
    candidate indices when ``candidates`` is None), ``margin`` (score difference, > ``min_margin``),
    ``chosen_index``/``rejected_index``, ``chosen_score``/``rejected_score``, and ``prompt``/``caption`` when
    given (one per video). ``best_worst`` gives at most one pair per video; ``all`` gives every ordered pair
    above the margin, largest margins first, at most ``max_pairs_per_video`` (≤ K(K−1)/2 in any case).
    Both candidates of a pair come from the same row of ``scores``, i.e. the same video and conditioning (§2.7).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"ranking strategy={strategy!r} is not one of {sorted(STRATEGIES)}")
    if not (math.isfinite(min_margin) and min_margin >= 0):
        raise ConfigError(f"min_margin={min_margin!r} must be a finite number >= 0")
    if max_pairs_per_video is not None and (isinstance(max_pairs_per_video, bool) or max_pairs_per_video < 1):
        raise ConfigError(f"max_pairs_per_video={max_pairs_per_video!r} must be >= 1 or None (no limit)")
    r = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    if r.dim() != 2 or r.shape[1] < 2:
        raise DataError(f"scores must be [videos, candidates] with >= 2 candidates per video; got "
                        f"{tuple(r.shape)}")
    v, k = r.shape
    ids = list(video_ids)
    if len(ids) != v:
        raise DataError(f"{len(ids)} video ids for {v} rows of scores; fix: one id per row, in order")
    bad = (~torch.isfinite(r)).nonzero().tolist()
    if bad:
        shown = ", ".join(f"video {ids[i]!r} candidate {j} = {float(r[i, j])}" for i, j in bad[:5])
        raise DataError(f"{len(bad)} non-finite reward score(s): {shown}; fix: rescore those candidates or "
                        "drop the videos")
    names = _candidate_names(candidates, v, k)
    extra: dict[str, list[Any]] = {}
    for key, values in (("prompt", prompts), ("caption", captions)):
        if values is not None:
            extra[key] = list(values)
            if len(extra[key]) != v:
                raise DataError(f"{len(extra[key])} {key}s for {v} videos; fix: one {key} per video")
    pairs = rank_pairs(r, strategy=strategy, min_margin=min_margin, max_pairs_per_prompt=max_pairs_per_video)
    rows = []
    for p in pairs:
        if p.margin <= min_margin:
            continue
        i = p.prompt_index
        row = {"video": ids[i], "chosen": names[i][p.chosen], "rejected": names[i][p.rejected],
               "margin": p.margin, "chosen_index": p.chosen, "rejected_index": p.rejected,
               "chosen_score": float(r[i, p.chosen]), "rejected_score": float(r[i, p.rejected])}
        row.update({key: values[i] for key, values in extra.items()})
        rows.append(row)
    return rows
