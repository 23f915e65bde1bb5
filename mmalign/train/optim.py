"""Optimiser and LR-schedule builders (AdamW, 8-bit AdamW and Adafactor where installed, SGD)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..schema import OptimConfig


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Biases and norm weights get no weight decay (the usual transformers convention).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, lr: float | None = None) -> torch.optim.Optimizer:
    lr = cfg.lr if lr is None else lr
    groups = _param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters: check lora/freeze settings")
    if cfg.name == "adamw":
        # The fused kernel is ~6x faster than the per-tensor loop on CPU (TRL uses it too); it needs
        # floating-point parameters on a device it supports.
        params = [p for g in groups for p in g["params"]]
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        extra = {"fused": True} if fused else {}
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, **extra)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if cfg.name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("optim.name=adamw_8bit needs bitsandbytes (pip install bitsandbytes) and a GPU; "
                              "use optim.name=adamw on CPU") from None
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    raise ValueError(f"optim.name={cfg.name!r} is not one of ['adafactor', 'adamw', 'adamw_8bit', 'sgd']")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if cfg.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
