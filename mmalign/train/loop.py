"""The one training loop, shared by every method and modality.

A method recipe builds a :class:`Task` (model + data + adapter + loss); :func:`fit` runs it: stages →
(micro-batches → adapter scores → reference scores → loss → backward) × grad_accum → clip → step → log →
evaluate → checkpoint. Distribution (DDP, FSDP, DeepSpeed) is accelerate's; mixed precision is accelerate's
autocast while every loss computes in fp32.

Exact resume: data order comes from :class:`~mmalign.train.data_order.BatchOrder` (seeded per epoch, position
saved), RNG/optimizer/model states from ``accelerator.save_state``, and the scheduler, loop position and
moving-reference weights from our own files in the same atomic checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..adapters.base import Scores
from ..losses import LossOutput
from ..schema import StageConfig, TrainConfig
from . import checkpoint as ckpt
from .data_order import BatchOrder
from .metrics_log import MetricsLogger
from .optim import build_optimizer, build_scheduler
from .reference import (
    AdapterReference,
    CopyReference,
    MovingReference,
    PrecomputedReference,
    Reference,
)

log = logging.getLogger(__name__)


@dataclass
class StageData:
    """What a task hands the loop for one stage."""

    train: Any  # a sequence of examples (torch Dataset)
    collate: Any  # list[example] -> batch with .to(device) and .extras
    eval: Any = None
    aux: Any = None  # e.g. the retain set of an unlearning run
    stats: dict = field(default_factory=dict)
    key: str = ""  # content hash, for reference-score caching


class Task(Protocol):
    """A method recipe instantiated for a run. ``model`` is the policy being trained."""

    model: nn.Module
    needs_reference: bool

    def stage_data(self, stage: StageConfig) -> StageData: ...

    def configure_stage(self, stage: StageConfig) -> None: ...

    def score(self, model: nn.Module, batch) -> Scores: ...

    def loss(self, policy: Scores, reference: Scores | None, batch, aux: Scores | None = None) -> LossOutput: ...

    def save_pretrained(self, model: nn.Module, path: Path) -> None: ...

    def merge_lora(self) -> None: ...


class _Scorer(nn.Module):
    """Runs the adapter inside ``forward`` so that DDP/FSDP wrappers see a normal forward call (their gradient
    hooks and parameter gathering are tied to it), even though adapters call submodules directly."""

    def __init__(self, model: nn.Module, score_fn):
        super().__init__()
        self.model = model
        self._score_fn = score_fn

    def forward(self, batch) -> Scores:
        return self._score_fn(self.model, batch)


def resolve_stages(cfg: TrainConfig) -> list[StageConfig]:
    if cfg.stages:
        return cfg.stages
    return [StageConfig(name="main", max_steps=cfg.run.max_steps, epochs=None if cfg.run.max_steps else cfg.run.epochs)]


def _stage_steps(stage: StageConfig, cfg: TrainConfig, order: BatchOrder) -> int:
    if stage.max_steps:
        return stage.max_steps
    epochs = stage.epochs if stage.epochs is not None else cfg.run.epochs
    per_epoch = order.batches_per_epoch // cfg.run.grad_accum
    return max(1, math.ceil(epochs * per_epoch))


def _collate_with_index(collate, dataset, indices: list[int]):
    batch = collate([dataset[i] for i in indices])
    batch.extras["index"] = torch.tensor(indices, dtype=torch.long)
    return batch


class _Batches:
    """Infinite iterator of collated batches over a BatchOrder."""

    def __init__(self, dataset, collate, order: BatchOrder, device):
        self.dataset, self.collate, self.order, self.device = dataset, collate, order, device

    def __next__(self):
        return _collate_with_index(self.collate, self.dataset, self.order.next_indices()).to(self.device)


def _make_reference(task: Task, cfg: TrainConfig) -> Reference:
    strategy = cfg.reference.strategy
    if not task.needs_reference:
        return Reference()
    if strategy == "none":
        raise ValueError(f"loss {cfg.loss.name!r} needs a reference model; reference.strategy=none is for "
                         "reference-free losses (simpo, cpo, orpo, slic, simnpo, sft, rm)")
    if strategy == "auto":
        strategy = "adapter" if cfg.lora.enabled else "copy"
    if strategy == "copy":
        return CopyReference(task.model, task.score)
    if strategy == "adapter":
        return AdapterReference(task.model, task.score)
    if strategy in ("sync", "ema"):
        r = cfg.reference
        return MovingReference(task.model, task.score, mode=strategy, sync_every=r.sync_every, alpha=r.sync_alpha,
                               ema_decay=r.ema_decay)
    if strategy == "precomputed":
        return PrecomputedReference(cfg.reference.cache_dir or Path(cfg.run.output_dir) / "ref_cache", data_key="")
    raise ValueError(f"unknown reference.strategy={strategy!r}")


def _precompute(ref: PrecomputedReference, task: Task, data, collate, key: str, cfg: TrainConfig, accelerator,
                split: str) -> PrecomputedReference:
    """Score the whole dataset once with the current policy (adapter disabled with LoRA) and cache it."""
    out = PrecomputedReference(ref.cache_dir, data_key=f"{split}:{key}")
    bs = cfg.run.batch_size
    batches = (_collate_with_index(collate, data, list(range(i, min(i + bs, len(data)))))
               for i in range(0, len(data), bs))
    out.build(task.model, task.score, batches, adapter_disabled=cfg.lora.enabled, device=accelerator.device)
    return out


def _mean_metrics(items: list[dict]) -> dict[str, float]:
    acc: dict[str, list[float]] = defaultdict(list)
    for m in items:
        for k, v in m.items():
            acc[k].append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items()}


@torch.no_grad()
def evaluate(task: Task, model, data: StageData, reference: Reference, cfg: TrainConfig, accelerator) -> dict:
    if data.eval is None or len(data.eval) == 0:
        return {}
    model.eval()
    bs, rows = cfg.run.batch_size, []
    n_batches = math.ceil(len(data.eval) / bs)
    if cfg.run.eval_batches:
        n_batches = min(n_batches, cfg.run.eval_batches)
    for b in range(n_batches):
        idx = list(range(b * bs, min((b + 1) * bs, len(data.eval))))
        batch = _collate_with_index(data.collate, data.eval, idx).to(accelerator.device)
        with accelerator.autocast():
            pol = model(batch)
            ref = reference.scores(batch) if task.needs_reference else None
            out = task.loss(pol, ref, batch)
        rows.append({"loss": out.loss.item(), **{k: v.item() for k, v in out.metrics.items()}})
    model.train()
    return {f"eval/{k}": v for k, v in _mean_metrics(rows).items()}


def fit(task: Task, cfg: TrainConfig, accelerator=None) -> dict:
    """Train ``task`` under ``cfg``; returns a summary (final metrics, paths, timings)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out_dir = Path(cfg.run.output_dir)
    accelerator = accelerator or Accelerator(mixed_precision=cfg.run.mixed_precision,
                                             gradient_accumulation_steps=cfg.run.grad_accum)
    set_seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    stages = resolve_stages(cfg)
    resume_from = ckpt.find_resume_checkpoint(out_dir, cfg.run.resume)
    resume_state = ckpt.read_state(resume_from) if resume_from else None
    logger = MetricsLogger(out_dir, cfg.run.report_to, enabled=accelerator.is_main_process)
    reference = _make_reference(task, cfg)
    global_step, summary, t0 = 0, {"stages": []}, time.time()
    last_eval: dict = {}

    for stage_idx, stage in enumerate(stages):
        if resume_state and stage_idx < resume_state["stage_idx"]:
            global_step += resume_state["stage_steps"][stage_idx]
            summary["stages"].append({"name": stage.name, "skipped_on_resume": True})
            continue  # finished before the interruption; its effect is in the checkpointed weights
        if stage_idx > 0 and stage.merge_lora:
            task.merge_lora()
            if isinstance(reference, AdapterReference):
                reference = AdapterReference(task.model, task.score)
        task.configure_stage(stage)
        data = task.stage_data(stage)
        if accelerator.is_main_process and data.stats:
            logger.log(global_step, {}, event="data", stage=stage.name, **data.stats)
        if stage_idx > 0 and stage.reanchor_reference:
            reference.reanchor(task.model)

        order = BatchOrder(len(data.train), cfg.run.batch_size, seed=cfg.run.seed + 7919 * stage_idx,
                           world_size=accelerator.num_processes, rank=accelerator.process_index)
        n_steps = _stage_steps(stage, cfg, order)
        aux_order = None
        if data.aux is not None:
            aux_order = BatchOrder(len(data.aux), cfg.run.batch_size, seed=cfg.run.seed + 1,
                                   world_size=accelerator.num_processes, rank=accelerator.process_index)

        accelerator._models.clear()  # one model/optimizer pair per stage (a LoRA merge changes the parameters)
        accelerator._optimizers.clear()
        optimizer = build_optimizer(task.model, cfg.optim, lr=stage.lr)
        scheduler = build_scheduler(optimizer, cfg.optim, n_steps)
        model, optimizer = accelerator.prepare(_Scorer(task.model, task.score), optimizer)

        eval_ref = reference
        if isinstance(reference, PrecomputedReference):
            reference = _precompute(reference, task, data.train, data.collate, data.key, cfg, accelerator, "train")
            if data.eval is not None:
                eval_ref = _precompute(reference, task, data.eval, data.collate, data.key, cfg, accelerator, "eval")
            summary["reference_cache_reused"] = reference.reused

        step_in_stage = 0
        if resume_state and stage_idx == resume_state["stage_idx"]:
            extra = ckpt.load_checkpoint(accelerator, resume_from)
            scheduler.load_state_dict(extra["scheduler"])
            reference.load_state_dict(extra.get("reference", {}))
            order.load_state_dict(resume_state["order"])
            if aux_order is not None and resume_state.get("aux_order"):
                aux_order.load_state_dict(resume_state["aux_order"])
            step_in_stage = resume_state["step_in_stage"]
            global_step = resume_state["global_step"]
            logger.log(global_step, {}, event="resumed", checkpoint=str(resume_from))
            resume_state = None

        batches = _Batches(data.train, data.collate, order, accelerator.device)
        aux_batches = _Batches(data.aux, data.collate, aux_order, accelerator.device) if aux_order else None
        progress = _progress(cfg, accelerator, n_steps, step_in_stage, stage.name)
        model.train()
        while step_in_stage < n_steps:
            step_metrics = []
            for _ in range(cfg.run.grad_accum):
                batch = next(batches)
                aux_batch = next(aux_batches) if aux_batches else None
                with accelerator.accumulate(model), accelerator.autocast():
                    pol = model(batch)
                    ref = reference.scores(batch) if task.needs_reference else None
                    aux = model(aux_batch) if aux_batch is not None else None
                    out = task.loss(pol, ref, batch, aux)
                    if not torch.isfinite(out.loss):
                        raise FloatingPointError(
                            f"non-finite loss {out.loss.item()} at step {global_step + 1} (stage {stage.name!r}); "
                            "lower optim.lr, enable optim.max_grad_norm, or check the data")
                    accelerator.backward(out.loss)
                    grad_norm = None
                    if accelerator.sync_gradients and cfg.optim.max_grad_norm:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_metrics.append({"loss": out.loss.detach(), **out.metrics})
            scheduler.step()
            step_in_stage += 1
            global_step += 1
            reference.after_step(global_step, task.model)

            metrics = _mean_metrics([{k: float(v) for k, v in m.items()} for m in step_metrics])
            metrics = {k: _reduce(accelerator, v) for k, v in metrics.items()}
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            metrics["lr"] = scheduler.get_last_lr()[0]
            if progress is not None:
                progress.update(1)
                progress.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "rewards/accuracies") if k in metrics})
            if global_step % cfg.run.log_every == 0 or step_in_stage == n_steps:
                logger.log(global_step, metrics, stage=stage.name, epoch=order.epoch)
            if cfg.run.eval_every and global_step % cfg.run.eval_every == 0:
                last_eval = evaluate(task, model, data, eval_ref, cfg, accelerator)
                logger.log(global_step, last_eval, stage=stage.name)
            if cfg.run.save_every and global_step % cfg.run.save_every == 0:
                state = {"global_step": global_step, "stage_idx": stage_idx, "step_in_stage": step_in_stage,
                         "stage_steps": summary.get("stage_steps", []) + [n_steps],
                         "order": order.state_dict(), "aux_order": aux_order.state_dict() if aux_order else None}
                ckpt.save_checkpoint(accelerator, out_dir, global_step, state, keep_last=cfg.run.keep_last,
                                     extra={"scheduler": scheduler.state_dict(), "reference": reference.state_dict()})
        if progress is not None:
            progress.close()
        summary.setdefault("stage_steps", []).append(n_steps)
        last_eval = evaluate(task, model, data, eval_ref, cfg, accelerator) or last_eval
        if last_eval:
            logger.log(global_step, last_eval, stage=stage.name)
        summary["stages"].append({"name": stage.name, "steps": n_steps, "final": metrics, "eval": last_eval})

    accelerator.wait_for_everyone()
    if cfg.run.save_final and accelerator.is_main_process:
        final = out_dir / "final"
        task.save_pretrained(task.model, final)
        summary["final_model"] = str(final)
    logger.close()
    summary.update(global_step=global_step, seconds=round(time.time() - t0, 2), output_dir=str(out_dir),
                   metrics_file=str(logger.path))
    return summary


def _reduce(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor(value, device=accelerator.device, dtype=torch.float64)
    return accelerator.reduce(t, reduction="mean").item()


def _progress(cfg: TrainConfig, accelerator, total: int, initial: int, name: str):
    if not (cfg.run.progress and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"train[{name}]", dynamic_ncols=True)
