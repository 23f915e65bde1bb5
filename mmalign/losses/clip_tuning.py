"""CLIP post-pre-training losses: CLIP-Refine's RaFA and HyCD (arXiv 2504.12717), ZSCL feature distillation
and the weight averaging of its weight-ensemble step.

Conventions as in :mod:`mmalign.losses.contrastive` (features ``[N, D]``, already L2-normalised unless
``normalize=True``; ``logit_scale`` already exponentiated). Parity: :func:`hycd` at α=0 == open_clip
``DistillClipLoss.dist_loss`` minus the teacher entropy (KL vs soft-target CE), tested in
``tests/losses/test_contrastive.py``. Notes: research note ``video_audio_clip_prior.md`` §4.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import LossOutput, check_same_shape, detach_metrics, reduce_loss, upcast
from ._contrastive_common import _check_pair, _check_range, _features, _scalar

__all__ = ["rafa", "hycd", "zscl_distill", "average_weights", "update_weight_average"]


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
    tempered. α=1, T=1 gives :func:`~mmalign.losses.contrastive.clip_contrastive`; α=0 is pure KD;
    student == teacher with α=0 gives 0.

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
