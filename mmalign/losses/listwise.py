"""Listwise preference losses: Plackett–Luce over K candidates, its pairwise expansion, and ListMLE.

One kernel serves several methods (research/llm_losses.md §1, §2, §8.1):
- PL-DPO / multi-negative DPO: ``scores = β·(policy_logps − ref_logps)`` (DPO paper appendix);
- Feng et al. 2025 "sequence-level contrastive" training (arXiv 2502.16433): ranked or top-1 form;
- Yang et al. 2023 ListMLE over aggregated token rewards (arXiv 2306.00398);
- ranked reward-model training on RM scalars.

Conventions shared by every function here:
- ``scores`` ``[B, K]``; ``candidate_mask`` ``[B, K]`` bool marks real candidates of ragged lists.
  Masked candidates are removed from every log-sum-exp and get exactly zero gradient, even when their
  score is inf/NaN.
- ``order`` ``[B, K]`` long: candidate storage indices best-first; ``-1`` marks the end of the ranked
  prefix. Valid candidates that never appear in ``order`` are "the rest": tied below every ranked one,
  present in every denominator but never ranked among themselves. ``order=None`` means the valid
  candidates are already stored best-first (a full ranking).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import LossOutput, detach_metrics, masked_mean, masked_sum, reduce_loss, upcast

__all__ = [
    "plackett_luce",
    "pairwise_expand",
    "pairwise_from_ranking",
    "aggregate_token_values",
    "listmle",
]

_PAIR_MODES = ("adjacent", "all", "best_vs_rest")
_AGG_MODES = ("mean", "mean_list_len", "softmax", "softmin", "sum")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and value == value and value != float("inf")):
        raise ValueError(f"{name}={value!r} must be a finite number > 0")


def _candidate_mask(scores: Tensor, candidate_mask: Tensor | None) -> Tensor:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, K]; got shape {tuple(scores.shape)}")
    if candidate_mask is None:
        return torch.ones_like(scores, dtype=torch.bool)
    if tuple(candidate_mask.shape) != tuple(scores.shape):
        raise ValueError(
            f"candidate_mask shape {tuple(candidate_mask.shape)} must equal scores shape "
            f"{tuple(scores.shape)}"
        )
    return candidate_mask.to(scores.device).bool()


def _resolve_order(order: Tensor | None, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Validate ``order`` and return ``(order, rank_of, n_ranked)``.

    ``rank_of[b, c]`` is the position of candidate ``c`` in the ranking; unranked valid candidates share
    level ``n_ranked[b]`` (the tie just below the ranked prefix); invalid candidates get ``K + 1``.
    """
    b, k = valid.shape
    device = valid.device
    if order is None:
        # Valid candidates keep their storage order (stable sort puts them first); the rest become -1.
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        n_valid = valid.sum(1, keepdim=True)
        order = torch.where(torch.arange(k, device=device) < n_valid, order, torch.full_like(order, -1))
    else:
        if tuple(order.shape) != (b, k):
            raise ValueError(f"order shape {tuple(order.shape)} must equal scores shape {(b, k)}")
        if order.is_floating_point() or order.dtype == torch.bool:
            raise ValueError(f"order must be an integer tensor of candidate indices; got dtype {order.dtype}")
        order = order.to(device=device, dtype=torch.long)
        if bool(((order < -1) | (order >= k)).any()):
            raise ValueError(f"order entries must lie in [-1, {k - 1}] (-1 = unranked); got {order.tolist()}")
        ranked = order >= 0
        if bool((ranked[:, 1:] & ~ranked[:, :-1]).any()):
            raise ValueError("order must be a ranked prefix then only -1 entries; found an index after -1")
        counts = torch.zeros(b, k + 1, dtype=torch.long, device=device)
        counts.scatter_add_(1, torch.where(ranked, order, k), torch.ones_like(order))
        if bool((counts[:, :k] > 1).any()):
            raise ValueError(f"order repeats a candidate index within a row: {order.tolist()}")
        if bool((ranked & ~valid.gather(1, order.clamp_min(0))).any()):
            raise ValueError("order ranks a candidate that candidate_mask marks as padding")
    ranked = order >= 0
    n_ranked = ranked.sum(1)
    rank_of = torch.full((b, k + 1), k + 1, dtype=torch.long, device=device)
    positions = torch.arange(k, device=device).expand(b, k)
    rank_of.scatter_(1, torch.where(ranked, order, k), torch.where(ranked, positions, k + 1))
    rank_of = rank_of[:, :k]
    rank_of = torch.where(valid & (rank_of > k), n_ranked[:, None].expand(b, k), rank_of)
    return order, rank_of, n_ranked


def _pl_per_example(s: Tensor, valid: Tensor, order: Tensor, rank_of: Tensor, n_stages: Tensor) -> Tensor:
    """Σ_k [logsumexp_{j remaining at stage k} s_j − s_{τ(k)}] over the active stages of each row."""
    b, k = s.shape
    stage = torch.arange(k, device=s.device)
    active = stage[None, :] < n_stages[:, None]  # [B, S]
    remaining = valid[:, None, :] & (rank_of[:, None, :] >= stage[None, :, None])  # [B, S, K]
    # Inactive stages may have empty sets; give them every (sanitised) entry so the logsumexp stays finite
    # and its (discarded) gradient is not NaN.
    use = remaining | ~active[:, :, None]
    neg_inf = torch.full((), float("-inf"), dtype=s.dtype, device=s.device)
    lse = torch.logsumexp(torch.where(use, s[:, None, :], neg_inf), dim=-1)  # [B, S]
    numer = s.gather(1, order.clamp_min(0))
    return torch.where(active, lse - numer, torch.zeros((), dtype=s.dtype, device=s.device)).sum(1)


def _top_metrics(s: Tensor, valid: Tensor, order: Tensor, n_ranked: Tensor) -> dict[str, Tensor]:
    """Best-ranked candidate vs the others: accuracy = it has the strictly highest score."""
    n_valid = valid.sum(1)
    rows = (n_ranked >= 1) & (n_valid >= 2)
    top = order[:, :1].clamp_min(0)
    chosen = s.gather(1, top).squeeze(1)
    is_top = torch.zeros_like(valid).scatter_(1, top, True)
    others = valid & ~is_top
    rejected = masked_sum(s, others, 1) / others.sum(1).clamp_min(1)
    best_other = torch.where(others, s, torch.full((), float("-inf"), dtype=s.dtype, device=s.device)).amax(1)
    acc = (chosen > best_other).to(s.dtype)
    return {
        "rewards/chosen": masked_mean(chosen, rows, 0),
        "rewards/rejected": masked_mean(rejected, rows, 0),
        "rewards/margins": masked_mean(chosen - rejected, rows, 0),
        "rewards/accuracies": masked_mean(acc, rows, 0),
    }


def plackett_luce(
    scores: Tensor,
    order: Tensor | None = None,
    *,
    candidate_mask: Tensor | None = None,
    top_k: int | None = None,
    beta: float = 1.0,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Plackett–Luce negative log-likelihood of a (possibly partial) ranking.

    With s = ``beta · scores`` and τ the ranking (τ(1) best)::

        L = Σ_{k=1}^{K_s} [ log Σ_{j ≥ k, valid} exp s_{τ(j)} − s_{τ(k)} ]

    where "j ≥ k" ranges over the candidates not yet placed (ranked ones after position k plus every
    unranked valid one) and K_s = min(#ranked, #valid − 1, top_k) stages. ``top_k=None`` is the full
    ranking (log K! at equal scores), ``top_k=1`` the choice / InfoNCE "best vs rest" form (log K at
    equal scores); K = 2 is sigmoid DPO, −log σ(s_0 − s_1).

    Sources: DPO paper appendix (PL generalisation, arXiv 2305.18290); Feng et al. 2025 (arXiv
    2502.16433) whose published equation lacks the leading minus sign, restored here.

    ``scores`` are used as given times ``beta`` (default 1): pass log-ratios with ``beta=β`` for PL-DPO,
    or pre-scaled rewards / RM scalars with ``beta=1``. Rows with no ranking or fewer than two valid
    candidates contribute 0. Metrics (over rows with ≥ 2 valid candidates and a ranked top):
    ``rewards/chosen`` = s of the top-ranked candidate, ``rewards/rejected`` = mean s of the other valid
    ones, ``rewards/margins``, ``rewards/accuracies`` = top-ranked has the strictly highest s.
    """
    _check_positive("beta", beta)
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be None (full ranking) or an int >= 1")
    scores = upcast(scores)
    valid = _candidate_mask(scores, candidate_mask)
    order, rank_of, n_ranked = _resolve_order(order, valid)
    s = torch.where(valid, scores * beta, torch.zeros((), dtype=scores.dtype, device=scores.device))
    n_stages = torch.minimum(n_ranked, (valid.sum(1) - 1).clamp_min(0))
    if top_k is not None:
        n_stages = n_stages.clamp_max(top_k)
    per_example = _pl_per_example(s, valid, order, rank_of, n_stages)
    metrics = _top_metrics(s.detach(), valid, order, n_ranked)
    metrics["loss/plackett_luce"] = per_example
    loss = reduce_loss(per_example, sample_weight, reduction)
    return LossOutput(loss, per_example, detach_metrics(metrics))


def pairwise_expand(
    order: Tensor | None = None,
    *,
    candidate_mask: Tensor | None = None,
    num_candidates: int | None = None,
    mode: str = "all",
) -> tuple[Tensor, Tensor, Tensor]:
    """Expand rankings into (winner_idx, loser_idx, example_idx) index tensors of equal length P.

    ``mode``:
    - ``"all"``: every ordered pair with a strict rank difference; a full ranking of K gives C(K,2)
      pairs (InstructGPT reward-model style; AMP/MDPO cross-level pairs);
    - ``"adjacent"``: consecutive ranks, plus the last ranked candidate against each unranked one;
    - ``"best_vs_rest"``: the top-ranked candidate against every other valid one.
    Unranked valid candidates are tied with each other, so they never form a pair among themselves.
    Pairs are listed by example, then by winner and loser storage index.

    With ``order=None`` give ``candidate_mask`` or ``num_candidates`` (the list is stored best-first).
    """
    if mode not in _PAIR_MODES:
        raise ValueError(f"mode={mode!r} is not one of {sorted(_PAIR_MODES)}")
    if order is not None:
        shape = tuple(order.shape)
        device = order.device
    elif candidate_mask is not None:
        shape = tuple(candidate_mask.shape)
        device = candidate_mask.device
    elif num_candidates is not None:
        shape, device = (1, int(num_candidates)), torch.device("cpu")
    else:
        raise ValueError("pairwise_expand needs order, candidate_mask or num_candidates")
    if len(shape) != 2:
        raise ValueError(f"order / candidate_mask must be [B, K]; got shape {shape}")
    valid = torch.ones(shape, dtype=torch.bool, device=device)
    if candidate_mask is not None:
        if tuple(candidate_mask.shape) != shape:
            raise ValueError(f"candidate_mask shape {tuple(candidate_mask.shape)} must equal {shape}")
        valid = candidate_mask.to(device).bool()
    _, rank_of, _ = _resolve_order(order, valid)
    ri, rj = rank_of[:, :, None], rank_of[:, None, :]
    pairs = valid[:, :, None] & valid[:, None, :] & (ri < rj)
    if mode == "adjacent":
        pairs &= rj == ri + 1
    elif mode == "best_vs_rest":
        pairs &= ri == 0
    example_idx, winner_idx, loser_idx = pairs.nonzero(as_tuple=True)
    return winner_idx, loser_idx, example_idx


def pairwise_from_ranking(
    scores: Tensor,
    order: Tensor | None = None,
    *,
    candidate_mask: Tensor | None = None,
    mode: str = "all",
    beta: float = 1.0,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Logistic pairwise loss over the pairs of a ranking, averaged per example.

    per_example[b] = mean over the pairs (w, l) of example b of −log σ(β·(s_w − s_l)); pairs come from
    :func:`pairwise_expand` with ``mode``. This is the InstructGPT reward-model baseline (arXiv
    2203.02155 §3.5, "all" pairs of K ranked outputs, each example weighted equally). Examples with
    no pairs contribute 0. With K = 2 it equals sigmoid DPO and :func:`plackett_luce`. Metrics are
    averaged over pairs.
    """
    _check_positive("beta", beta)
    scores = upcast(scores)
    valid = _candidate_mask(scores, candidate_mask)
    s = torch.where(valid, scores * beta, torch.zeros((), dtype=scores.dtype, device=scores.device))
    winner, loser, example = pairwise_expand(order, candidate_mask=valid, mode=mode)
    s_w, s_l = s[example, winner], s[example, loser]
    pair_loss = F.softplus(s_l - s_w)  # = −log σ(s_w − s_l), finite at |Δ| = 1e4
    b = scores.shape[0]
    total = torch.zeros(b, dtype=s.dtype, device=s.device).index_add(0, example, pair_loss)
    count = torch.zeros(b, dtype=s.dtype, device=s.device).index_add(0, example, torch.ones_like(pair_loss))
    per_example = total / count.clamp_min(1)
    sw, sl = s_w.detach(), s_l.detach()
    metrics = {
        "rewards/chosen": sw,
        "rewards/rejected": sl,
        "rewards/margins": sw - sl,
        "rewards/accuracies": (sw > sl).to(s.dtype),
        "loss/pairwise": per_example,
    }
    loss = reduce_loss(per_example, sample_weight, reduction)
    return LossOutput(loss, per_example, detach_metrics(metrics))


def aggregate_token_values(
    values: Tensor,
    mask: Tensor,
    *,
    mode: str = "mean_list_len",
    temperature: float = 2.0,
    candidate_mask: Tensor | None = None,
) -> Tensor:
    """Aggregate token values ``[B, K, T]`` into sequence scores ``[B, K]`` (Yang et al. 2023 §3.1).

    ``mode``: ``"sum"`` masked sum; ``"mean"`` masked mean; ``"mean_list_len"`` masked mean × the list's
    average length (mean valid-token count of the valid candidates of the same example: a common
    scale across the K candidates that does not reward length itself); ``"softmax"`` T·logsumexp(r/T)
    × list-average length; ``"softmin"`` −T·logsumexp(−r/T) × list-average length (T = ``temperature``,
    2 in the reference). Reference code: ``Shentao-YANG/Preference_Grounded_Guidance`` (``agg_func`` avg
    / sum / max / min). Deviations: candidates with no valid token (or masked by ``candidate_mask``)
    get 0 instead of NaN/±inf and are left out of the list-average length.
    """
    if mode not in _AGG_MODES:
        raise ValueError(f"mode={mode!r} is not one of {sorted(_AGG_MODES)}")
    _check_positive("temperature", temperature)
    values = upcast(values)
    if values.dim() != 3:
        raise ValueError(f"values must be [B, K, T]; got shape {tuple(values.shape)}")
    if tuple(mask.shape) != tuple(values.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal values shape {tuple(values.shape)}")
    mask = mask.to(values.device).bool()
    lengths = mask.sum(-1)
    has_tokens = lengths > 0
    cand = has_tokens if candidate_mask is None else has_tokens & candidate_mask.to(values.device).bool()
    if mode == "sum":
        out = masked_sum(values, mask, -1)
    elif mode == "mean" or mode == "mean_list_len":
        out = masked_mean(values, mask, -1)
    else:
        sign = 1.0 if mode == "softmax" else -1.0
        neg_inf = torch.full((), float("-inf"), dtype=values.dtype, device=values.device)
        inner = torch.where(mask, sign * values / temperature, neg_inf)
        # Empty rows would be logsumexp(-inf...) = -inf; feed them zeros and overwrite below.
        inner = torch.where(has_tokens[..., None], inner, torch.zeros_like(inner))
        out = sign * temperature * torch.logsumexp(inner, dim=-1)
    if mode in ("mean_list_len", "softmax", "softmin"):
        list_len = masked_mean(lengths.to(values.dtype), cand, -1)
        out = out * list_len[:, None]
    return torch.where(cand, out, torch.zeros((), dtype=out.dtype, device=out.device))


def listmle(
    pred_scores: Tensor,
    true_scores: Tensor,
    *,
    candidate_mask: Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """ListMLE: Plackett–Luce NLL of the order of ``true_scores`` under ``pred_scores / temperature``.

    L = Σ_k [ log Σ_{j ≥ k} exp(e_{π(j)}/t) − e_{π(k)}/t ], π sorting ``true_scores`` descending (Xia et
    al. 2008; used by Yang et al. 2023, arXiv 2306.00398, on aggregated token rewards, see
    :func:`aggregate_token_values`). Ties in ``true_scores`` are broken by a random permutation drawn
    from ``generator``; with ``generator=None`` ties keep storage order (deterministic). Deviations from
    the reference ``listMLELoss``: its unseeded ``torch.randperm`` is replaced by the explicit generator,
    and its ``log(Σ exp + 1e-10)`` by an exact logsumexp (so equal scores give exactly log K!).
    """
    _check_positive("temperature", temperature)
    pred_scores, true_scores = upcast(pred_scores), upcast(true_scores)
    valid = _candidate_mask(pred_scores, candidate_mask)
    if tuple(true_scores.shape) != tuple(pred_scores.shape):
        raise ValueError(
            f"true_scores shape {tuple(true_scores.shape)} must equal pred_scores shape "
            f"{tuple(pred_scores.shape)}"
        )
    with torch.no_grad():
        b, k = true_scores.shape
        if generator is not None:
            keys = torch.rand(b, k, generator=generator, device=generator.device).to(true_scores.device)
            perm = torch.argsort(keys, dim=1)
        else:
            perm = torch.arange(k, device=true_scores.device).expand(b, k)
        t = true_scores.to(pred_scores.device).gather(1, perm)
        by_score = torch.argsort(t, dim=1, descending=True, stable=True)
        perm = perm.gather(1, by_score)
        # Stable second sort: valid candidates first, their score order preserved.
        perm = perm.gather(1, torch.argsort((~valid.gather(1, perm)).to(torch.int8), dim=1, stable=True))
        n_valid = valid.sum(1, keepdim=True)
        order = torch.where(torch.arange(k, device=perm.device) < n_valid, perm, torch.full_like(perm, -1))
    out = plackett_luce(
        pred_scores / temperature,
        order,
        candidate_mask=valid,
        sample_weight=sample_weight,
        reduction=reduction,
    )
    out.metrics["loss/listmle"] = out.metrics.pop("loss/plackett_luce")
    return out
