"""Shared types and numerics for every loss family.

Conventions (DESIGN.md §4):
- every loss returns :class:`LossOutput` with ``loss`` (reduced scalar), ``per_example`` (``[B]``)
  and ``metrics`` (detached scalars under namespaced keys, TRL's names where TRL has one);
- maths runs in at least float32: bf16/fp16 inputs are upcast, float64 stays float64 so parity tests
  against peers can be run at 1e-6 in double precision;
- probabilities are handled in log space (``logsigmoid``/``logsumexp``) so values and gradients stay
  finite at ``|logit| = 1e4``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "LossOutput",
    "upcast",
    "reduce_loss",
    "detach_metrics",
    "masked_mean",
    "masked_sum",
    "pair_metrics",
    "check_same_shape",
]


@dataclass
class LossOutput:
    """What every loss returns.

    Attributes:
        loss: reduced scalar (mean over examples by default, optionally ``sample_weight``-ed).
        per_example: ``[B]`` loss of each example before reduction (for curricula, reweighting,
            hard-example mining). Carries gradient.
        metrics: flat dict of detached 0-dim tensors under namespaced keys (``rewards/chosen``,
            ``rewards/margins``, ``logps/chosen``, ``loss/<term>``, ...).
    """

    loss: Tensor
    per_example: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def __iter__(self):  # allows ``loss, per_example, metrics = out``
        return iter((self.loss, self.per_example, self.metrics))


def upcast(t: Tensor | None) -> Tensor | None:
    """Half-precision tensors are upcast to float32; float32/float64 are left as they are."""
    if t is None:
        return None
    if not torch.is_tensor(t):
        t = torch.as_tensor(t)
    if t.dtype in (torch.float16, torch.bfloat16) or not t.is_floating_point():
        return t.float()
    return t


def check_same_shape(**tensors: Tensor | None) -> None:
    """Raise a ValueError that prints every shape when the given tensors disagree."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{k}={s}" for k, s in shapes.items())
        raise ValueError(f"shape mismatch: {desc}; these inputs must have the same shape")


def reduce_loss(per_example: Tensor, sample_weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Reduce ``[B]`` per-example losses to a scalar.

    ``reduction`` is ``"mean"`` (weighted mean: Σ w·l / Σ w, so weights only re-balance examples) or
    ``"sum"``. An empty batch or all-zero weights give 0 rather than NaN.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not one of ['mean', 'sum']")
    if sample_weight is None:
        if reduction == "sum":
            return per_example.sum()
        return per_example.sum() / max(per_example.numel(), 1)
    w = upcast(sample_weight).to(per_example.device, per_example.dtype)
    check_same_shape(per_example=per_example, sample_weight=w)
    if reduction == "sum":
        return (w * per_example).sum()
    return (w * per_example).sum() / w.sum().clamp_min(torch.finfo(per_example.dtype).tiny)


def masked_sum(values: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Sum over ``dim`` where ``mask`` is true. Masked entries contribute exactly 0, even if they hold
    inf/NaN (``torch.where`` rather than multiplication, so ``0 * inf`` never appears)."""
    if mask is None:
        return values.sum(dim)
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim)


def masked_mean(values: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Mean over ``dim`` where ``mask`` is true; a fully masked row gives 0 (not NaN)."""
    if mask is None:
        return values.mean(dim)
    count = mask.bool().sum(dim).to(values.dtype)
    return masked_sum(values, mask, dim) / count.clamp_min(1)


def detach_metrics(metrics: Mapping[str, Tensor | float]) -> dict[str, Tensor]:
    """Detach every metric and reduce it to a 0-dim float tensor (mean over its elements)."""
    out: dict[str, Tensor] = {}
    for key, value in metrics.items():
        t = value.detach() if torch.is_tensor(value) else torch.tensor(float(value))
        t = t.float()
        out[key] = t.mean() if t.numel() > 0 else torch.zeros(())
    return out


def pair_metrics(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    policy_chosen_logps: Tensor | None = None,
    policy_rejected_logps: Tensor | None = None,
) -> dict[str, Tensor]:
    """TRL's pairwise metric names: ``rewards/{chosen,rejected,margins,accuracies}`` and
    ``logps/{chosen,rejected}``. Accuracy counts strict wins (TRL's ``chosen > rejected``)."""
    m: dict[str, Tensor] = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
    }
    if policy_chosen_logps is not None:
        m["logps/chosen"] = policy_chosen_logps
    if policy_rejected_logps is not None:
        m["logps/rejected"] = policy_rejected_logps
    return detach_metrics(m)
