"""CAVP (Diff-Foley, Luo et al. 2023, arXiv 2306.17203): the contrastive audio-visual pre-training objective,
semantic (inter-video) InfoNCE plus intra-video/temporal InfoNCE over groups of clips ``[B, C, D]``.

Conventions as in :mod:`mmalign.losses.contrastive` (features already L2-normalised unless ``normalize=True``,
``logit_scale`` already exponentiated). Notes: research note ``video_audio_clip_prior.md`` §2.3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import LossOutput, detach_metrics, masked_mean, reduce_loss
from ._contrastive_common import _clip_rows, _features, _scalar

__all__ = ["cavp_intra_contrastive", "cavp_loss"]


def _intra_rows(video: Tensor, audio: Tensor, scale: Tensor, mask: Tensor | None):
    """Per-clip ½(CE_v2a + CE_a2v) inside each group of C clips: [B, C] losses and accuracies."""
    logits_va = scale * video @ audio.transpose(1, 2)  # [B, C, C]: video clip a vs audio clip b
    logits_av = logits_va.transpose(1, 2)
    if mask is not None:
        # Masked clips are removed as candidates; finfo.min (not -inf) keeps fully masked groups NaN-free.
        col = mask[:, None, :]
        neg = torch.finfo(logits_va.dtype).min
        logits_va = torch.where(col, logits_va, neg)
        logits_av = torch.where(col, logits_av, neg)
    ce_va = -torch.diagonal(logits_va.log_softmax(-1), dim1=-2, dim2=-1)
    ce_av = -torch.diagonal(logits_av.log_softmax(-1), dim1=-2, dim2=-1)
    rows = 0.5 * (ce_va + ce_av)
    ar = torch.arange(video.shape[1], device=video.device)
    acc_va = (logits_va.argmax(-1) == ar).float()
    acc_av = (logits_av.argmax(-1) == ar).float()
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    return rows, acc_va, acc_av


def _clip_groups(video: Tensor, audio: Tensor, mask: Tensor | None, normalize: bool):
    """Upcast and check [B, C, D] clip features; zero masked clips *before* any arithmetic, because a
    NaN/inf there would otherwise reach valid clips' gradients through the matmul (0·inf)."""
    video = _features(video, "video_clip_features", False, ndim=3)
    audio = _features(audio, "audio_clip_features", False, ndim=3)
    if video.shape != audio.shape:
        raise ValueError(
            "video/audio clip features must both be [B, C, D], "
            f"got {tuple(video.shape)} and {tuple(audio.shape)}"
        )
    if mask is not None:
        mask = torch.as_tensor(mask, device=video.device)
        if mask.shape != video.shape[:2]:
            want = tuple(video.shape[:2])
            raise ValueError(f"mask must have shape {want} ([B, C]), got {tuple(mask.shape)}")
        mask = mask.bool()
        zero = torch.zeros((), dtype=video.dtype, device=video.device)
        video = torch.where(mask[..., None], video, zero)
        audio = torch.where(mask[..., None], audio, zero)
    if normalize:
        video, audio = F.normalize(video, dim=-1), F.normalize(audio, dim=-1)
    return video, audio, mask


def cavp_intra_contrastive(
    video_clip_features: Tensor,
    audio_clip_features: Tensor,
    logit_scale: Tensor | float,
    *,
    mask: Tensor | None = None,
    normalize: bool = False,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """CAVP intra-video contrast (Diff-Foley, Luo et al. 2023, arXiv 2306.17203; Eq. number unverified).

    Inputs ``[B, C, D]``: C temporally shifted clips (or C time steps) of each of B videos. Within video b,
    logits = s·V_b·A_bᵀ (C×C) and every clip must pick its own audio among the other clips of the same
    video: per-clip ½[CE(logits, arange C) + CE(logitsᵀ, arange C)]; per-example = mean over the clips of a
    video; C = 1 gives 0.

    Reference: Diff-Foley ``ClipLoss_Intra_Contrast`` intra term (the flat batch of B·C clips laid out as
    contiguous groups, the C×C diagonal blocks of the B·C logits: pass ``flat.view(B, C, D)``), which is also
    the temporal term of ``ClipLoss_Temporal_Semantic`` (per-sample T×T, label = same time index). Equal to
    it for equal-size groups. Deviation: ``mask`` ([B, C], True = valid) removes clips as queries and as
    candidates; each video then weighs equally (mean over its valid clips); fully masked videos give 0.
    The bias-masked ``ClipLoss_Temporal_Semantic_Bias`` variant is not implemented.
    Metrics: ``loss/cavp_intra``, ``acc/intra_v2a``, ``acc/intra_a2v``, ``logit_scale``.
    """
    video, audio, mask = _clip_groups(video_clip_features, audio_clip_features, mask, normalize)
    scale = _scalar(logit_scale, "logit_scale", video)
    rows, acc_va, acc_av = _intra_rows(video, audio, scale, mask)
    per_example = masked_mean(rows, mask, dim=-1)
    loss = reduce_loss(per_example, sample_weight, reduction)
    valid = torch.ones_like(rows, dtype=torch.bool) if mask is None else mask
    metrics = {
        "loss/cavp_intra": loss,
        "acc/intra_v2a": acc_va[valid],
        "acc/intra_a2v": acc_av[valid],
        "logit_scale": scale,
    }
    return LossOutput(loss, per_example, detach_metrics(metrics))


_CAVP_SEMANTIC = ("clips", "mean")


def cavp_loss(
    video_clip_features: Tensor,
    audio_clip_features: Tensor,
    logit_scale: Tensor | float,
    *,
    semantic: str = "clips",
    semantic_weight: float = 1.0,
    intra_weight: float = 1.0,
    video_pooled_features: Tensor | None = None,
    audio_pooled_features: Tensor | None = None,
    mask: Tensor | None = None,
    normalize: bool = False,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """CAVP objective: semantic (inter-video) InfoNCE + intra-video/temporal InfoNCE (Diff-Foley,
    arXiv 2306.17203; the paper's equation numbers are unverified, the form follows the code).

    L = semantic_weight·L_sem + intra_weight·L_intra, with L_intra = :func:`cavp_intra_contrastive` and
    - ``semantic="clips"`` (``ClipLoss_Intra_Contrast``, used by the released launch script with weight 1):
      L_sem = CLIP InfoNCE over all B·C clips flattened, so other clips of the same video are negatives too;
    - ``semantic="mean"`` (``ClipLoss_Temporal_Semantic``; class default weight 0.5, the script passes 1):
      L_sem = CLIP InfoNCE over per-video pooled features. In Diff-Foley the model supplies them; pass
      ``video_pooled_features``/``audio_pooled_features`` ([B, D]) to do the same. Without them, the (masked)
      mean over clips is used and re-normalised [inferred; not in the reference].
    Per-example (video b) = semantic_weight·(mean over b's clip rows, or b's pooled row) +
    intra_weight·(b's intra term); the mean over videos equals the reference loss for unmasked inputs.
    With ``mask``, masked clips are dropped from the flat batch (``"clips"``) or the pooling (``"mean"``),
    and a fully masked video contributes exactly 0.
    Metrics: ``loss/cavp``, ``loss/cavp_semantic``, ``loss/cavp_intra``, ``logit_scale``.
    """
    if semantic not in _CAVP_SEMANTIC:
        raise ValueError(f"semantic={semantic!r} is not one of {sorted(_CAVP_SEMANTIC)}")
    video, audio, mask = _clip_groups(video_clip_features, audio_clip_features, mask, normalize)
    scale = _scalar(logit_scale, "logit_scale", video)
    b, c, d = video.shape
    if semantic == "clips":
        if video_pooled_features is not None or audio_pooled_features is not None:
            raise ValueError("pooled features are used only with semantic='mean'")
        valid = torch.ones(b, c, dtype=torch.bool, device=video.device) if mask is None else mask
        flat_rows, _, _ = _clip_rows(video[valid], audio[valid], scale, None, None)
        rows = flat_rows.new_zeros(b, c).masked_scatter(valid, flat_rows)
        semantic_pe = masked_mean(rows, mask, dim=-1)
    else:
        if (video_pooled_features is None) != (audio_pooled_features is None):
            raise ValueError("pass both video_pooled_features and audio_pooled_features, or neither")
        if video_pooled_features is None:
            pooled_v = F.normalize(_masked_pool(video, mask), dim=-1)
            pooled_a = F.normalize(_masked_pool(audio, mask), dim=-1)
        else:
            pooled_v = _features(video_pooled_features, "video_pooled_features", normalize)
            pooled_a = _features(audio_pooled_features, "audio_pooled_features", normalize)
            if pooled_v.shape != (b, d) or pooled_a.shape != (b, d):
                raise ValueError(
                    f"pooled features must be [B, D] = {(b, d)}, "
                    f"got {tuple(pooled_v.shape)}, {tuple(pooled_a.shape)}"
                )
        # A fully masked video has no pooled feature: it is neither a query nor a negative.
        has_clip = torch.ones(b, dtype=torch.bool, device=video.device) if mask is None else mask.any(1)
        kept_rows, _, _ = _clip_rows(pooled_v[has_clip], pooled_a[has_clip], scale, None, None)
        semantic_pe = kept_rows.new_zeros(b).masked_scatter(has_clip, kept_rows)
    intra_rows, _, _ = _intra_rows(video, audio, scale, mask)
    intra_pe = masked_mean(intra_rows, mask, dim=-1)
    per_example = semantic_weight * semantic_pe + intra_weight * intra_pe
    loss = reduce_loss(per_example, sample_weight, reduction)
    metrics = {
        "loss/cavp": loss,
        "loss/cavp_semantic": reduce_loss(semantic_pe, sample_weight, reduction),
        "loss/cavp_intra": reduce_loss(intra_pe, sample_weight, reduction),
        "logit_scale": scale,
    }
    return LossOutput(loss, per_example, detach_metrics(metrics))


def _masked_pool(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return x.mean(1)
    keep = mask[..., None]
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(1)
    return total / keep.sum(1).clamp_min(1).to(x.dtype)
