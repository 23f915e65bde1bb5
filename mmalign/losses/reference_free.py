"""Reference-free pairwise losses: CPO, SimPO, AlphaPO, ORPO and SLiC-HF.

None of these needs a reference model, so the loop can skip the reference forward. Inputs are the policy's
*summed* completion log-probs ``[B]`` (or any sequence score, e.g. a diffusion surrogate) plus completion
lengths where a loss length-normalises; the NLL regulariser on the chosen completion is either supplied by
the caller (TRL computes it as a token-mean cross-entropy pooled over the batch) or derived per example
from the chosen log-prob.

Parity: :func:`cpo` reproduces TRL 1.16 ``experimental.cpo.CPOTrainer.cpo_loss`` and :func:`orpo`
``experimental.orpo.ORPOTrainer.odds_ratio_loss`` per example (``tests/losses/test_reference_free.py``).
Metrics follow TRL's CPO/ORPO convention: ``rewards/*`` are β times the log-probs the loss used (no
reference), ``logps/*`` those log-probs (length-averaged where the loss averages), ``nll_loss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import LossOutput, check_same_shape, detach_metrics, pair_metrics, reduce_loss, upcast

__all__ = ["cpo", "simpo", "alphapo", "orpo", "slic", "CPO_LOSS_TYPES"]

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
_LENGTH_AVERAGED = ("ipo", "simpo")

# AlphaPO's p^(−α) = exp(−α·L) overflows for long sequences (TRL returns inf/NaN there). exp(30) ≈ 1e13 keeps
# the reward, and its square under IPO, finite in float32 for |α| ≥ 1e-3; realistic length-averaged
# log-probs (|α·L| of order 1) are far from the clamp.
_ALPHA_EXP_CLAMP = 30.0


def _pair_inputs(chosen: Tensor, rejected: Tensor, fn: str) -> tuple[Tensor, Tensor]:
    lw, ll = upcast(chosen), upcast(rejected)
    ll = ll.to(lw.device)
    check_same_shape(policy_chosen_logps=lw, policy_rejected_logps=ll)
    if lw.dim() != 1:
        raise ValueError(f"{fn} expects [B] sequence log-probs; got shape {tuple(lw.shape)}")
    return lw, ll


def _lengths(lengths: Tensor | None, like: Tensor, name: str, why: str) -> Tensor:
    if lengths is None:
        raise ValueError(f"{why}: pass {name} (number of completion tokens of each sequence, shape [B])")
    n = upcast(lengths).to(like)
    check_same_shape(logps=like, **{name: n})
    # an empty completion has summed log-prob 0; dividing by 1 keeps its average 0 instead of NaN
    return n.clamp(min=1.0)


def _nll(nll_loss: Tensor | float | None, like: Tensor, fallback: Tensor | None, fn: str, hint: str) -> Tensor:
    """The NLL regulariser as ``[B]`` (a scalar is broadcast, i.e. every example gets the batch value)."""
    if nll_loss is None:
        if fallback is None:
            raise ValueError(f"{fn}: {hint}")
        return fallback
    nll = upcast(nll_loss).to(like)
    if nll.dim() == 0:
        return nll.expand_as(like)
    check_same_shape(policy_chosen_logps=like, nll_loss=nll)
    return nll


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _alpha_reward(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO's reward (1 − p^(−α))/α with p = exp(logps), written as −expm1(−α·logps)/α."""
    return -torch.expm1(torch.clamp(-alpha * logps, max=_ALPHA_EXP_CLAMP)) / alpha


def _check(errors: list[str], fn: str) -> None:
    if errors:
        raise ValueError(f"invalid {fn} arguments:\n  - " + "\n  - ".join(errors))


def _cpo_core(lw, ll, *, beta, loss_type, label_smoothing, chosen_lengths, rejected_lengths, nll_loss,
              nll_weight, gamma, alpha, sample_weight, reduction, fn) -> LossOutput:
    errors = []
    if loss_type not in CPO_LOSS_TYPES:
        errors.append(f"loss_type={loss_type!r} is not one of {sorted(CPO_LOSS_TYPES)}")
    if not beta > 0:
        errors.append(f"beta={beta} must be > 0")
    if not 0.0 <= label_smoothing <= 0.5:
        errors.append(f"label_smoothing={label_smoothing} must lie in [0, 0.5]")
    elif label_smoothing and loss_type in ("hinge", "ipo"):
        errors.append(f"label_smoothing={label_smoothing} has no meaning for loss_type={loss_type!r} "
                      "(TRL ignores it with a warning); use 'sigmoid' or 'simpo', or set it to 0")
    if not (nll_weight >= 0 and math.isfinite(nll_weight)):
        errors.append(f"cpo_alpha/nll weight={nll_weight} must be a finite number >= 0")
    if not (math.isfinite(gamma) and math.isfinite(alpha)):
        errors.append(f"simpo_gamma={gamma} and alpha={alpha} must be finite")
    _check(errors, fn)
    if loss_type == "alphapo":  # TRL's sugar: SimPO link, no NLL term
        loss_type, nll_weight = "simpo", 0.0

    lw, ll = _pair_inputs(lw, ll, fn)
    raw_lw = lw
    if loss_type in _LENGTH_AVERAGED:
        why = f"loss_type={loss_type!r} uses length-averaged log-probs"
        lw = lw / _lengths(chosen_lengths, lw, "chosen_lengths", why)
        ll = ll / _lengths(rejected_lengths, ll, "rejected_lengths", why)

    # TRL's "rewards": the (optionally AlphaPO-shaped) log-probs, before β
    sw, sl = (lw, ll) if alpha == 0 else (_alpha_reward(lw, alpha), _alpha_reward(ll, alpha))
    delta = sw - sl
    if loss_type == "sigmoid":
        pref = _smoothed_logistic(beta * delta, label_smoothing)
    elif loss_type == "simpo":
        pref = _smoothed_logistic(beta * delta - gamma, label_smoothing)
    elif loss_type == "hinge":
        pref = torch.relu(1 - beta * delta)
    else:  # ipo
        pref = (delta - 1 / (2 * beta)) ** 2

    per_example = pref
    extra: dict[str, Tensor] = {f"loss/{fn}": pref}
    if nll_weight != 0 or nll_loss is not None:
        fallback = None
        if chosen_lengths is not None:
            fallback = -raw_lw / _lengths(chosen_lengths, raw_lw, "chosen_lengths", fn)
        nll = _nll(nll_loss, raw_lw, fallback, fn,
                   f"the NLL term (weight {nll_weight}) needs nll_loss (token-mean NLL of the chosen completion, "
                   "scalar or [B]) or chosen_lengths to derive it; pass cpo_alpha=0 to drop it")
        extra["nll_loss"] = nll
        if nll_weight != 0:
            per_example = per_example + nll_weight * nll

    metrics = pair_metrics(beta * sw, beta * sl, policy_chosen_logps=lw, policy_rejected_logps=ll)
    metrics.update(detach_metrics(extra))
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)


def cpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    nll_loss: Tensor | float | None = None,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Contrastive Preference Optimisation (Xu, H. et al., arXiv 2401.08417, Eq. 3) with TRL's variants.

    With ``Δ = s_w − s_l`` over policy scores ``s`` (summed log-probs; per-token averages for ``ipo`` and
    ``simpo``; AlphaPO rewards ``(1 − exp(−α·s))/α`` when ``alpha != 0``), per pair:
    ``sigmoid`` −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ) · ``hinge`` max(0, 1 − βΔ) · ``ipo`` (Δ − 1/(2β))² ·
    ``simpo`` the smoothed logistic of βΔ − γ (SimPO, arXiv 2405.14734 Eq. 6; ``simpo_gamma`` is the
    paper's γ) · ``alphapo`` = ``simpo`` with ``cpo_alpha`` forced to 0 (TRL's sugar). The total per
    example adds ``cpo_alpha · nll`` (CPO's behaviour-cloning term on the chosen completion).

    Follows TRL 1.16 ``experimental.cpo.CPOTrainer.cpo_loss`` / ``get_batch_loss_metrics``. Deviations:
    ``label_smoothing`` with ``hinge``/``ipo`` raises instead of being ignored; the AlphaPO exponent is
    clamped at 30 so values stay finite where TRL overflows; ``nll_loss`` may be ``[B]``, and when it is
    omitted it is derived per example as −L_w/n_w (TRL pools tokens over the batch:
    Σ −L_w / Σ n_w, which equals the mean of per-example values only for equal lengths). A scalar
    ``nll_loss`` is added to every example, so ``reduction="mean"`` gives TRL's ``mean + cpo_alpha·nll``.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed completion log-probs.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (needed by ``ipo``/``simpo``/
            ``alphapo`` and to derive the NLL).
        nll_loss: the chosen completion's token-mean NLL, scalar or ``[B]``.
        cpo_alpha: weight of the NLL term (TRL default 1.0; 0 gives pure SimPO/IPO/...).
    """
    return _cpo_core(policy_chosen_logps, policy_rejected_logps, beta=beta, loss_type=loss_type,
                     label_smoothing=label_smoothing, chosen_lengths=chosen_lengths,
                     rejected_lengths=rejected_lengths, nll_loss=nll_loss, nll_weight=cpo_alpha,
                     gamma=simpo_gamma, alpha=alpha, sample_weight=sample_weight, reduction=reduction, fn="cpo")


def simpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """SimPO (Meng et al., arXiv 2405.14734, Eq. 6): −logσ(β·(L_w/n_w − L_l/n_l) − γ), no reference.

    Equals :func:`cpo` with ``loss_type="simpo"`` and ``cpo_alpha=0``. ``gamma`` is the paper's target
    margin γ, the same quantity as TRL's ``simpo_gamma``; the SimPO repository instead configures
    ``gamma_beta_ratio`` = γ/β. Defaults β = 2.0, γ = 1.0 are the repository's Llama-3-8B-Base config
    (``beta: 2.0``, ``gamma_beta_ratio: 0.5``); TRL's CPOConfig defaults (β = 0.1, γ = 0.5, i.e. γ/β = 5)
    are generic CPO values, not SimPO's. ``label_smoothing`` is the repository's optional smoothing.
    """
    return _cpo_core(policy_chosen_logps, policy_rejected_logps, beta=beta, loss_type="simpo",
                     label_smoothing=label_smoothing, chosen_lengths=chosen_lengths,
                     rejected_lengths=rejected_lengths, nll_loss=None, nll_weight=0.0, gamma=gamma, alpha=0.0,
                     sample_weight=sample_weight, reduction=reduction, fn="simpo")


def alphapo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    alpha: float,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """AlphaPO (Gupta et al., arXiv 2501.03884): SimPO with the reward reshaped by α.

    With per-token averages ``a = L/n`` and ``r(a) = (1 − exp(−α·a))/α`` (i.e. (1 − p^(−α))/α with
    p = exp(a); α → 0 recovers the log reward a), the loss is −logσ(β·(r(a_w) − r(a_l)) − γ). This is TRL's
    ``loss_type="alphapo"`` (simpo + ``alpha``, no NLL term). ``alpha`` has no default because the paper's
    recommended values (and the equation number) were not verified here; β/γ defaults mirror :func:`simpo`.
    """
    return _cpo_core(policy_chosen_logps, policy_rejected_logps, beta=beta, loss_type="simpo",
                     label_smoothing=label_smoothing, chosen_lengths=chosen_lengths,
                     rejected_lengths=rejected_lengths, nll_loss=None, nll_weight=0.0, gamma=gamma, alpha=alpha,
                     sample_weight=sample_weight, reduction=reduction, fn="alphapo")


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, switching at −ln 2 between the two accurate forms (Mächler 2012).

    x is clamped to ≤ −eps first: at x = 0 the value is −inf and, because ``torch.where`` back-propagates
    through both branches, the gradient would be NaN even where the other branch is selected.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 0.1,
    nll_loss: Tensor | float | None = None,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Odds-Ratio Preference Optimisation (Hong et al., arXiv 2403.07691, Eq. 6–7).

    With per-token averages ``a = L/n`` (as TRL), ``log odds(y) = a − log(1 − e^a)`` and
    ``z = log odds(y_w) − log odds(y_l)``, per example: ``nll − β·logσ(z)`` (β is the paper's λ).

    Follows TRL 1.16 ``experimental.orpo.ORPOTrainer.odds_ratio_loss`` with total ``nll − mean(β·logσ(z))``.
    Deviations: log(1 − e^a) is computed in the input precision (TRL casts to float32) with ``a`` clamped
    to ≤ −eps, so an all-certain chosen completion (a → 0) gives a finite value and gradient instead of
    inf/NaN; ``nll_loss`` defaults to the per-example −a_w (TRL: token mean pooled over the batch, pass it
    to reproduce TRL exactly; pass 0 to drop the SFT term). Metric names are TRL's, including its
    ``log_odds_ratio`` = mean logσ(z) and ``log_odds_chosen`` = mean z.
    """
    if not beta > 0:
        raise ValueError(f"invalid orpo arguments: beta={beta} must be > 0")
    lw, ll = _pair_inputs(policy_chosen_logps, policy_rejected_logps, "orpo")
    why = "orpo uses length-averaged log-probs"
    aw = lw / _lengths(chosen_lengths, lw, "chosen_lengths", why)
    al = ll / _lengths(rejected_lengths, ll, "rejected_lengths", why)
    log_odds = (aw - al) - (_log1mexp(aw) - _log1mexp(al))
    ratio = F.logsigmoid(log_odds)
    nll = _nll(nll_loss, lw, -aw, "orpo", "")
    per_example = nll - beta * ratio

    metrics = pair_metrics(beta * aw, beta * al, policy_chosen_logps=aw, policy_rejected_logps=al)
    metrics.update(detach_metrics({"nll_loss": nll, "log_odds_ratio": ratio, "log_odds_chosen": log_odds,
                                   "loss/odds_ratio": -beta * ratio}))
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)


def slic(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    delta: float = 1.0,
    nll_loss: Tensor | float | None = None,
    nll_weight: float = 1.0,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """SLiC-HF (Zhao et al., arXiv 2305.10425): rank-calibration hinge plus a likelihood regulariser.

    Per example: ``max(0, δ − L_w + L_l) + λ·nll`` on raw summed sequence log-probs, no reference and no
    length normalisation. This is *not* TRL's ``hinge`` (max(0, 1 − β·Δ) on reference log-ratios). The
    regulariser targets the chosen completion: ``nll_loss`` if given (scalar or ``[B]``), otherwise the
    sequence NLL −L_w, matching the paper's −λ·log P(y_ref|x) with y_ref = chosen.

    Unverified (research note, llm_losses.md §3): the equation number, the paper's δ and λ values (the
    defaults δ = 1, λ = 1 are placeholders), and whether the regulariser target was the chosen or the SFT
    reference completion. Metrics: ``rewards/*`` are the raw log-probs (β = 1), margins L_w − L_l.
    """
    errors = []
    if not math.isfinite(delta):
        errors.append(f"delta={delta} must be finite")
    if not (nll_weight >= 0 and math.isfinite(nll_weight)):
        errors.append(f"nll_weight={nll_weight} must be a finite number >= 0")
    _check(errors, "slic")
    lw, ll = _pair_inputs(policy_chosen_logps, policy_rejected_logps, "slic")
    hinge = torch.relu(delta - lw + ll)
    per_example = hinge
    extra: dict[str, Tensor] = {"loss/slic": hinge}
    if nll_weight != 0 or nll_loss is not None:
        nll = _nll(nll_loss, lw, -lw, "slic", "")
        extra["nll_loss"] = nll
        per_example = per_example + nll_weight * nll
    metrics = pair_metrics(lw, ll, policy_chosen_logps=lw, policy_rejected_logps=ll)
    metrics.update(detach_metrics(extra))
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)
