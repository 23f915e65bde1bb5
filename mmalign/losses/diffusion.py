"""Diffusion and flow-matching preference losses over per-sample denoising errors.

The adapter (``mmalign.adapters.diffusion``) supplies, for every candidate, the per-sample error
``err = mean over non-batch dims of (prediction − target)²`` computed in fp32, with the **same noise and
timestep for the candidates of one example** (pitfall 1 of research/diffusion.md §9). The mean, not the
sum, is what the published β values assume: a sum multiplies the effective β by C·H·W (16384 for SD1.5
latents at 512 px).

The target may be ε (SD1.5/SDXL), v (``scheduler.get_velocity``) or the flow-matching velocity
``ε − x0`` (SD3/FLUX, flow_grpo's SD3 DPO): the losses below take the errors unchanged. The targets weight
timesteps differently (v-MSE = ε-MSE/α_t², velocity-MSE = ε-MSE/(1−σ)²), so β must be retuned across
target types (flow_grpo uses β = 100 on SD3.5-M velocity errors against 5000 for SD1.5 ε errors). A
per-element weighting such as diffusers' ``compute_loss_weighting_for_sd3`` belongs in the adapter, before
the mean; none of the reference DPO implementations weights errors, so nothing for it is exposed here.

Training runs do not call these closed forms: the diffusion family (``mmalign.adapters.diffusion_family``)
scores candidates as ``logps = −c·err`` (c = ½ in the original β convention, 1 in the diffusers one), and the
generic rows of the one METHODS table (``mmalign.methods.table``) pass them to :func:`~mmalign.losses.dpo`,
``kto`` and ``plackett_luce`` with the user's β, which reproduces :func:`diffusion_dpo` /
:func:`diffusion_npo` bit for bit (multiplying by ½ or 2 is exact). They stay as the pure, self-contained
statement of each objective over errors (and the reference the family is tested against).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import LossOutput, check_same_shape, detach_metrics, reduce_loss, upcast
from .pairwise import dpo

__all__ = [
    "BETA_CONVENTIONS",
    "convert_beta",
    "diffusion_dpo",
    "diffusion_npo",
    "diffusion_sft",
    "self_npo_regression",
]

# How much larger the original-convention β is than each convention's β for the same logit.
BETA_CONVENTIONS: dict[str, float] = {
    # −log σ(−(β/2)·((m_w − r_w) − (m_l − r_l))): Salesforce DiffusionDPO train.py, diffusers
    # train_diffusion_dpo_sdxl.py, Diffusion-NPO train_sdxl.py, flow_grpo train_sd3_dpo.py.
    "original": 1.0,
    # −log σ(β·(ref_diff − model_diff)): diffusers train_diffusion_dpo.py (SD1.5, after PR #6788; its
    # default 2500 is the original 5000) and Diffusion-NPO train_sd15.py (β = 500, i.e. original 1000).
    "diffusers": 2.0,
}

# dpo() options that a diffusion pair fixes itself.
_RESERVED_DPO_KWARGS = ("chosen_lengths", "rejected_lengths", "sample_weight", "reduction")


def convert_beta(beta: float, from_convention: str, to_convention: str) -> float:
    """Convert a Diffusion-DPO β between the conventions of :data:`BETA_CONVENTIONS`.

    ``β_original = 2 · β_diffusers``: the diffusers SD1.5 script drops the ½ of the original code, so its
    β = 2500 is the same logit as the original β = 5000. The paper's Eq. 14 writes the factor as
    ``β·T·ω(λ_t)`` (T timesteps, ω constant in practice) and its supplement S4 derives β/2; that product
    is what the code's β/2 stands for, so a "paper β" is not comparable to either code β without T.
    """
    for name in (from_convention, to_convention):
        if name not in BETA_CONVENTIONS:
            raise ValueError(f"beta convention {name!r} is not one of {sorted(BETA_CONVENTIONS)}")
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0")
    return beta * BETA_CONVENTIONS[from_convention] / BETA_CONVENTIONS[to_convention]


def _check_errors(**errs: Tensor | None) -> dict[str, Tensor | None]:
    out = {k: upcast(v) for k, v in errs.items()}
    check_same_shape(**out)
    for k, v in out.items():
        if v is not None and v.dim() != 1:
            raise ValueError(
                f"{k} must be [B] per-sample errors (mean over non-batch dims); got shape {tuple(v.shape)}"
            )
    return out


def diffusion_dpo(
    model_chosen_err: Tensor,
    model_rejected_err: Tensor,
    ref_chosen_err: Tensor | None,
    ref_rejected_err: Tensor | None,
    *,
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    beta_convention: str = "original",
    sft_weight: float = 0.0,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
    **dpo_kwargs: Any,
) -> LossOutput:
    """Diffusion-DPO (Wallace et al., arXiv 2311.12908, Eq. 14 with the β/2 of supplement S4).

    With per-sample errors ``m`` (policy) and ``r`` (reference) of the chosen (w) and rejected (l) image::

        s    = −(β/2) · [(m_w − r_w) − (m_l − r_l)]          (original convention, β ≈ 2000–5000)
        loss = −log σ(s)                                    (loss_type="sigmoid")

    This is :func:`mmalign.losses.dpo` on pseudo log-probs ``−err/2`` with the same β, so every DPO
    ``loss_type`` (and ``f_divergence``, ``label_smoothing``, ``soft_target``, ``pair_weights`` via
    ``dpo_kwargs``) applies to diffusion pairs. ``rewards/*`` metrics are then the implicit rewards
    ``−(β/2)(m − r)`` and ``rewards/margins`` is the mean of ``s`` (flow_grpo's ``inside_term``).

    Conventions (research/diffusion.md §1.2): ``beta_convention="diffusers"`` reads ``beta`` as the
    diffusers SD1.5 script's β of ``−log σ(β·(ref_diff − model_diff))``, i.e. half the original β; see
    :func:`convert_beta`. Metrics always report the original-convention reward.

    Deviations and choices:
        - ``hinge`` gives ``relu(1 − β_diffusers·(ref_diff − model_diff))``, the diffusers script's hinge.
        - ``ipo`` gives ``(s_w − s_l − 1/(2β))²`` on the half-error log-ratios, which equals
          ``¼·(ref_diff − model_diff − 1/β)²``: a quarter of the IPO that the diffusers SD1.5 script
          intends with β_diffusers = β/2 (its branch reads an undefined ``args.beta`` and crashes).
          Errors are already means over elements, so there is no length to normalise by: the lengths
          passed to ``dpo`` are ones (``sigmoid_norm`` then equals ``sigmoid``).
        - ``rewards/accuracies`` counts a tie (s = 0) as wrong, like the Salesforce code and TRL, so it
          reads 0 at initialisation; the diffusers scripts count ties as ½.
        - ``sft_weight`` adds ``sft_weight · m_w`` (the MSE on the chosen image) per example, the SFT term
          of RPO-style mixes; no reference Diffusion-DPO code has it (default 0).
        - ``ref_*_err = None`` is a zero reference (reference-free use of the same links).

    Args:
        model_chosen_err, model_rejected_err: ``[B]`` policy errors, with gradient.
        ref_chosen_err, ref_rejected_err: ``[B]`` reference errors (computed under ``no_grad``) or ``None``.
        beta: inverse temperature in ``beta_convention``; larger stays closer to the reference.
        loss_type: any :data:`mmalign.losses.pairwise.DPO_LOSS_TYPES` name, or a list with ``loss_weights``.
        sample_weight: ``[B]`` weights of a normalised weighted mean.
        dpo_kwargs: passed to :func:`mmalign.losses.dpo` (lengths excepted).

    Returns:
        :class:`LossOutput` with ``rewards/*``, ``diffusion/{model,ref}_mse_{chosen,rejected}``,
        ``diffusion/{model,ref}_mse`` (Salesforce's ``model_mse_unaccumulated``: mean over both halves),
        ``diffusion/{model,ref}_diff`` (mean of ``err_w − err_l``), and ``loss/{dpo,sft}`` when
        ``sft_weight`` is nonzero.
    """
    reserved = sorted(set(dpo_kwargs) & set(_RESERVED_DPO_KWARGS))
    if reserved:
        raise ValueError(
            f"diffusion_dpo sets {reserved} itself (errors are per-sample means, so lengths are 1); "
            "remove them from the call"
        )
    if beta_convention not in BETA_CONVENTIONS:
        raise ValueError(f"beta_convention={beta_convention!r} is not one of {sorted(BETA_CONVENTIONS)}")
    if not sft_weight >= 0:
        raise ValueError(f"sft_weight={sft_weight} must be >= 0")
    if (ref_chosen_err is None) != (ref_rejected_err is None):
        raise ValueError("pass both ref_chosen_err and ref_rejected_err, or neither (zero reference)")
    errs = _check_errors(
        model_chosen_err=model_chosen_err, model_rejected_err=model_rejected_err,
        ref_chosen_err=ref_chosen_err, ref_rejected_err=ref_rejected_err,
    )
    mw, ml, rw, rl = errs.values()
    beta_original = convert_beta(beta, beta_convention, "original")

    ones = torch.ones_like(mw)
    out = dpo(
        -0.5 * mw, -0.5 * ml,
        None if rw is None else -0.5 * rw.to(mw), None if rl is None else -0.5 * rl.to(mw),
        beta=beta_original, loss_type=loss_type, chosen_lengths=ones, rejected_lengths=ones, **dpo_kwargs,
    )
    per_example = out.per_example
    metrics = {k: v for k, v in out.metrics.items() if not k.startswith("logps/")}
    raw: dict[str, Tensor] = {
        "diffusion/model_mse_chosen": mw,
        "diffusion/model_mse_rejected": ml,
        "diffusion/model_mse": 0.5 * (mw + ml),
        "diffusion/model_diff": mw - ml,
    }
    if rw is not None:
        raw.update({
            "diffusion/ref_mse_chosen": rw,
            "diffusion/ref_mse_rejected": rl,
            "diffusion/ref_mse": 0.5 * (rw + rl),
            "diffusion/ref_diff": rw - rl,
        })
    if sft_weight:
        raw["loss/dpo"] = per_example
        raw["loss/sft"] = mw
        per_example = per_example + sft_weight * mw
    metrics.update(detach_metrics(raw))
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)


def diffusion_npo(
    model_chosen_err: Tensor,
    model_rejected_err: Tensor,
    ref_chosen_err: Tensor | None,
    ref_rejected_err: Tensor | None,
    **kwargs: Any,
) -> LossOutput:
    """Diffusion-NPO (Wang et al., ICLR 2025, arXiv 2505.11245): Diffusion-DPO with the preference reversed.

    Trains the *negative* model used in the unconditional branch of CFG: the call is
    ``diffusion_dpo(model_rejected_err, model_chosen_err, ref_rejected_err, ref_chosen_err, **kwargs)``,
    which is the reference code's only change (it reverses the pair where it would have kept it). Inputs
    keep their human meaning (``chosen`` = the preferred image); every metric and ``sft_weight`` refer to
    the negative model's objective, so ``rewards/chosen`` is the reward of the human-rejected image and
    ``rewards/accuracies`` the rate at which the negative model prefers it. Reference code: LoRA from the
    base model, β = 500 diffusers convention on SD1.5 and β = 2000 original convention on SDXL.
    """
    return diffusion_dpo(model_rejected_err, model_chosen_err, ref_rejected_err, ref_chosen_err, **kwargs)


def diffusion_sft(
    model_err: Tensor,
    *,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """The standard denoising loss on the preferred images: the SFT baseline of Diffusion-DPO (arXiv 2311.12908 §5).

    ``per_example = err`` (the adapter's per-sample MSE to the ε, v or velocity target); the loss is its
    mean, i.e. diffusers' ``F.mse_loss(pred, target, reduction="mean")`` when all samples share a shape.
    """
    (err,) = _check_errors(model_err=model_err).values()
    metrics = detach_metrics({"diffusion/model_mse": err})
    return LossOutput(reduce_loss(err, sample_weight, reduction), err, metrics)


_REGRESSION_LOSSES = ("pseudo_huber", "l2")


def self_npo_regression(
    pred_x0: Tensor,
    target_x0: Tensor,
    *,
    loss: str = "pseudo_huber",
    huber_c: float = 1e-3,
    weights: Tensor | None = None,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Self-NPO's x0 regression (Wang et al., arXiv 2505.11777, truncated diffusion fine-tuning).

    The student's x0 prediction at the re-noised state x_s regresses the (detached) x̂0 that the teacher
    reached after K truncated solver steps (research/diffusion.md §4)::

        pseudo_huber:  ℓ = sqrt((pred − target)² + c²) − c     (element-wise; ≈ d²/(2c) small, ≈ |d| large)
        l2:            ℓ = (pred − target)²
        per_example = mean over non-batch dims of (weights · ℓ)

    Follows the released ``Self-NPO/train.py``: element-wise pseudo-Huber with ``c = 1e-3`` (its
    ``--huber_c`` default), averaged over every element (= the mean of ``per_example`` when all samples
    share a shape). The script's argparse default is ``l2`` but its launcher ``train.sh`` passes
    ``--loss_type=huber``, so pseudo-Huber is the default here. The paper is summarised (in a digest; its
    body was not read, unverified) as regressing x̂0 with the "standard diffusion loss"; the choice of
    pseudo-Huber comes from the code.
    ``target_x0`` is detached here, as the teacher runs under ``no_grad`` in the reference code.

    Args:
        pred_x0: ``[B, ...]`` student x0 prediction, e.g. ``(x_s − σ_s ε̂)/α_s`` for an ε-model.
        target_x0: ``[B, ...]`` teacher x̂0.
        loss: ``"pseudo_huber"`` or ``"l2"``.
        huber_c: the pseudo-Huber scale c > 0 (in latent units).
        weights: optional element weights broadcastable to ``pred_x0`` (mask or per-timestep weighting),
            multiplied in before the mean, as diffusers' SD3 weighting is.
    """
    if loss not in _REGRESSION_LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {sorted(_REGRESSION_LOSSES)}")
    if not huber_c > 0:
        raise ValueError(f"huber_c={huber_c} must be > 0")
    pred, target = upcast(pred_x0), upcast(target_x0).detach()
    check_same_shape(pred_x0=pred, target_x0=target)
    if pred.dim() < 1:
        raise ValueError("pred_x0 must have a batch dimension")
    target = target.to(pred)
    diff = pred - target
    if loss == "pseudo_huber":
        # sqrt(d² + c²) − c = d² / (sqrt(d² + c²) + c): the second form keeps precision when |d| ≪ c.
        sq = diff * diff
        elem = sq / (torch.sqrt(sq + huber_c**2) + huber_c)
    else:
        elem = diff * diff
    if weights is not None:
        w = upcast(weights).to(elem)
        try:
            elem = elem * torch.broadcast_to(w, elem.shape)
        except RuntimeError as exc:
            raise ValueError(
                f"weights of shape {tuple(w.shape)} do not broadcast to pred_x0 {tuple(elem.shape)}"
            ) from exc
    per_example = elem.reshape(elem.shape[0], -1).mean(-1)
    metrics = detach_metrics({
        "self_npo/mse": (diff.detach() ** 2).reshape(diff.shape[0], -1).mean(-1),
        "self_npo/abs_err": diff.detach().abs().reshape(diff.shape[0], -1).mean(-1),
    })
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)
