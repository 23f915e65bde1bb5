"""Reward-model training losses (research/llm_losses.md §8.2, §7 "General Preference Modeling").

- :func:`bradley_terry`: scalar rewards, TRL ``RewardTrainer`` semantics (margin, centering term).
- :func:`general_preference_rm`: GPM's skew-symmetric score between preference embeddings, which can
  represent cyclic (intransitive) preferences that a scalar reward cannot.
Ranked lists of RM scalars go through :func:`mmalign.losses.listwise.plackett_luce`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import LossOutput, check_same_shape, detach_metrics, pair_metrics, reduce_loss, upcast

__all__ = ["bradley_terry", "general_preference_score", "general_preference_rm"]


def _as_batch(name: str, t: Tensor) -> Tensor:
    t = upcast(t)
    if t.dim() == 2 and t.shape[-1] == 1:  # RM heads emit [B, 1]; TRL squeezes the last dim
        t = t.squeeze(-1)
    if t.dim() != 1:
        raise ValueError(f"{name} must be [B] or [B, 1]; got shape {tuple(t.shape)}")
    return t


def _as_margin(margin: Tensor | float | None, like: Tensor) -> Tensor:
    if margin is None:
        return torch.zeros_like(like)
    m = upcast(margin).to(like.device, like.dtype)
    if m.dim() == 2 and m.shape[-1] == 1:
        m = m.squeeze(-1)
    if m.dim() > 1 or (m.dim() == 1 and m.shape[0] != like.shape[0]):
        raise ValueError(f"margin must be a scalar or [B]={tuple(like.shape)}; got shape {tuple(m.shape)}")
    return m.expand_as(like)


def bradley_terry(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Bradley–Terry reward-model loss, as TRL 1.16 ``RewardTrainer.compute_loss`` computes it.

    per_example = −log σ(r_w − r_l − m) + c·(r_w + r_l)²

    with m the optional per-pair ``margin`` (Llama-2 style; TRL's dataset column ``margin``) and c the
    ``center_rewards_coefficient`` (Eisenstein et al. 2023, arXiv 2312.09244 Eq. 2, TRL recommends 0.01;
    it pushes rewards toward zero mean). Paper: Ouyang et al. 2022 (arXiv 2203.02155) Eq. 1 for K = 2.
    TRL adds the centering term as c·mean((r_w + r_l)²) over the batch, which equals the mean of our
    per-example term; with a ``sample_weight`` both parts are weighted alike. Deviation: a negative c
    (unbounded below) raises.

    Metrics use TRL's names: ``accuracy`` = mean(r_w > r_l) (raw rewards, margin not subtracted),
    ``margin`` = mean(r_w − r_l), ``min_reward`` / ``mean_reward`` / ``max_reward`` over all 2B rewards;
    plus the shared ``rewards/{chosen,rejected,margins,accuracies}`` and ``loss/{bradley_terry,center}``.
    """
    if center_rewards_coefficient is not None and not (
        math.isfinite(center_rewards_coefficient) and center_rewards_coefficient >= 0
    ):
        raise ValueError(
            f"center_rewards_coefficient={center_rewards_coefficient!r} must be None or a finite number >= 0"
        )
    r_w, r_l = _as_batch("chosen_rewards", chosen_rewards), _as_batch("rejected_rewards", rejected_rewards)
    check_same_shape(chosen_rewards=r_w, rejected_rewards=r_l)
    m = _as_margin(margin, r_w)
    bt = F.softplus(-(r_w - r_l - m))  # = −log σ(r_w − r_l − m), finite at |Δ| = 1e4
    per_example = bt
    metrics = pair_metrics(r_w, r_l)
    if center_rewards_coefficient is not None:
        center = center_rewards_coefficient * (r_w + r_l) ** 2
        per_example = bt + center
        metrics["loss/center"] = center.detach().mean()
    all_rewards = torch.cat([r_w, r_l]).detach()
    metrics.update(
        detach_metrics(
            {
                "accuracy": (r_w > r_l).float(),
                "margin": (r_w - r_l).detach(),
                "min_reward": all_rewards.min(),
                "mean_reward": all_rewards.mean(),
                "max_reward": all_rewards.max(),
                "loss/bradley_terry": bt,
            }
        )
    )
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)


def general_preference_score(
    embeddings_a: Tensor,
    embeddings_b: Tensor,
    *,
    eigenvalues: Tensor | None = None,
) -> Tensor:
    """GPM preference score s(a ≻ b) = ⟨R·v_a, v_b⟩ for embeddings ``[B, 2k]`` (Zhang et al. 2024,
    arXiv 2410.02197).

    R is block-diagonal with 2×2 blocks λ_i·[[0, −1], [1, 0]], so
    s = Σ_i λ_i·(a_{2i}·b_{2i+1} − a_{2i+1}·b_{2i}); s(a, b) = −s(b, a) and s(a, a) = 0. ``eigenvalues``
    (λ, ``[k]`` or ``[B, k]``, default 1) are the prompt-dependent block scales of the reference code
    (``general-preference/general-preference-model``: softmax over a prompt head, times k).
    """
    a, b = upcast(embeddings_a), upcast(embeddings_b)
    check_same_shape(embeddings_a=a, embeddings_b=b)
    if a.dim() != 2 or a.shape[-1] % 2 != 0:
        raise ValueError(f"embeddings must be [B, 2k] with an even last dim; got shape {tuple(a.shape)}")
    a2, b2 = a.unflatten(-1, (-1, 2)), b.unflatten(-1, (-1, 2))
    blocks = a2[..., 0] * b2[..., 1] - a2[..., 1] * b2[..., 0]  # [B, k]
    if eigenvalues is not None:
        lam = upcast(eigenvalues).to(blocks.device, blocks.dtype)
        if lam.shape not in ((blocks.shape[-1],), tuple(blocks.shape)):
            raise ValueError(
                f"eigenvalues must be [k]={blocks.shape[-1]} or [B, k]={tuple(blocks.shape)}; "
                f"got shape {tuple(lam.shape)}"
            )
        blocks = blocks * lam
    return blocks.sum(-1)


def general_preference_rm(
    chosen_embeddings: Tensor,
    rejected_embeddings: Tensor,
    *,
    eigenvalues: Tensor | None = None,
    margin: Tensor | float | None = None,
    tau: float = 0.1,
    normalize: bool = True,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """General Preference Model loss (Zhang et al. 2024, arXiv 2410.02197): logistic loss on the
    skew-symmetric score of :func:`general_preference_score`.

    per_example = −log σ((s(v_w ≻ v_l) − m) / τ)

    Reference code: ``general-preference/general-preference-model`` ``models/loss.py``
    (``HighDimGeneralPreferenceLoss``, τ = 0.1 default). ``normalize=True`` L2-normalises the embeddings
    first (the paper's unit vectors; one version of the reference model does it in the head, a later
    one leaves it commented out, so it is a switch here). At v_w = v_l the loss is ln 2; swapping
    chosen and rejected flips the sign of s. Metrics: ``rewards/accuracies`` = mean(s > 0),
    ``preference/score`` = mean s, ``preference/prob`` = mean σ(s/τ) (the reference's "prob").
    """
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau={tau!r} must be a finite number > 0")
    v_w, v_l = upcast(chosen_embeddings), upcast(rejected_embeddings)
    if normalize:
        v_w, v_l = F.normalize(v_w, dim=-1), F.normalize(v_l, dim=-1)
    score = general_preference_score(v_w, v_l, eigenvalues=eigenvalues)
    m = _as_margin(margin, score)
    per_example = F.softplus(-(score - m) / tau)
    s = score.detach()
    metrics = detach_metrics(
        {
            "rewards/accuracies": (s > 0).float(),
            "preference/score": s,
            "preference/prob": torch.sigmoid(s / tau),
            "loss/general_preference": per_example,
        }
    )
    return LossOutput(reduce_loss(per_example, sample_weight, reduction), per_example, metrics)
