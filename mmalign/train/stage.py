"""One stage of a run: its data and batch order, its model/optimizer/scheduler, its reference tables.

Stages run in sequence on the same policy; each may change the learning rate, the loss settings, the data, and
re-anchor the reference or merge the LoRA adapter at its start (:class:`~mmalign.schema.StageConfig`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..methods.task import StageData, Task
from ..schema import StageConfig, TrainConfig
from ..types import Scores
from .accel import prepare_stage_pair
from .data_order import BatchOrder
from .reference import AdapterReference, CopyReference, MovingReference, PrecomputedReference, Reference, batches_hash
from .run_state import Run

log = logging.getLogger(__name__)


class _Scorer(nn.Module):
    """Runs the adapter inside ``forward`` so that DDP/FSDP wrappers see a normal forward call (their gradient
    hooks and parameter gathering are tied to it), even though adapters call submodules directly."""

    def __init__(self, model: nn.Module, score_fn):
        super().__init__()
        self.model = model
        self._score_fn = score_fn

    def forward(self, batch) -> Scores:
        return self._score_fn(self.model, batch)

    @property
    def _no_split_modules(self):
        # FSDP's transformer auto-wrap looks for the decoder-layer class here (transformers models carry it).
        return getattr(self.model, "_no_split_modules", None)


def collate_with_index(collate, dataset, indices: list[int]):
    batch = collate([dataset[i] for i in indices])
    batch.extras["index"] = torch.tensor(indices, dtype=torch.long)
    return batch


class Batches:
    """Infinite iterator of collated batches over a BatchOrder."""

    def __init__(self, dataset, collate, order: BatchOrder, device):
        self.dataset, self.collate, self.order, self.device = dataset, collate, order, device

    def __next__(self):
        indices = self.order.next_indices()
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:  # per-epoch randomness in the data (diffusion noise) follows the restored order
            set_epoch(self.order.epoch)
        return collate_with_index(self.collate, self.dataset, indices).to(self.device)


def resolve_stages(cfg: TrainConfig) -> list[StageConfig]:
    if cfg.stages:
        return cfg.stages
    return [StageConfig(name="main", max_steps=cfg.run.max_steps, epochs=None if cfg.run.max_steps else cfg.run.epochs)]


def _stage_steps(stage: StageConfig, cfg: TrainConfig, order: BatchOrder) -> int:
    if stage.max_steps:
        return stage.max_steps
    epochs = stage.epochs if stage.epochs is not None else cfg.run.epochs
    return max(1, math.ceil(epochs * order.steps_per_epoch))


def make_reference(task: Task, cfg: TrainConfig) -> Reference:
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


@dataclass
class Stage:
    """The objects of the stage being trained."""

    idx: int
    config: StageConfig
    data: StageData
    order: BatchOrder
    aux_order: BatchOrder | None  # one aux micro-batch per train micro-batch, in lockstep
    n_steps: int
    model: nn.Module  # the prepared (possibly sharded) _Scorer around task.model
    optimizer: Any
    scheduler: Any
    eval_ref: Reference  # the reference evaluation scores against (its own table under ``precomputed``)

    def batches(self, device) -> tuple[Batches, Batches | None]:
        train = Batches(self.data.train, self.data.collate, self.order, device)
        aux = Batches(self.data.aux, self.data.collate, self.aux_order, device) if self.aux_order else None
        return train, aux


def replay_merge(run: Run, idx: int, stage: StageConfig) -> None:
    """The LoRA merge at a stage's start; replayed for stages finished before a resume too (the checkpoint holds
    the merged structure)."""
    if idx > 0 and stage.merge_lora:
        run.task.merge_lora()
        if isinstance(run.reference, AdapterReference):
            run.reference = AdapterReference(run.task.model, run.task.score)


def setup_stage(run: Run, idx: int, stage: StageConfig, resuming: dict | None) -> Stage:
    """Data, batch orders, the prepared model/optimizer pair and the reference tables of stage ``idx``.
    ``resuming``: the checkpoint's ``loop_extra.pt`` when this stage resumes, else None."""
    task, cfg, accelerator = run.task, run.cfg, run.accelerator
    task.configure_stage(stage)
    data = task.stage_data(stage)
    if data.stats:
        _log_data_stats(run, stage, data.stats)
    if idx > 0 and stage.reanchor_reference:
        run.reference.reanchor(task.model)

    procs = dict(world_size=accelerator.num_processes, rank=accelerator.process_index, grad_accum=cfg.run.grad_accum)
    order = BatchOrder(len(data.train), cfg.run.batch_size, seed=cfg.run.seed + 7919 * idx, **procs)
    n_steps = _stage_steps(stage, cfg, order)
    aux_order = None
    if data.aux is not None:
        aux_order = BatchOrder(len(data.aux), cfg.run.batch_size, seed=cfg.run.seed + 1, **procs)

    model, optimizer, scheduler = prepare_stage_pair(accelerator, _Scorer(task.model, task.score), cfg, stage,
                                                     n_steps)
    ref_model = getattr(run.reference, "model", None)
    if isinstance(ref_model, nn.Module):  # frozen copies are built before prepare() placed the policy
        ref_model.to(accelerator.device)
    out = Stage(idx, stage, data, order, aux_order, n_steps, model, optimizer, scheduler, eval_ref=run.reference)
    if isinstance(run.reference, PrecomputedReference):
        _stage_precomputed(run, out, resuming)
    run.state.start_stage(idx, n_steps)
    return out


def _log_data_stats(run: Run, stage: StageConfig, stats: dict) -> None:
    # As metrics (floats), so that TensorBoard/wandb get the row counts too, under the stats' own names.
    run.logger.log(run.state.global_step, dict(stats), event="data", stage=stage.name)
    skipped = {k: v for k, v in stats.items() if k.endswith("rows_skipped") and v}
    if skipped and run.accelerator.is_main_process:
        reasons = {k: v for k, v in stats.items() if "skipped/" in k and v}
        # Bad rows are skipped only with data.skip_bad_rows=true; rows whose candidates are identical are dropped
        # either way (no preference to learn), so the message names both.
        log.warning("stage %r: rows skipped %s (bad rows under data.skip_bad_rows=true, or identical candidates); "
                    "reasons: %s", stage.name, skipped, reasons)


def _stage_precomputed(run: Run, stage: Stage, resuming: dict | None) -> None:
    """Train and eval reference tables of a stage, scored once by the policy (adapter disabled with LoRA).

    ``run.state.anchors`` maps data keys to the tables scored since the reference was last anchored (run start,
    a re-anchored stage, a LoRA merge): a later stage on the same data reuses them, so the reference stays the
    anchor as with ``copy``; the map is checkpointed, so a resumed run reads the very tables it trained
    against instead of rescoring with the weights it has at restart. New data in a later stage without LoRA
    can only be scored by the current policy (the anchor weights are not kept): ``drifts`` warns about it."""
    cfg, s, idx = run.cfg, stage.config, stage.idx
    anchored = idx > 0 and (s.reanchor_reference or s.merge_lora)
    if resuming is not None:
        run.state.anchors = dict(resuming.get("anchor_tables", {}))
    elif anchored:
        run.state.anchors = {}
    drifts = idx > 0 and not anchored and not cfg.lora.enabled
    data = stage.data
    run.reference = _precomputed_table(run, "train", data.train, data.collate, data.key, drifts)
    stage.eval_ref = run.reference
    if data.eval is not None and len(data.eval):
        stage.eval_ref = _precomputed_table(run, "eval", data.eval, data.collate, data.eval_key, drifts)
    run.summary["reference_cache_reused"] = run.reference.reused


def _precomputed_table(run: Run, split: str, dataset, collate, key: str, drifts: bool) -> PrecomputedReference:
    """One split's table. The data key is the task's content key, or else a hash of the collated batches (so
    that a changed eval file, say, never reuses the old scores)."""
    bs, anchors = run.cfg.run.batch_size, run.state.anchors

    def batches():
        return (collate_with_index(collate, dataset, list(range(i, min(i + bs, len(dataset)))))
                for i in range(0, len(dataset), bs))

    data_key = f"{split}:{key or batches_hash(batches())}"
    out = PrecomputedReference(run.reference.cache_dir, data_key=data_key)
    if data_key in anchors:
        out.load_state_dict({"path": anchors[data_key]})
    else:
        if drifts:
            log.warning("reference.strategy=precomputed: this stage's %s data is new and is scored by the current "
                        "policy (the initial weights are not kept), so the reference re-anchors here; set "
                        "reanchor_reference: true to make it explicit, or use reference.strategy=copy", split)
        out.build(run.task.model, run.task.score, batches(), adapter_disabled=run.cfg.lora.enabled,
                  device=run.accelerator.device)
    anchors[data_key] = str(out.path)
    return out
