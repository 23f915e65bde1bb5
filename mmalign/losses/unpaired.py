"""Unpaired (pointwise) losses: KTO, BCO, and the unlearning family NPO, SimNPO, gradient ascent.

Each example is one scored completion with a label (desirable/undesirable), or, for unlearning, a
forget-set completion that should become less likely. Inputs are summed completion log-probs ``[B]``
(or diffusion surrogates), policy and, where the loss has one, reference.

Distributed statistics (KTO's reference point z0, BCO's running reward mean δ) are explicit inputs that
the caller computes and gathers; :func:`kto_reference_point` and :func:`bco_running_mean` do the arithmetic
without touching any process group, so the losses stay pure.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import LossOutput, check_same_shape, detach_metrics, masked_mean, reduce_loss, upcast

__all__ = [
    "kto",
    "kto_reference_point",
    "KTO_LOSS_TYPES",
    "bco",
    "bco_running_mean",
    "npo",
    "simnpo",
    "gradient_ascent",
    "unlearning_objective",
]

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _check(errors: list[str], fn: str) -> None:
    if errors:
        raise ValueError(f"invalid {fn} arguments:\n  - " + "\n  - ".join(errors))


def _pointwise(fn: str, policy_logps: Tensor, ref_logps: Tensor | None = None,
               labels: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    lp = upcast(policy_logps)
    ref = None if ref_logps is None else upcast(ref_logps).to(lp)
    lab = None if labels is None else torch.as_tensor(labels, device=lp.device)
    check_same_shape(policy_logps=lp, ref_logps=ref, labels=lab)
    if lp.dim() != 1:
        raise ValueError(f"{fn} expects [B] sequence log-probs; got shape {tuple(lp.shape)}")
    if lab is not None:
        if lab.dtype != torch.bool and not bool(((lab == 0) | (lab == 1)).all()):
            raise ValueError(f"{fn}: labels must be booleans (True = desirable) or 0/1")
        lab = lab.bool()
    return lp, ref, lab


def _scalar(value: Tensor | float, like: Tensor, name: str, fn: str) -> Tensor:
    t = upcast(value).detach().to(like)
    if t.numel() != 1:
        raise ValueError(f"{fn}: {name} must be a scalar (one value for the whole batch); got {tuple(t.shape)}")
    return t.reshape(())


def _group_metrics(rewards: Tensor, logps: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """TRL's unpaired metrics: group means only for groups present in the batch, plus the counts."""
    m: dict[str, Tensor] = {}
    counts = {"chosen": int(labels.sum()), "rejected": int((~labels).sum())}
    for side, mask in (("chosen", labels), ("rejected", ~labels)):
        m[f"count/{side}"] = torch.tensor(float(counts[side]))
        if counts[side]:
            m[f"rewards/{side}"] = masked_mean(rewards, mask, dim=0)
            m[f"logps/{side}"] = masked_mean(logps, mask, dim=0)
    if counts["chosen"] and counts["rejected"]:
        m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
    return m


def kto_reference_point(
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    *,
    reduce_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """KTO's reference point z0 = max(0, mean(L(y'|x) − R(y'|x))), detached (arXiv 2402.01306, Eq. 7's z_ref).

    The inputs are policy and reference log-probs of *mismatched* pairs (x, y'), e.g. completions shifted
    by one within the batch (TRL's KL collator). ``reduce_fn`` receives the local 0-dim mean and must
    return the global one, e.g. ``lambda m: accelerator.gather_for_metrics(m).mean()``: TRL averages the
    per-rank means and clamps after gathering, which this reproduces.
    """
    lp, ref = upcast(policy_kl_logps), upcast(ref_kl_logps)
    ref = ref.to(lp)
    check_same_shape(policy_kl_logps=lp, ref_kl_logps=ref)
    with torch.no_grad():
        kl = (lp - ref).mean() if lp.numel() else torch.zeros((), dtype=lp.dtype, device=lp.device)
        if reduce_fn is not None:
            kl = reduce_fn(kl).mean()
        return kl.clamp(min=0).detach()


def kto(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    *,
    kl_ref_point: Tensor | float | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Kahneman–Tversky Optimisation (Ethayarajh et al., arXiv 2402.01306, Eq. 7).

    With log-ratio ``r = L − R`` and reference point ``z0``, per example:
    desirable ``λ_D·(1 − σ(β(r − z0)))``, undesirable ``λ_U·(1 − σ(β(z0 − r)))``. ``apo_zero_unpaired``
    (APO, arXiv 2408.06266, unpaired form of Eq. 7) drops z0: desirable ``λ_D·(1 − σ(βr))``, undesirable
    ``λ_U·σ(βr)``. Values lie in [0, λ]; at r = z0 every example gives λ/2.

    ``kl_ref_point`` is z0: a scalar the caller computes as ``clamp_min(mean mismatched log-ratio, 0)``,
    detached and gathered across ranks (see :func:`kto_reference_point`); required for ``kto``, unused by
    ``apo_zero_unpaired``. It is detached here as well.

    Follows TRL 1.16 ``KTOTrainer._compute_loss``: the mean over all examples of the weighted per-example
    losses. Deviations: 1 − σ(x) is computed as σ(−x) (equal in exact arithmetic, no cancellation); the
    per-example losses stay in batch order (TRL concatenates desirable then undesirable). Metrics (TRL's
    names): ``rewards/chosen|rejected`` = mean β·r over desirable/undesirable examples and ``logps/*``,
    present only when that group is in the batch (as TRL), ``rewards/margins`` when both are,
    ``count/chosen|rejected`` always, ``kl`` = z0.
    """
    errors = []
    if loss_type not in KTO_LOSS_TYPES:
        errors.append(f"loss_type={loss_type!r} is not one of {sorted(KTO_LOSS_TYPES)}")
    if not beta > 0:
        errors.append(f"beta={beta} must be > 0")
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not (w >= 0 and math.isfinite(w)):
            errors.append(f"{name}={w} must be a finite number >= 0")
    if loss_type == "kto" and kl_ref_point is None:
        errors.append("loss_type='kto' needs kl_ref_point (z0, see kto_reference_point)")
    _check(errors, "kto")

    lp, ref, lab = _pointwise("kto", policy_logps, ref_logps, labels)
    r = lp - ref
    if loss_type == "kto":
        z0 = _scalar(kl_ref_point, lp, "kl_ref_point", "kto")
        desirable, undesirable = torch.sigmoid(-beta * (r - z0)), torch.sigmoid(-beta * (z0 - r))
    else:
        z0 = torch.zeros((), dtype=lp.dtype, device=lp.device)
        desirable, undesirable = torch.sigmoid(-beta * r), torch.sigmoid(beta * r)
    per_example = torch.where(lab, desirable_weight * desirable, undesirable_weight * undesirable)

    metrics = _group_metrics(beta * r, lp, lab)
    metrics.update({"kl": z0, "loss/kto": per_example})
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, detach_metrics(metrics))


def bco_running_mean(rewards: Tensor, *, mean: Tensor | float = 0.0, count: float = 0.0) -> tuple[Tensor, float]:
    """Update BCO's reward shift δ: the running mean of every implicit reward β·r seen so far.

    Returns ``(new_mean, new_count)`` (mean detached, 0-dim). This is the mean part of TRL's
    ``RunningMoments.update`` (count-weighted merge of the batch mean into the running mean; TRL starts
    at count 1e-24, i.e. the first batch's mean). As in TRL's BCO trainer, update with the current batch's
    rewards of *all* examples (desirable and undesirable, gathered across ranks by the caller) and then
    pass the new mean as ``delta``; skip the update during evaluation.
    """
    x = upcast(rewards).detach().reshape(-1)
    m = upcast(mean).detach().to(x).reshape(())
    n = x.numel()
    if n == 0:
        return m, float(count)
    total = float(count) + n
    return m + (x.mean() - m) * (n / total), total


def bco(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    *,
    beta: float = 0.1,
    delta: Tensor | float = 0.0,
    udm_weight: Tensor | None = None,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Binary Classifier Optimisation (Jung et al., arXiv 2404.04656), unpaired form.

    A logistic classifier on the implicit reward ``β·r`` (r = L − R) shifted by ``δ``: desirable examples
    give −logσ(β·r − δ), undesirable ones −logσ(−(β·r − δ)). δ is the running mean of all rewards
    (:func:`bco_running_mean`), detached; δ = 0 and one example per side is TRL's DPO ``bco_pair``.

    Follows the BCO trainer of TRL's ``experimental`` package (``BCOTrainer.bco_loss``, read from the
    repository: TRL 1.16 no longer ships it, so the tests check closed forms, not parity). ``udm_weight``
    ``[B]`` multiplies the undesirable examples' losses (TRL's ``match_underlying_distribution``: the caller
    computes the clamped density ratio p/(1−p) from its prompt classifier); desirable entries are ignored.
    The paper's equation numbers were not verified. Metrics: ``rewards/*``, ``logps/*`` (group means,
    present when the group is), ``count/*``, ``delta``.
    """
    if not beta > 0:
        raise ValueError(f"invalid bco arguments: beta={beta} must be > 0")
    lp, ref, lab = _pointwise("bco", policy_logps, ref_logps, labels)
    rewards = beta * (lp - ref)
    d = _scalar(delta, lp, "delta", "bco")
    rejected = -F.logsigmoid(-(rewards - d))
    if udm_weight is not None:
        w = upcast(udm_weight).to(lp)
        check_same_shape(policy_logps=lp, udm_weight=w)
        rejected = rejected * w
    per_example = torch.where(lab, -F.logsigmoid(rewards - d), rejected)

    metrics = _group_metrics(rewards, lp, lab)
    metrics.update({"delta": d, "loss/bco": per_example})
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, detach_metrics(metrics))


def npo(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    beta: float = 0.1,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Negative Preference Optimisation (Zhang, Lin, Bai, Mei, arXiv 2404.05868; equation number not verified).

    Per forget example with log-ratio ``r = L − R`` (summed sequence log-probs; R from the model before
    unlearning): ``(2/β)·(−logσ(−β·r)) = (2/β)·softplus(β·r)``, i.e. DPO with only a rejected response.
    At r = 0 the value is (2/β)·ln 2 and ∂/∂L = σ(β·r)·2 = 1 per example, exactly gradient ascent's
    gradient; the weight 2σ(β·r) decays as the policy drops below the reference (slower collapse than GA).

    Follows ``licong-lin/negative-preference-optimization`` TOFU/dataloader.py (research note §4.1).
    Metrics: ``rewards/rejected`` = mean β·r and ``logps/rejected`` (the forget completions play the
    rejected role), ``loss/npo``. NPO+RT and NPO+KL: :func:`unlearning_objective`.
    """
    if not beta > 0:
        raise ValueError(f"invalid npo arguments: beta={beta} must be > 0")
    lp, ref, _ = _pointwise("npo", policy_logps, ref_logps)
    r = lp - ref
    per_example = (2.0 / beta) * F.softplus(beta * r)
    metrics = detach_metrics({"rewards/rejected": beta * r, "logps/rejected": lp, "loss/npo": per_example})
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)


def simnpo(
    policy_logps: Tensor,
    lengths: Tensor,
    *,
    beta: float = 2.5,
    gamma: float = 0.0,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """SimNPO (Fan et al., arXiv 2410.07163): reference-free, length-normalised NPO.

    Per forget example with average log-prob ``a = L/n``: ``(2/β)·(−logσ(β·(−a − γ))) =
    (2/β)·softplus(β·(a + γ))``. γ follows the reference code (``OPTML-Group/Unlearn-Simple`` and
    open-unlearning's ``SimNPO``: γ is subtracted from the per-token NLL *before* scaling by β); the paper
    writes −(2/β)·logσ(−(β/|y|)·log π(y|x) − γ_paper), so γ_paper = β·γ here. Both agree at the TOFU
    default γ = 0 (β = 2.5). Invariant to scaling L and n together; SimPO's reward on a rejected-only pair.
    Metrics: ``rewards/rejected`` = mean β·a, ``logps/rejected`` = mean a, ``loss/simnpo``.
    """
    errors = []
    if not beta > 0:
        errors.append(f"beta={beta} must be > 0")
    if not math.isfinite(gamma):
        errors.append(f"gamma={gamma} must be finite")
    _check(errors, "simnpo")
    lp, _, _ = _pointwise("simnpo", policy_logps)
    n = upcast(lengths).to(lp)
    check_same_shape(policy_logps=lp, lengths=n)
    a = lp / n.clamp(min=1.0)  # empty completions: 0/1, not NaN
    per_example = (2.0 / beta) * F.softplus(beta * (a + gamma))
    metrics = detach_metrics({"rewards/rejected": beta * a, "logps/rejected": a, "loss/simnpo": per_example})
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)


def gradient_ascent(
    policy_logps: Tensor,
    *,
    lengths: Tensor | None = None,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Gradient ascent on the forget set (the GA unlearning baseline, e.g. TOFU arXiv 2401.06121).

    Per example ``+L`` (or ``+L/n`` with ``lengths``): minimising it lowers the likelihood of the forget
    completion. Unbounded below, which is why GA collapses and NPO was proposed. The NPO reference code's
    ``grad_ascent`` negates HF's token-mean loss (pooled over the batch); ``lengths`` gives the
    per-example mean instead. Metrics: ``logps/rejected``, ``loss/gradient_ascent``.
    """
    lp, _, _ = _pointwise("gradient_ascent", policy_logps)
    per_example = lp
    if lengths is not None:
        n = upcast(lengths).to(lp)
        check_same_shape(policy_logps=lp, lengths=n)
        per_example = lp / n.clamp(min=1.0)
    metrics = detach_metrics({"logps/rejected": per_example, "loss/gradient_ascent": per_example})
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)


def _retain_term(value: Tensor | float | None, like: Tensor, name: str) -> Tensor | None:
    if value is None:
        return None
    t = upcast(value).to(like.device)
    if t.dim() > 1:
        raise ValueError(f"unlearning_objective: {name} must be a scalar or [B_retain]; got {tuple(t.shape)}")
    return t.mean() if t.numel() else torch.zeros((), dtype=t.dtype, device=t.device)


def unlearning_objective(
    forget_out: LossOutput,
    *,
    retain_nll: Tensor | float | None = None,
    retain_kl: Tensor | float | None = None,
    forget_weight: float = 1.0,
    retain_weight: float = 1.0,
    kl_weight: float = 1.0,
) -> LossOutput:
    """Forget term plus retain regularisers: GD, NPO+RT, NPO+KL, SimNPO+RT (research note §4.1, §4.3).

    ``loss = forget_weight·forget_out.loss + retain_weight·retain_nll + kl_weight·retain_kl``. The
    forget term is any unlearning loss (:func:`npo`, :func:`simnpo`, :func:`gradient_ascent`, ...); the
    retain terms are computed by the caller on a retain batch: ``retain_nll`` the token-mean NLL (as the
    NPO code's ``npo_grad_diff``), ``retain_kl`` KL(π_ref ‖ π_θ) per token. A ``[B_retain]`` tensor is
    averaged. Deviation to note: the NPO code's ``npo_KL`` divides its KL by B·T *including padded
    positions*; compute ``retain_kl`` as a masked mean over real tokens instead (and expect a larger value
    than the reference code reports for padded batches). NPO defaults: all weights 1 (TOFU config);
    SimNPO+RT on TOFU uses forget_weight 0.1375.

    ``per_example`` is the weighted forget term plus the retain terms, which belong to a different batch
    and are therefore added to every forget example (a constant shift), so that ``loss`` equals its mean
    when the forget loss was an unweighted mean. Metrics: the forget loss's own, plus ``loss/forget``
    (unweighted), ``loss/retain_nll``, ``loss/retain_kl`` (when given).
    """
    errors = [f"{name}={w} must be finite" for name, w in
              (("forget_weight", forget_weight), ("retain_weight", retain_weight), ("kl_weight", kl_weight))
              if not math.isfinite(w)]
    _check(errors, "unlearning_objective")
    loss = forget_weight * forget_out.loss
    shift = torch.zeros((), dtype=loss.dtype, device=loss.device)
    metrics = dict(forget_out.metrics)
    extra: dict[str, Tensor] = {"loss/forget": forget_out.loss}
    for name, value, w in (("retain_nll", retain_nll, retain_weight), ("retain_kl", retain_kl, kl_weight)):
        t = _retain_term(value, loss, name)
        if t is not None:
            shift = shift + w * t
            extra[f"loss/{name}"] = t
    metrics.update(detach_metrics(extra))
    per_example = forget_weight * forget_out.per_example + shift
    return LossOutput(loss + shift, per_example, metrics)
