"""Evaluation of the policy on a stage's eval set, and the mean of per-batch metrics."""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..methods.task import StageData, Task
from ..schema import TrainConfig
from .reference import Reference
from .stage import collate_with_index


def mean_metrics(items: list[dict]) -> dict[str, float]:
    acc: dict[str, list[float]] = defaultdict(list)
    for m in items:
        for k, v in m.items():
            acc[k].append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items()}


@torch.no_grad()
def evaluate(task: Task, model, data: StageData, reference: Reference, cfg: TrainConfig, accelerator) -> dict:
    """Mean loss and metrics over the eval set (every process evaluates all of it; results are identical).

    Runs under a forked RNG with a fixed seed: methods that sample during scoring (diffusion noise and
    timesteps) get the same draws at every evaluation, and training's random stream is the same whether or
    not (and how often) the run evaluated, which keeps resumed runs exact."""
    if data.eval is None or len(data.eval) == 0:
        return {}
    model.eval()
    bs, rows = cfg.run.batch_size, []
    n_batches = math.ceil(len(data.eval) / bs)
    if cfg.run.eval_batches:
        n_batches = min(n_batches, cfg.run.eval_batches)
    dev = accelerator.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(cfg.run.seed + 104_729)
        for b in range(n_batches):
            idx = list(range(b * bs, min((b + 1) * bs, len(data.eval))))
            batch = collate_with_index(data.collate, data.eval, idx).to(dev)
            with accelerator.autocast():
                pol = model(batch)
                ref = reference.scores(batch) if task.needs_reference else None
                out = task.loss(pol, ref, batch)
            rows.append({"loss": out.loss.item(), **{k: v.item() for k, v in out.metrics.items()}})
    model.train()
    return {f"eval/{k}": v for k, v in mean_metrics(rows).items()}
