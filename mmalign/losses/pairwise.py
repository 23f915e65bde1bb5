"""Pairwise log-ratio losses: the DPO family with TRL 1.x ``loss_type`` names and numerics.

Inputs are per-candidate *sequence scores*: summed completion log-probs for autoregressive models, or
negated per-sample denoising errors for diffusion/flow models (see :mod:`mmalign.losses.diffusion`).
Nothing here assumes that chosen and rejected share a prompt or that the reference saw the same context
(JPO, MAPL, LongPO need exactly that freedom); a pair is just two scored candidates.

Parity: for the same inputs, every ``loss_type`` and ``f_divergence`` below gives the per-example values
of TRL 1.16 ``DPOTrainer._compute_loss`` (checked in float64 by ``tests/losses/test_pairwise.py``), with
these deliberate differences, all of which are no-ops on TRL's own domain:

- ``label_smoothing`` on ``sigmoid`` gives conservative DPO (cDPO, Mitchell 2023), which TRL 1.x dropped
  (it ignores the value); ``soft_target`` generalises it to a per-pair preference probability.
- exponentials (forward-KL and alpha-divergence transforms, DiscoPOP) are clamped so that values and
  gradients stay finite at ``|logit| = 1e4``, where TRL yields ``inf``/``NaN``; TRL clamps only the alpha
  divergence, and only for fp16/bf16/fp32 inputs (its lookup fails on float64).
- ``ref_*_logps=None`` means a zero reference (reference-free use of the same link functions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import LossOutput, check_same_shape, detach_metrics, pair_metrics, reduce_loss, upcast

__all__ = ["dpo", "DPO_LOSS_TYPES", "F_DIVERGENCES", "ld_logps"]

# exp(40) ≈ 2.4e17: even squared (IPO, SPPO) it stays finite in float32. TRL clamps its alpha divergence at
# 80, so the two agree wherever |(α−1)·r| < 40, i.e. far beyond any realistic log-ratio.
_EXP_CLAMP = 40.0


@dataclass
class _Pair:
    """Everything a pairwise link function may need, already upcast."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_logratios: Tensor
    rejected_logratios: Tensor
    chosen_scores: Tensor  # f-divergence transform of the log-ratios
    rejected_scores: Tensor
    beta: float
    label_smoothing: float
    soft_target: Tensor | None
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None
    discopop_tau: float

    @property
    def delta(self) -> Tensor:
        return self.chosen_scores - self.rejected_scores


def _smoothed_logistic(z: Tensor, eps: float | Tensor) -> Tensor:
    """−(1−ε)·logσ(z) − ε·logσ(−z): the logistic loss against a soft label 1−ε."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _sigmoid(p: _Pair) -> Tensor:
    # DPO, arXiv 2305.18290 Eq. 7; cDPO (label smoothing) and soft targets are the same expression.
    z = p.beta * p.delta
    if p.soft_target is not None:
        return _smoothed_logistic(z, 1 - p.soft_target)
    return _smoothed_logistic(z, p.label_smoothing)


def _hinge(p: _Pair) -> Tensor:
    # SLiC/RSO hinge on reference log-ratios (arXiv 2309.06657 Eq. 7): the margin is 1/β.
    return torch.relu(1 - p.beta * p.delta)


def _lengths(p: _Pair, name: str) -> tuple[Tensor, Tensor]:
    if p.chosen_lengths is None or p.rejected_lengths is None:
        raise ValueError(
            f"loss_type={name!r} normalises by completion length: pass chosen_lengths and rejected_lengths "
            "(number of completion tokens of each sequence)"
        )
    return p.chosen_lengths.clamp(min=1.0), p.rejected_lengths.clamp(min=1.0)


def _ipo(p: _Pair) -> Tensor:
    # IPO, arXiv 2310.12036 Eq. 17 with β in the role of τ. Like TRL, the sequence scores are averaged per
    # token (TRL notes the IPO authors confirmed this normalisation, which the paper does not state).
    nw, nl = _lengths(p, "ipo")
    return (p.chosen_scores / nw - p.rejected_scores / nl - 1 / (2 * p.beta)) ** 2


def _exo_pair(p: _Pair) -> Tensor:
    # EXO, arXiv 2402.00856 Eq. 16: KL(model's two-way softmax ‖ [1−ε, ε]).
    z = p.beta * p.delta
    eps = torch.tensor(p.label_smoothing, dtype=z.dtype, device=z.device)
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
    return log_qw.exp() * (log_qw - torch.log1p(-eps)) + log_ql.exp() * (log_ql - torch.log(eps))


def _nca_pair(p: _Pair) -> Tensor:
    # NCA, arXiv 2402.05369 Eq. 12: absolute per-response likelihood (raw log-ratios, as TRL).
    rw, rl = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


def _robust(p: _Pair) -> Tensor:
    # rDPO, arXiv 2403.00409 Eq. 8: unbiased under label-flip rate ε ∈ [0, 0.5).
    z, eps = p.beta * p.delta, p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(p: _Pair) -> Tensor:
    # BCO, arXiv 2404.04656, paired form without the running-mean shift (as TRL 1.x).
    return -F.logsigmoid(p.beta * p.chosen_logratios) - F.logsigmoid(-p.beta * p.rejected_logratios)


def _sppo_hard(p: _Pair) -> Tensor:
    # SPPO, arXiv 2405.00675 Eq. 4.7 with hard probabilities (winner 1, loser 0).
    return (p.chosen_logratios - 0.5 / p.beta) ** 2 + (p.rejected_logratios + 0.5 / p.beta) ** 2


def _aot(p: _Pair) -> Tensor:
    # AOT, arXiv 2406.05882: match sorted quantiles across the batch. per_example[i] is the i-th quantile,
    # not example i; the batch is the distribution, so use large batches.
    policy = torch.sort(p.chosen_logps - p.rejected_logps, dim=0).values
    ref = torch.sort(p.ref_chosen_logps - p.ref_rejected_logps, dim=0).values
    return _smoothed_logistic(p.beta * (policy - ref), p.label_smoothing)


def _aot_unpaired(p: _Pair) -> Tensor:
    chosen = torch.sort(p.chosen_logratios, dim=0).values
    rejected = torch.sort(p.rejected_logratios, dim=0).values
    return _smoothed_logistic(p.beta * (chosen - rejected), p.label_smoothing)


def _apo_zero(p: _Pair) -> Tensor:
    # APO-zero, arXiv 2408.06266 Eq. 7: raise chosen, lower rejected (anchored to the reference).
    return (1 - torch.sigmoid(p.beta * p.chosen_logratios)) + torch.sigmoid(p.beta * p.rejected_logratios)


def _apo_down(p: _Pair) -> Tensor:
    # APO-down, arXiv 2408.06266 Eq. 8: lower both, the rejected more.
    margin = p.chosen_logratios - p.rejected_logratios
    return torch.sigmoid(p.beta * p.chosen_logratios) + (1 - torch.sigmoid(p.beta * margin))


def _discopop(p: _Pair) -> Tensor:
    # DiscoPOP, arXiv 2406.08414 Eq. 5: a log-ratio-modulated blend of the logistic and exponential losses.
    # m·exp(−z) is computed as exp(logσ(z/τ) − z) so that 0·inf never appears at extreme z.
    z = p.beta * p.delta
    log_m = F.logsigmoid(z / p.discopop_tau)
    exp_term = torch.exp(torch.clamp(log_m - z, max=_EXP_CLAMP))
    return -F.logsigmoid(z) * (1 - log_m.exp()) + exp_term


def _sigmoid_norm(p: _Pair) -> Tensor:
    # Length-normalised DPO (TRL's name): DPO on per-token average scores, reference kept, no margin.
    nw, nl = _lengths(p, "sigmoid_norm")
    z = p.beta * (p.chosen_scores / nw - p.rejected_scores / nl)
    if p.soft_target is not None:
        return _smoothed_logistic(z, 1 - p.soft_target)
    return -F.logsigmoid(z)


DPO_LOSS_TYPES: dict[str, Callable[[_Pair], Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sigmoid_norm": _sigmoid_norm,
}

# TRL refuses f-divergences for the loss types whose formula uses the raw log-ratios.
_F_DIVERGENCE_LOSS_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"}


def _reverse_kl(r: Tensor, alpha: float) -> Tensor:
    return r


def _forward_kl(r: Tensor, alpha: float) -> Tensor:
    # f'(t) = 1 − 1/t with t = π/π_ref = exp(r)
    return 1 - torch.exp(torch.clamp(-r, max=_EXP_CLAMP))


def _js_divergence(r: Tensor, alpha: float) -> Tensor:
    # f'(t) = log(2t/(t+1)) = log 2 + logσ(log t)
    return math.log(2) + F.logsigmoid(r)


def _alpha_divergence(r: Tensor, alpha: float) -> Tensor:
    # f'(t) = (t^(α−1) − 1)/(α−1); α → 1 is the reverse-KL limit, which TRL special-cases the same way.
    if abs(alpha - 1.0) < 1e-6:
        return r
    return (torch.exp(torch.clamp((alpha - 1.0) * r, max=_EXP_CLAMP)) - 1.0) / (alpha - 1.0)


# Score transforms g(r) of "Beyond Reverse KL" (f-DPO, arXiv 2309.16240 Table 1 / Eq. 12).
F_DIVERGENCES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": _reverse_kl,
    "forward_kl": _forward_kl,
    "js_divergence": _js_divergence,
    "alpha_divergence": _alpha_divergence,
}


def _validate(loss_types: Sequence[str], weights: Sequence[float], f_divergence: str, beta: float,
              label_smoothing: float, soft_target: Tensor | None, discopop_tau: float) -> None:
    errors = []
    for lt in loss_types:
        if lt not in DPO_LOSS_TYPES:
            errors.append(f"loss_type={lt!r} is not one of {sorted(DPO_LOSS_TYPES)}")
    if len(weights) != len(loss_types):
        errors.append(f"loss_weights has {len(weights)} entries but loss_type has {len(loss_types)}")
    if f_divergence not in F_DIVERGENCES:
        errors.append(f"f_divergence={f_divergence!r} is not one of {sorted(F_DIVERGENCES)}")
    elif f_divergence != "reverse_kl":
        bad = [lt for lt in loss_types if lt not in _F_DIVERGENCE_LOSS_TYPES]
        if bad:
            errors.append(
                f"f_divergence={f_divergence!r} is only defined for {sorted(_F_DIVERGENCE_LOSS_TYPES)}; "
                f"got loss_type {bad} (use f_divergence='reverse_kl' with these)"
            )
    if not beta > 0:
        errors.append(f"beta={beta} must be > 0")
    if not 0.0 <= label_smoothing <= 1.0:
        errors.append(f"label_smoothing={label_smoothing} must lie in [0, 1]")
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        errors.append(f"label_smoothing={label_smoothing} must lie in [0, 0.5) for loss_type='robust'")
    if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
        errors.append(f"loss_type='exo_pair' needs 0 < label_smoothing < 1 (paper: 1e-3); got {label_smoothing}")
    if soft_target is not None:
        bad = [lt for lt in loss_types if lt not in ("sigmoid", "sigmoid_norm")]
        if bad:
            errors.append(f"soft_target is defined for loss_type 'sigmoid' and 'sigmoid_norm' only; got {bad}")
        elif label_smoothing:
            errors.append("pass either soft_target or label_smoothing, not both")
    if not discopop_tau > 0:
        errors.append(f"discopop_tau={discopop_tau} must be > 0")
    if errors:
        raise ValueError("invalid dpo arguments:\n  - " + "\n  - ".join(errors))


def dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    soft_target: Tensor | None = None,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    discopop_tau: float = 0.05,
    pair_weights: Tensor | None = None,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Direct Preference Optimisation and its pairwise relatives (arXiv 2305.18290, Eq. 7).

    With log-ratios ``r_w = L_w − R_w``, ``r_l = L_l − R_l`` (policy minus reference sequence log-probs),
    scores ``s = g(r)`` from the ``f_divergence`` transform and ``Δ = s_w − s_l``, ``loss_type`` selects the
    link (per pair; paper and equation in each branch): ``sigmoid`` −logσ(βΔ) · ``hinge`` max(0, 1−βΔ) ·
    ``ipo`` (s_w/n_w − s_l/n_l − 1/(2β))² · ``exo_pair`` · ``nca_pair`` · ``robust`` · ``bco_pair`` ·
    ``sppo_hard`` · ``aot`` · ``aot_unpaired`` · ``apo_zero`` · ``apo_down`` · ``discopop`` ·
    ``sigmoid_norm`` −logσ(β(s_w/n_w − s_l/n_l)).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` policy sequence scores.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference scores, or ``None`` for a zero reference.
        beta: inverse temperature (IPO's τ for ``ipo``).
        loss_type: a TRL name, or a list of names combined with ``loss_weights`` (TRL's MPO; add an SFT
            term with :func:`mmalign.losses.combine`).
        label_smoothing: ε of cDPO (``sigmoid``), rDPO (``robust``), EXO (``exo_pair``, must be > 0), AOT.
        soft_target: ``[B]`` probability that chosen beats rejected (graded or noisy labels, OSP/SPA);
            ``soft_target = 1`` is plain DPO and ``1 − ε`` is cDPO.
        f_divergence, f_alpha: f-DPO score transform (``reverse_kl`` = standard DPO).
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (``ipo``, ``sigmoid_norm``).
        discopop_tau: DiscoPOP modulation temperature.
        pair_weights: ``[B]`` multiplied into the per-pair loss before the mean (WPO's w_w·w_l, as TRL).
        sample_weight: ``[B]`` weights of a normalised weighted mean (curricula, importance).

    Returns:
        :class:`LossOutput`; metrics are TRL's: ``rewards/*`` = β·log-ratio (raw, even under an
        f-divergence), ``logps/*``, and ``loss/<type>`` when several types are combined.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    soft_target = upcast(soft_target)
    _validate(loss_types, weights, f_divergence, beta, label_smoothing, soft_target, discopop_tau)

    lw, ll = upcast(policy_chosen_logps), upcast(policy_rejected_logps)
    rw = torch.zeros_like(lw) if ref_chosen_logps is None else upcast(ref_chosen_logps).to(lw)
    rl = torch.zeros_like(ll) if ref_rejected_logps is None else upcast(ref_rejected_logps).to(ll)
    check_same_shape(policy_chosen_logps=lw, policy_rejected_logps=ll, ref_chosen_logps=rw, ref_rejected_logps=rl)
    if lw.dim() != 1:
        raise ValueError(f"dpo expects [B] sequence scores; got shape {tuple(lw.shape)}")
    if soft_target is not None:
        soft_target = soft_target.to(lw)
        if soft_target.min() < 0 or soft_target.max() > 1:
            raise ValueError("soft_target must hold probabilities in [0, 1]")

    transform = F_DIVERGENCES[f_divergence]
    pair = _Pair(
        chosen_logps=lw, rejected_logps=ll, ref_chosen_logps=rw, ref_rejected_logps=rl,
        chosen_logratios=lw - rw, rejected_logratios=ll - rl,
        chosen_scores=transform(lw - rw, f_alpha), rejected_scores=transform(ll - rl, f_alpha),
        beta=beta, label_smoothing=label_smoothing, soft_target=soft_target,
        chosen_lengths=None if chosen_lengths is None else upcast(chosen_lengths).to(lw),
        rejected_lengths=None if rejected_lengths is None else upcast(rejected_lengths).to(lw),
        discopop_tau=discopop_tau,
    )

    per_example = torch.zeros_like(lw)
    term_metrics: dict[str, Tensor] = {}
    pw = None if pair_weights is None else upcast(pair_weights).to(lw)
    for lt, w in zip(loss_types, weights, strict=True):
        term = DPO_LOSS_TYPES[lt](pair)
        if pw is not None:
            term = term * pw
        per_example = per_example + w * term
        if len(loss_types) > 1:
            term_metrics[f"loss/{lt}"] = term

    metrics = pair_metrics(
        beta * pair.chosen_logratios, beta * pair.rejected_logratios,
        policy_chosen_logps=lw, policy_rejected_logps=ll,
    )
    metrics.update(detach_metrics(term_metrics))
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)


def ld_logps(
    chosen_token_logps: Tensor,
    rejected_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    ld_alpha: float,
) -> tuple[Tensor, Tensor]:
    """Length-desensitised sequence log-probs (LD-DPO, arXiv 2409.06411 Eq. 9, TRL's ``ld_alpha``).

    The first ``min(n_w, n_l)`` completion tokens of each side count fully and the rest are scaled by
    ``ld_alpha`` (1 = plain sums). Apply to policy and reference alike, then pass the results to :func:`dpo`.
    Inputs are ``[B, T]`` per-token log-probs with completion masks; masked positions contribute 0.
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha={ld_alpha} must lie in [0, 1]")
    out = []
    cw, cl = chosen_mask.bool(), rejected_mask.bool()
    shared = torch.minimum(cw.sum(-1), cl.sum(-1)).unsqueeze(-1)
    for logps, mask in ((chosen_token_logps, cw), (rejected_token_logps, cl)):
        logps = upcast(logps)
        pos = mask.long().cumsum(-1)  # 1-based position among completion tokens
        zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
        head = torch.where(mask & (pos <= shared), logps, zero).sum(-1)
        tail = torch.where(mask & (pos > shared), logps, zero).sum(-1)
        out.append(head + ld_alpha * tail)
    return out[0], out[1]
