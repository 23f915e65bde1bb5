"""Contrastive and representation losses: CLIP InfoNCE, SigLIP, CAVP (Diff-Foley), CLIP-Refine (RaFA,
HyCD), ZSCL distillation and weight averaging, plus geometry metrics (modality gap, alignment, uniformity).

Features are ``[N, D]`` (``[B, C, D]`` for CAVP clip groups). Like open_clip, the losses expect features
that are already L2-normalised and a ``logit_scale`` that is already exponentiated; ``normalize=True``
normalises inside. Gathering features across ranks is the caller's job: pass the gathered features to get
open_clip's ``local_loss=False`` behaviour.

Parity (float64, ``tests/losses/test_contrastive.py``): :func:`clip_contrastive` == open_clip ``ClipLoss``
and :func:`siglip` == open_clip ``SigLipLoss`` (single process); :func:`hycd` at α=0 == open_clip
``DistillClipLoss.dist_loss`` minus the teacher entropy (KL vs soft-target CE). Notes:
research note ``video_audio_clip_prior.md`` §2.3, §2.8, §4.

This file holds CLIP InfoNCE, SigLIP and the geometry metrics; CAVP is in :mod:`.cavp`, RaFA/HyCD/ZSCL and
weight averaging in :mod:`.clip_tuning` (shared checks in :mod:`._contrastive_common`). Every name is
importable from here and from :mod:`mmalign.losses`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import LossOutput, check_same_shape, detach_metrics, reduce_loss
from ._contrastive_common import _check_pair, _check_range, _clip_rows, _features, _scalar
from .cavp import cavp_intra_contrastive, cavp_loss
from .clip_tuning import average_weights, hycd, rafa, update_weight_average, zscl_distill

__all__ = [
    "clip_contrastive",
    "siglip",
    "cavp_intra_contrastive",
    "cavp_loss",
    "rafa",
    "hycd",
    "zscl_distill",
    "average_weights",
    "update_weight_average",
    "modality_gap",
    "alignment",
    "uniformity",
]


def clip_contrastive(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    logit_bias: Tensor | float | None = None,
    labels: Tensor | None = None,
    normalize: bool = False,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Symmetric CLIP InfoNCE (Radford et al. 2021, arXiv 2103.00020, Fig. 3 pseudocode).

    logits = s·I·Tᵀ (+ b); L = ½[CE(logits, y) + CE(logitsᵀ, y)], y = arange(N) (or ``labels``: image i's
    positive is text ``labels[i]``, a permutation). ``logit_scale`` s is already exponentiated. Per-example
    = ½(CE_i2t[i] + CE_t2i[i]) (pair-indexed), whose mean is the loss.

    Follows open_clip ``ClipLoss`` (single process, ``local_loss=False``) exactly, the additive
    ``logit_bias`` included (a no-op for a softmax; kept for parity). Deviations: ``labels`` as a
    permutation, ``normalize``, ``sample_weight`` (open_clip has none of them).
    Metrics: ``loss/clip``, ``acc/i2t``, ``acc/t2i``, ``logit_scale``.
    """
    image = _features(image_features, "image_features", normalize)
    text = _features(text_features, "text_features", normalize)
    _check_pair(image, text)
    scale = _scalar(logit_scale, "logit_scale", image)
    bias = None if logit_bias is None else _scalar(logit_bias, "logit_bias", image)
    per_example, acc_i2t, acc_t2i = _clip_rows(image, text, scale, bias, labels)
    loss = reduce_loss(per_example, sample_weight, reduction)
    metrics = {"loss/clip": loss, "acc/i2t": acc_i2t, "acc/t2i": acc_t2i, "logit_scale": scale}
    return LossOutput(loss, per_example, detach_metrics(metrics))


def siglip(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float | None = None,
    *,
    negative_only: bool = False,
    normalize: bool = False,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Sigmoid pairwise loss (Zhai et al. 2023, arXiv 2303.15343, Algorithm 1).

    logits = s·I·Tᵀ + b; z_ij = +1 if i == j else −1 (all −1 with ``negative_only``);
    L = −(1/N)·Σ_ij logσ(z_ij·logits_ij). Per-example i = −Σ_j logσ(z_ij·logits_ij) (row sum), so the mean
    over rows is the loss, matching open_clip ``SigLipLoss`` (single process; the distributed version adds
    ``negative_only`` terms for text blocks from other ranks: call again with those features and
    ``negative_only=True``). Deviations: fp32 compute for half inputs (open_clip works in the input dtype),
    ``normalize``, ``sample_weight``. The ``image_ids`` multi-positive variant is not implemented.
    Metrics: ``loss/siglip``, ``acc/i2t``, ``acc/t2i``, ``logits/pos``, ``logits/neg``, ``logit_scale``,
    ``logit_bias``.
    """
    image = _features(image_features, "image_features", normalize)
    text = _features(text_features, "text_features", normalize)
    _check_pair(image, text)
    scale = _scalar(logit_scale, "logit_scale", image)
    bias = _scalar(logit_bias, "logit_bias", image, default=0.0)
    logits = scale * image @ text.T + bias
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    positive = torch.zeros_like(eye) if negative_only else eye
    signed = torch.where(positive, logits, -logits)
    per_example = -F.logsigmoid(signed).sum(dim=1)
    loss = reduce_loss(per_example, sample_weight, reduction)
    ar = torch.arange(logits.shape[0], device=logits.device)
    off = ~eye
    metrics = {
        "loss/siglip": loss,
        "acc/i2t": (logits.argmax(1) == ar).float(),
        "acc/t2i": (logits.argmax(0) == ar).float(),
        "logits/pos": logits.diagonal(),
        "logits/neg": logits[off] if off.any() else logits.new_zeros(0),
        "logit_scale": scale,
        "logit_bias": bias,
    }
    return LossOutput(loss, per_example, detach_metrics(metrics))


def modality_gap(image_features: Tensor, text_features: Tensor, *, normalize: bool = True) -> Tensor:
    """‖mean_i x̂_i − mean_j ŷ_j‖₂ over the **batch** dim, x̂ = x/‖x‖ (Liang et al. 2022, arXiv 2203.02053
    §3). CLIP-Refine logs MSE of the two centroids instead, i.e. this value squared / D; its base updater's
    ``mean(dim=-1)`` variant is a known bug. Image and text counts may differ. Returns a 0-dim tensor."""
    x = _features(image_features, "image_features", normalize)
    y = _features(text_features, "text_features", normalize)
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"feature dims differ: {x.shape[-1]} vs {y.shape[-1]}")
    return (x.mean(0) - y.mean(0)).norm()


def alignment(x: Tensor, y: Tensor, *, alpha: float = 2.0, normalize: bool = False) -> Tensor:
    """E_i ‖x_i − y_i‖^α over positive pairs (Wang & Isola 2020, arXiv 2005.10242 Eq. 4; CLIP-Refine's
    ``align``). Computed from the squared distance so the gradient is finite at x = y for α = 2."""
    _check_range("alpha", alpha, 0.0, math.inf, low_open=True)
    x = _features(x, "x", normalize)
    y = _features(y, "y", normalize)
    check_same_shape(x=x, y=y)
    sq = (x - y).pow(2).sum(-1)
    return (sq if alpha == 2 else sq.pow(alpha / 2)).mean()


def uniformity(x: Tensor, *, t: float = 2.0, normalize: bool = False) -> Tensor:
    """log E_{i<j} exp(−t·‖x_i − x_j‖²) (Wang & Isola 2020, arXiv 2005.10242 Eq. 5; CLIP-Refine's
    ``uniformity`` over image and text embeddings concatenated). Via logsumexp on squared distances, so it
    is finite and differentiable with duplicated points (``torch.pdist`` is not)."""
    _check_range("t", t, 0.0, math.inf, low_open=True)
    x = _features(x, "x", normalize)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 points, got {n}")
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    sq = (x[i] - x[j]).pow(2).sum(-1)
    return torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel())
