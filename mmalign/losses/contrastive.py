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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import LossOutput, check_same_shape, detach_metrics, masked_mean, reduce_loss, upcast

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


def _features(x: Tensor, name: str, normalize: bool, ndim: int = 2) -> Tensor:
    x = upcast(x)
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    return F.normalize(x, dim=-1) if normalize else x


def _scalar(value: Tensor | float | None, name: str, like: Tensor, default: float | None = None) -> Tensor:
    if value is None:
        if default is None:
            raise ValueError(f"{name} is required")
        value = default
    t = upcast(torch.as_tensor(value, device=like.device))
    if t.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(t.shape)}")
    return t.reshape(()).to(like.dtype)


def _check_pair(image: Tensor, text: Tensor) -> None:
    if image.shape != text.shape:
        raise ValueError(
            f"image/text features must both be [N, D] with the same N and D, got {tuple(image.shape)} "
            f"and {tuple(text.shape)}"
        )


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    bad = value <= low if low_open else value < low
    if bad or value > high or math.isnan(value):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}={value} is outside the allowed range {bracket}{low}, {high}]")


def _permutation_targets(labels: Tensor | None, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Targets for image→text rows and text→image rows: image i is paired with text ``labels[i]``."""
    if labels is None:
        ar = torch.arange(n, device=device)
        return ar, ar
    labels = torch.as_tensor(labels, device=device)
    if labels.shape != (n,) or labels.is_floating_point():
        got = f"{labels.dtype} {tuple(labels.shape)}"
        raise ValueError(f"labels must be an integer tensor of shape ({n},), got {got}")
    if not torch.equal(labels.sort().values, torch.arange(n, device=device)):
        raise ValueError("labels must be a permutation of 0..N-1 (one positive text per image)")
    return labels.long(), torch.argsort(labels)


def _clip_rows(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, labels: Tensor | None):
    """Pair-indexed symmetric InfoNCE: row i = ½(CE_i2t[i] + CE_t2i[labels[i]])."""
    logits_i2t = scale * image @ text.T
    logits_t2i = scale * text @ image.T  # computed, not transposed, exactly as open_clip's single process
    if bias is not None:
        logits_i2t = logits_i2t + bias
        logits_t2i = logits_t2i + bias
    tgt_i2t, tgt_t2i = _permutation_targets(labels, image.shape[0], image.device)
    ce_i2t = F.cross_entropy(logits_i2t, tgt_i2t, reduction="none")
    ce_t2i = F.cross_entropy(logits_t2i, tgt_t2i, reduction="none")
    rows = 0.5 * (ce_i2t + ce_t2i[tgt_i2t])
    acc_i2t = (logits_i2t.argmax(-1) == tgt_i2t).float()
    acc_t2i = (logits_t2i.argmax(-1) == tgt_t2i).float()
    return rows, acc_i2t, acc_t2i


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


_RAFA_DISTANCES = ("mse", "l2")


def rafa(
    image_features: Tensor,
    text_features: Tensor,
    *,
    targets: Tensor | None = None,
    text_targets: Tensor | None = None,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    share_targets: bool = True,
    distance: str = "mse",
    normalize: bool = False,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """RaFA, random feature alignment of CLIP-Refine (Yamaguchi et al., CVPR 2025, arXiv 2504.12717).

    Targets r ~ N(mean, std²)^{N×D}, drawn fresh per call from ``generator`` (or passed as ``targets``),
    shared by the image and the text of a pair (``share_targets``). Pulls both modalities toward one
    random prior sample instead of toward each other.
    - ``distance="mse"`` (default; the code, ``RandRegUpdater`` with ``strategy=std_sample``):
      L = MSE(f_i, r) + MSE(f_t, r), element means (1/(N·D)), no ½; per-example = mean_d (f_i−r)² +
      mean_d (f_t−r)².
    - ``distance="l2"`` (the paper's formula [summary, unverified]): per-example = ½(‖f_i−r‖² + ‖f_t−r‖²).
    The reference applies this to the raw, **unnormalised** encoder outputs. ``normalize=True`` (not in the
    reference) L2-normalises features and targets alike (a normalised Gaussian is uniform on the sphere).
    ``share_targets=False`` draws separate text targets (the reference's branch for it is broken).
    Metrics: ``loss/rafa``, ``rafa/image``, ``rafa/text``.
    """
    if distance not in _RAFA_DISTANCES:
        raise ValueError(f"distance={distance!r} is not one of {sorted(_RAFA_DISTANCES)}")
    _check_range("std", std, 0.0, math.inf)
    image = _features(image_features, "image_features", normalize)
    text = _features(text_features, "text_features", normalize)
    _check_pair(image, text)
    if targets is None:
        if text_targets is not None:
            raise ValueError("text_targets needs targets (the image targets) as well")
        targets = _sample_prior(image, generator, mean, std)
        if not share_targets:
            text_targets = _sample_prior(image, generator, mean, std)
    r_img = upcast(targets).detach().to(device=image.device, dtype=image.dtype)
    r_txt = r_img if text_targets is None else upcast(text_targets).detach().to(image.device, image.dtype)
    check_same_shape(image_features=image, targets=r_img, text_targets=r_txt)
    if normalize:
        r_img, r_txt = F.normalize(r_img, dim=-1), F.normalize(r_txt, dim=-1)
    if distance == "mse":
        d_img = (image - r_img).pow(2).mean(-1)
        d_txt = (text - r_txt).pow(2).mean(-1)
    else:
        d_img = 0.5 * (image - r_img).pow(2).sum(-1)
        d_txt = 0.5 * (text - r_txt).pow(2).sum(-1)
    per_example = d_img + d_txt
    loss = reduce_loss(per_example, sample_weight, reduction)
    metrics = {"loss/rafa": loss, "rafa/image": d_img, "rafa/text": d_txt}
    return LossOutput(loss, per_example, detach_metrics(metrics))


def _sample_prior(like: Tensor, generator: torch.Generator | None, mean: float, std: float) -> Tensor:
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return (noise * std + mean).to(like.device)


def _soft_kd_rows(student_logits: Tensor, target_probs: Tensor, temperature: float, kl: bool) -> Tensor:
    """T²·Σ_j p_j·(log p_j − log q_j) per row (KL), or T²·(−Σ_j p_j log q_j) (soft-target CE)."""
    log_q = (student_logits / temperature).log_softmax(-1)
    rows = -(target_probs * log_q).sum(-1)
    if kl:
        rows = rows + torch.xlogy(target_probs, target_probs).sum(-1)  # xlogy: 0·log 0 = 0
    return rows * temperature**2


def hycd(
    student_image_features: Tensor,
    student_text_features: Tensor,
    teacher_image_features: Tensor,
    teacher_text_features: Tensor,
    logit_scale: Tensor | float | None = None,
    *,
    teacher_logit_scale: Tensor | float | None = None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    normalize: bool = False,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """HyCD, hybrid contrastive-distillation of CLIP-Refine (arXiv 2504.12717; code ``distill``/``kd_loss``).

    For each direction (image→text rows of y = s·f_i·f_tᵀ, text→image rows of its transpose):
    p = α·onehot(pair) + (1−α)·softmax(y_teacher/T); L_dir = T²·KL(p ‖ softmax(y_student/T)), mean over rows
    (``batchmean``); L = ½(L_i2t + L_t2i). Per-example = ½(KL_i2t[i] + KL_t2i[i]). The one-hot is not
    tempered. α=1, T=1 gives :func:`clip_contrastive`; α=0 is pure KD; student == teacher with α=0 gives 0.

    Reference code uses raw dot products of **unnormalised** features with no logit scale:
    ``logit_scale=None`` means s=1, which is that. ``teacher_logit_scale`` defaults to ``logit_scale``.
    Teacher logits are detached (the reference computes them under ``no_grad``). Defaults α=0.5, T=1 as in
    the CLIP-Refine config/class. Whether the paper uses scaled cosine logits instead is unverified.
    Metrics: ``loss/hycd``, ``hycd/i2t``, ``hycd/t2i``, ``acc/i2t``, ``acc/t2i``.
    """
    _check_range("alpha", alpha, 0.0, 1.0)
    _check_range("temperature", temperature, 0.0, math.inf, low_open=True)
    s_img = _features(student_image_features, "student_image_features", normalize)
    s_txt = _features(student_text_features, "student_text_features", normalize)
    t_img = _features(teacher_image_features, "teacher_image_features", normalize).detach()
    t_txt = _features(teacher_text_features, "teacher_text_features", normalize).detach()
    _check_pair(s_img, s_txt)
    _check_pair(t_img, t_txt)
    if s_img.shape[0] != t_img.shape[0]:
        raise ValueError(f"student and teacher batch sizes differ: {s_img.shape[0]} vs {t_img.shape[0]}")
    scale = _scalar(logit_scale, "logit_scale", s_img, default=1.0)
    t_scale = scale
    if teacher_logit_scale is not None:
        t_scale = _scalar(teacher_logit_scale, "teacher_logit_scale", t_img)
    y_s = scale * s_img @ s_txt.T
    y_t = t_scale.detach() * t_img @ t_txt.T
    eye = torch.eye(y_s.shape[0], dtype=y_s.dtype, device=y_s.device)
    kd = []
    for student, teacher in ((y_s, y_t), (y_s.T, y_t.T)):
        target = alpha * eye + (1 - alpha) * (teacher / temperature).softmax(-1)
        kd.append(_soft_kd_rows(student, target, temperature, kl=True))
    per_example = 0.5 * (kd[0] + kd[1])
    loss = reduce_loss(per_example, sample_weight, reduction)
    ar = torch.arange(y_s.shape[0], device=y_s.device)
    metrics = {
        "loss/hycd": loss,
        "hycd/i2t": kd[0],
        "hycd/t2i": kd[1],
        "acc/i2t": (y_s.argmax(1) == ar).float(),
        "acc/t2i": (y_s.argmax(0) == ar).float(),
    }
    return LossOutput(loss, per_example, detach_metrics(metrics))


_ZSCL_DIVERGENCES = ("ce", "kl")


def zscl_distill(
    image_features: Tensor,
    ref_image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    temperature: float = 2.0,
    image_weight: float = 1.0,
    text_weight: float = 0.0,
    divergence: str = "ce",
    normalize: bool = False,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """ZSCL feature-space distillation (Zheng et al., arXiv 2303.06628 [id recalled]; code ``distillation``).

    On reference images x (ImageNet) and reference texts (Conceptual Captions) whose embeddings come from
    the frozen reference model in **both** branches: y_cur = s·f_cur(x)·tᵀ, y_ref = s·f_ref(x)·tᵀ ([N, M]).
    Image term per reference image i: T²·CE(y_cur[i]/T, softmax(y_ref[i]/T)), T = 2 by default. The text term
    (ZSCL ``--text_loss``) is the same on the transposes (a softmax over the N images, mean over texts); it
    is a batch-level quantity, added to every example's value. L = image_weight·L_img + text_weight·L_txt
    (ZSCL: 1 and 1, or 0.5 each with ``--weight_adjust``).
    ``divergence="ce"`` is the reference (soft-target CE, which equals T²·H(teacher) at cur == ref, with zero
    gradient); ``"kl"`` subtracts the teacher entropy (same gradient, 0 at cur == ref).
    ZSCL L2-normalises all three embeddings: pass normalised features or ``normalize=True``. Reference-model
    logits are detached. Metrics: ``loss/zscl``, ``zscl/image``, ``zscl/text``.
    """
    if divergence not in _ZSCL_DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is not one of {sorted(_ZSCL_DIVERGENCES)}")
    _check_range("temperature", temperature, 0.0, math.inf, low_open=True)
    cur = _features(image_features, "image_features", normalize)
    ref = _features(ref_image_features, "ref_image_features", normalize).detach()
    text = _features(text_features, "text_features", normalize)
    check_same_shape(image_features=cur, ref_image_features=ref)
    if text.shape[-1] != cur.shape[-1]:
        raise ValueError(f"text_features dim {text.shape[-1]} != image_features dim {cur.shape[-1]}")
    scale = _scalar(logit_scale, "logit_scale", cur)
    y_cur = scale * cur @ text.T
    y_ref = (scale * ref @ text.T).detach()
    kl = divergence == "kl"
    img_rows = _soft_kd_rows(y_cur, (y_ref / temperature).softmax(-1), temperature, kl)
    txt_rows = _soft_kd_rows(y_cur.T, (y_ref.T / temperature).softmax(-1), temperature, kl)
    per_example = image_weight * img_rows + text_weight * txt_rows.mean()
    loss = reduce_loss(per_example, sample_weight, reduction)
    metrics = {"loss/zscl": loss, "zscl/image": img_rows, "zscl/text": txt_rows}
    return LossOutput(loss, per_example, detach_metrics(metrics))


def _check_state_dicts(state_dicts: Sequence[Mapping[str, Tensor]]) -> None:
    if len(state_dicts) == 0:
        raise ValueError("need at least one state dict")
    keys = set(state_dicts[0])
    for k, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != keys:
            diff = sorted(keys.symmetric_difference(sd))[:5]
            raise ValueError(f"state dict {k} has different keys from state dict 0, e.g. {diff}")
        for name in keys:
            if tuple(sd[name].shape) != tuple(state_dicts[0][name].shape):
                raise ValueError(
                    f"{name!r}: shape {tuple(sd[name].shape)} in state dict {k} != "
                    f"{tuple(state_dicts[0][name].shape)} in state dict 0"
                )


@torch.no_grad()
def average_weights(
    state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None
) -> dict[str, Tensor]:
    """Weighted arithmetic mean Σ_k w_k·θ_k / Σ_k w_k of state dicts (uniform by default): model soups,
    WiSE-FT (``[θ_ft, θ_0]`` with weights ``[α, 1−α]``), or the SMA of a list of snapshots.

    Computed in ≥fp32, returned in each entry's original dtype; non-floating entries (counters) are taken
    from the first dict. Returns new tensors, never aliases of the inputs.
    """
    _check_state_dicts(state_dicts)
    if weights is None:
        weights = [1.0] * len(state_dicts)
    if len(weights) != len(state_dicts) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"weights={list(weights)} must be {len(state_dicts)} non-negative numbers with a positive sum"
        )
    total = float(sum(weights))
    out: dict[str, Tensor] = {}
    for name, first in state_dicts[0].items():
        if not first.is_floating_point():
            out[name] = first.detach().clone()
            continue
        pairs = zip(weights, state_dicts, strict=True)
        acc = sum(float(w) * upcast(sd[name].detach()).to(first.device) for w, sd in pairs)
        out[name] = (acc / total).to(first.dtype)
    return out


@torch.no_grad()
def update_weight_average(
    average: Mapping[str, Tensor],
    current: Mapping[str, Tensor],
    count: int,
    *,
    anchor: Mapping[str, Tensor] | None = None,
    wise_alpha: float = 1.0,
) -> dict[str, Tensor]:
    """One step of ZSCL's weight ensemble (``merge_we`` / ``wise_we``; ZSCL runs it every ``avg_freq`` = 100
    iterations with count = 1, 2, ...).

    θ_we ← (count·θ_we + θ)/(count + 1); with ``anchor`` θ_0 (WiSE variant, ZSCL default α = 0.98 via
    ``--we_wise_alpha``): θ_we ← α·that + (1−α)·θ_0, applied at every step as in the reference (so the
    anchor's share compounds). Starting from θ_we = θ_init, after n steps with counts 1..n and no anchor θ_we
    is the mean of the n+1 snapshots. Pure: returns a new dict.
    """
    if count < 0:
        raise ValueError(f"count={count} must be >= 0 (the number of snapshots already averaged, minus one)")
    _check_range("wise_alpha", wise_alpha, 0.0, 1.0)
    sma = average_weights([average, current], [float(count), 1.0])
    if anchor is None:
        return sma
    return average_weights([sma, anchor], [wise_alpha, 1.0 - wise_alpha])


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
