"""Feature checks and the pair-indexed InfoNCE rows shared by the contrastive losses (:mod:`.contrastive`,
:mod:`.cavp`, :mod:`.clip_tuning`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import upcast


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
