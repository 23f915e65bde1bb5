"""Regulariser and bonus terms, and the weighted composition of loss terms.

Each term is a :class:`LossOutput` like every other loss, so that RPO (DPO + NLL), CPO/ORPO (+ NLL),
NPO + retain terms, XPO (online DPO + likelihood bonus) and Yang et al.'s entropy term are all
``combine({...})`` of independent pieces (research/llm_losses.md §9.1 item 5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ._base import LossOutput, check_same_shape, detach_metrics, masked_mean, masked_sum, reduce_loss, upcast

__all__ = ["nll", "kl_to_ref", "KL_ESTIMATORS", "xpo_bonus", "entropy_bonus", "combine"]

# exp(80) stays finite in float32; same bound as pairwise.py.
_EXP_CLAMP = 80.0
_TOKEN_REDUCTIONS = ("mean", "sum")


def _token_inputs(values: Tensor, mask: Tensor | None, name: str) -> tuple[Tensor, Tensor]:
    v = upcast(values)
    if v.dim() != 2:
        raise ValueError(f"{name} must be [B, T] per-token values; got shape {tuple(v.shape)}")
    m = torch.ones_like(v, dtype=torch.bool) if mask is None else mask.to(v.device).bool()
    check_same_shape(**{name: v, "mask": m})
    return v, m


def _check_token_reduction(reduction_over_tokens: str) -> None:
    if reduction_over_tokens not in _TOKEN_REDUCTIONS:
        raise ValueError(
            f"reduction_over_tokens={reduction_over_tokens!r} is not one of {list(_TOKEN_REDUCTIONS)}"
        )


def nll(
    token_logps: Tensor,
    mask: Tensor | None = None,
    *,
    reduction_over_tokens: str = "mean",
    token_level_mean: bool = False,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Negative log-likelihood of target tokens (SFT term of RPO, CPO, ORPO; NPO's retain loss).

    ``token_logps`` are the log-probs of the target tokens, ``[B, T]`` with a completion ``mask``, or
    ``[B]`` sequence log-probs (then ``per_example = −token_logps`` and no mask or token options apply).

    - default, per-sequence token mean: ``per_example_i = −Σ_t m_it·logp_it / n_i`` (``n_i`` = tokens of
      sequence i), then the (weighted) mean over sequences: every sequence counts the same however long.
    - ``reduction_over_tokens="sum"``: ``per_example_i = −Σ_t m_it·logp_it`` (NPO's forget-side sums).
    - ``token_level_mean=True``: one mean over all tokens of the batch, ``−Σ_it m·logp / Σ_it m``, which is
      HF ``CrossEntropyLoss`` on the flattened batch (``ignore_index`` padding) and TRL's DPO ``"sft"``
      loss type; long sequences weigh more. ``per_example_i = −Σ_t m_it·logp_it / n̄`` with ``n̄`` the
      (``sample_weight``-weighted) mean length, so the default mean reduction of ``per_example`` is exactly
      that token mean (TRL broadcasts the batch scalar instead, which carries no per-example signal).

    Masked positions contribute exactly 0 and a fully masked row gives 0.
    """
    lp = upcast(token_logps)
    _check_token_reduction(reduction_over_tokens)
    if lp.dim() == 1:
        if mask is not None or token_level_mean:
            raise ValueError("[B] sequence log-probs take no mask and no token_level_mean; pass [B, T]")
        per_example = -lp
        metrics = detach_metrics({"nll/sequence": per_example})
        return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)

    lp, m = _token_inputs(lp, mask, "token_logps")
    total = -masked_sum(lp, m)
    count = m.sum(-1).to(lp.dtype)
    if token_level_mean:
        if sample_weight is None:
            mean_len = count.mean()
        else:
            w = upcast(sample_weight).to(lp)
            check_same_shape(per_example=count, sample_weight=w)
            mean_len = (w * count).sum() / w.sum().clamp_min(torch.finfo(lp.dtype).tiny)
        per_example = total / mean_len.clamp_min(1.0)
    elif reduction_over_tokens == "mean":
        per_example = total / count.clamp_min(1.0)
    else:
        per_example = total
    token_mean = total.sum() / count.sum().clamp_min(1.0)
    metrics = detach_metrics({"nll/token_mean": token_mean, "nll/num_tokens": count.sum()})
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)


def _k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


def _k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio**2


def _k3(log_ratio: Tensor) -> Tensor:
    # (ρ − 1) − log ρ with ρ = π_ref/π = exp(−log_ratio); expm1 keeps precision near 0, the clamp keeps
    # exp finite where the policy puts almost no mass on a sampled token.
    return torch.expm1(torch.clamp(-log_ratio, max=_EXP_CLAMP)) + log_ratio


KL_ESTIMATORS = {"k1": _k1, "k2": _k2, "k3": _k3, "full": None}


def kl_to_ref(
    policy_token_logps: Tensor | None,
    ref_token_logps: Tensor | None,
    mask: Tensor | None = None,
    *,
    estimator: str = "k3",
    token_kl: Tensor | None = None,
    reduction_over_tokens: str = "mean",
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Per-token KL(π ‖ π_ref) penalty, averaged (or summed) over each sequence's masked tokens.

    From the log-probs of tokens sampled from π, with ``x = log π − log π_ref`` (Schulman, "Approximating
    KL divergence", 2020)::

        k1 = x                     unbiased, can be negative, high variance
        k2 = x² / 2                biased, low variance, ≥ 0
        k3 = (e^{−x} − 1) + x      unbiased, ≥ 0 (TRL GRPO's ``per_token_kl``, with the sign of x flipped
                                   by its ref − policy convention)

    ``estimator="full"`` passes ``token_kl`` (``[B, T]`` exact full-vocabulary KL per position, computed by
    the adapter, as TDPO / NPO-KL need) through the same masking and reduction; the log-prob arguments may
    then be ``None``.

    As a loss on on-policy samples the gradients differ (derivation, in expectation over y ~ π): ``k1``'s is
    E[∇log π] = 0, ``k2``'s is the gradient of KL(π‖π_ref), ``k3``'s is the gradient of KL(π_ref‖π).
    ``e^{−x}`` is clamped at e^80 so values and gradients stay finite for |x| up to 1e4 (deviation from TRL,
    which does not clamp). Masked positions contribute exactly 0; fully masked rows give 0.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not one of {sorted(KL_ESTIMATORS)}")
    _check_token_reduction(reduction_over_tokens)
    if estimator == "full":
        if token_kl is None:
            raise ValueError("estimator='full' needs token_kl ([B, T] full-vocabulary KL per position)")
        per_token, m = _token_inputs(token_kl, mask, "token_kl")
    else:
        if token_kl is not None:
            raise ValueError(f"token_kl is only used with estimator='full'; got estimator={estimator!r}")
        if policy_token_logps is None or ref_token_logps is None:
            raise ValueError(f"estimator={estimator!r} needs policy_token_logps and ref_token_logps")
        lp, m = _token_inputs(policy_token_logps, mask, "policy_token_logps")
        ref = upcast(ref_token_logps).to(lp)
        check_same_shape(policy_token_logps=lp, ref_token_logps=ref)
        # Padding may hold −inf log-probs; zero them before the estimator so no inf − inf is formed.
        zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
        log_ratio = torch.where(m, lp - torch.where(m, ref, zero), zero)
        per_token = KL_ESTIMATORS[estimator](log_ratio)
    if reduction_over_tokens == "mean":
        per_example = masked_mean(per_token, m)
    else:
        per_example = masked_sum(per_token, m)
    count = m.sum().to(per_token.dtype).clamp_min(1.0)
    metrics = detach_metrics({f"kl/{estimator}": masked_sum(per_token, m).sum() / count})
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)


def xpo_bonus(
    policy_logps_of_ref_samples: Tensor,
    *,
    alpha: float,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """XPO's exploration term ``α · L_θ(ỹ)`` (Xie et al., arXiv 2405.21046; TRL ``XPOTrainer``).

    ``L_θ(ỹ)`` is the policy's summed (unnormalised, as TRL) log-prob of a sample ỹ drawn from the
    *reference*, whether ỹ won or lost the judgement. Minimising it lowers the policy's likelihood of typical
    reference outputs, pushing mass outside the reference's support. XPO = online DPO + this term:
    ``combine({"dpo": (1.0, dpo(...)), "xpo": (1.0, xpo_bonus(L, alpha=α))})``; TRL's default α is 1e-5
    (a per-epoch list in TRL; schedule it in the recipe).
    """
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha={alpha} must be a finite number >= 0")
    lp = upcast(policy_logps_of_ref_samples)
    if lp.dim() != 1:
        raise ValueError(f"policy_logps_of_ref_samples must be [B] sequence log-probs; got {tuple(lp.shape)}")
    per_example = alpha * lp
    metrics = detach_metrics({"xpo/ref_sample_logps": lp})
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)


def entropy_bonus(
    token_entropy: Tensor,
    mask: Tensor | None = None,
    *,
    coef: float,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Maximum-entropy term ``−coef · mean_t H_t`` (Yang et al., arXiv 2306.00398; ``max_entropy_coeff``).

    ``token_entropy`` is the ``[B, T]`` entropy of the policy's next-token distribution at each position
    (computed by the adapter over the vocabulary). Minimising the term raises the entropy. The reference
    code subtracts ``0.125 ×`` the mean entropy in its prompt-generation task and disables it elsewhere.
    """
    if not (coef >= 0 and math.isfinite(coef)):
        raise ValueError(f"coef={coef} must be a finite number >= 0")
    h, m = _token_inputs(token_entropy, mask, "token_entropy")
    mean_h = masked_mean(h, m)
    per_example = -coef * mean_h
    metrics = detach_metrics({"entropy/mean": mean_h})
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)


Terms = Mapping[str, tuple[float, LossOutput]] | Sequence[tuple[str, float, LossOutput]]


def combine(terms: Terms) -> LossOutput:
    """Weighted sum of loss terms: ``loss = Σ_k w_k · loss_k``, ``per_example = Σ_k w_k · per_example_k``.

    ``terms`` is ``{name: (weight, LossOutput)}`` or ``[(name, weight, LossOutput), ...]``. Each term keeps
    its own reduction and ``sample_weight``, so the total is the weighted sum of the reduced term losses
    (not a re-reduction of the summed ``per_example``). ``per_example`` shapes must agree; a term whose
    ``per_example`` has one element (a batch-level scalar) is broadcast to the others' ``[B]``.

    A weight of 0 keeps the term's metrics but leaves it out of the sums, so it contributes no gradient
    (not even NaN from a non-finite term). Metrics: every term metric as ``<name>/<key>``, ``loss/<name>``
    (the unweighted term loss) and ``loss/total``.
    """
    items = [(k, *v) for k, v in terms.items()] if isinstance(terms, Mapping) else [tuple(t) for t in terms]
    if not items:
        raise ValueError("combine needs at least one (name, weight, LossOutput) term")
    names = [t[0] for t in items]
    errors = []
    if len(set(names)) != len(names):
        errors.append(f"term names must be unique; got {names}")
    for item in items:
        if len(item) != 3:
            errors.append(f"each term must be (name, weight, LossOutput); got {item!r}")
            continue
        name, weight, out = item
        if not isinstance(name, str) or not name or name == "total":
            errors.append(f"term name {name!r} must be a non-empty string other than 'total'")
        if not isinstance(out, LossOutput):
            errors.append(f"term {name!r} must be a LossOutput; got {type(out).__name__}")
        if not math.isfinite(float(weight)):
            errors.append(f"term {name!r} has non-finite weight {weight}")
    if errors:
        raise ValueError("invalid combine terms:\n  - " + "\n  - ".join(errors))

    shapes = {tuple(out.per_example.shape) for _, _, out in items if out.per_example.numel() != 1}
    if len(shapes) > 1:
        desc = ", ".join(f"{n}={tuple(o.per_example.shape)}" for n, _, o in items)
        raise ValueError(f"per_example shapes differ: {desc}; terms must share [B] (or be scalar)")
    shape = shapes.pop() if shapes else tuple(items[0][2].per_example.shape)

    ref = items[0][2].loss
    loss = torch.zeros((), dtype=ref.dtype, device=ref.device)
    per_example = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    metrics: dict[str, Tensor] = {}
    for name, weight, out in items:
        weight = float(weight)
        if weight != 0.0:
            loss = loss + weight * out.loss
            term = out.per_example
            if term.numel() == 1:
                term = term.reshape(()).expand(shape)
            per_example = per_example + weight * term
        for key, value in out.metrics.items():
            metrics[f"{name}/{key}"] = value
        metrics[f"loss/{name}"] = out.loss
    metrics["loss/total"] = loss
    return LossOutput(loss, per_example, detach_metrics(metrics))
