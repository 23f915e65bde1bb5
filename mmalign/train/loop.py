"""The one training loop, shared by every method and modality.

A method recipe builds a :class:`Task` (model + data + adapter + loss); :func:`fit` runs it: stages →
(micro-batches → adapter scores → reference scores → loss → backward) × grad_accum → clip → step → log →
evaluate → checkpoint. Distribution (DDP, FSDP, DeepSpeed) is accelerate's; mixed precision is accelerate's
autocast while every loss computes in fp32.

Exact resume (bit-identical weights on CPU with ``run.deterministic``; tests/train/test_resume.py): data order
comes from :class:`~mmalign.train.data_order.BatchOrder` (seeded per epoch, position saved),
RNG/optimizer/model states from ``accelerator.save_state``, and the scheduler, loop position, last metrics and
reference state (moving or re-anchored weights, the precomputed tables trained against) from our own files in
the same atomic checkpoint. Stages finished before the checkpoint are skipped, their LoRA merges replayed.
Evaluation runs under a forked RNG, so it never shifts training's random stream.

Data parallelism: N processes × batch b × grad_accum A take the same samples per optimizer step as one process
with batch b and accumulation N·A, and average the same per-example losses (tests/train/test_distributed.py).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..config import ConfigError
from ..losses import LossOutput
from ..schema import StageConfig, TrainConfig
from ..types import Scores
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
    batches_hash,
)

log = logging.getLogger(__name__)


@dataclass
class StageData:
    """What a task hands the loop for one stage."""

    train: Any  # a sequence of examples (torch Dataset)
    collate: Any  # list[example] -> batch with .to(device) and .extras
    eval: Any = None
    aux: Any = None  # e.g. the retain set of an unlearning run
    stats: dict = field(default_factory=dict)  # flat numeric data stats (rows read/used/skipped, ...), logged
    key: str = ""  # content hash of ``train``, for reference-score caching ("" : hashed from the batches)
    eval_key: str = ""  # the same for ``eval``


class Task(Protocol):
    """A method recipe instantiated for a run. ``model`` is the policy being trained."""

    model: nn.Module
    needs_reference: bool

    def stage_data(self, stage: StageConfig) -> StageData: ...

    def configure_stage(self, stage: StageConfig) -> None: ...

    def score(self, model: nn.Module, batch) -> Scores: ...

    def loss(self, policy: Scores, reference: Scores | None, batch, aux: Scores | None = None) -> LossOutput: ...

    def save_pretrained(self, model: nn.Module, path: Path, state_dict: dict | None = None) -> None: ...
    # ``state_dict``: the full weights gathered from sharded ranks (FSDP / ZeRO-3; keys relative to ``model``),
    # to be written instead of ``model``'s own (which hold one rank's shards). ``None`` on unsharded runs.

    def merge_lora(self) -> None: ...

    # Optional: ``after_step(step)`` runs after every optimizer step; ``state_dict()``/``load_state_dict()`` put
    # recipe state (beyond the weights) into checkpoints for exact resume.
    # Optional: ``prepare_batch(model, batch, step) -> batch`` runs before every training micro-batch is scored,
    # for methods whose candidates come from the current policy (online DPO/XPO, sampled negatives). It must be
    # deterministic given (step, batch) and the RNG state for exact resume.


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


# Tests set this to True to take the gathered-state path on one process (accelerate's get_state_dict then
# returns the unwrapped model's state dict), which is the only way to exercise it without GPUs.
FORCE_GATHERED_SAVE = False


def gathered_state_dict(accelerator, model: nn.Module | None) -> dict[str, torch.Tensor] | None:
    """The policy's full state dict when its weights are sharded across ranks (FSDP, DeepSpeed ZeRO-3), else
    ``None`` (each process holds the whole model and the task saves it directly).

    A sharded model's own ``state_dict()`` on the main process holds only that rank's shards, so the final
    ``save_pretrained`` would write a broken checkpoint; accelerate's ``get_state_dict`` gathers full tensors
    (to CPU, on the main rank) and must run on every rank, as HF ``Trainer`` does. ZeRO-3 gathers the 16-bit
    weights (``zero3_save_16bit_model: true``, checked when the run starts): the final model is then saved in
    the training dtype, not fp32. Keys are relative to ``task.model`` (the ``_Scorer`` wrapper's ``model.`` is dropped);
    tasks write them with ``save_pretrained(..., state_dict=...)``."""
    from accelerate.utils import DistributedType

    dtype = accelerator.distributed_type
    zero3 = (dtype == DistributedType.DEEPSPEED
             and accelerator.deepspeed_config.get("zero_optimization", {}).get("stage") == 3)
    if model is None or not (dtype == DistributedType.FSDP or zero3 or FORCE_GATHERED_SAVE):
        return None
    state = accelerator.get_state_dict(model)
    if state is None:  # ZeRO-3 consolidates on rank 0 only and returns None elsewhere; only rank 0 saves
        return {}
    prefix = "model."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _check_final_save(accelerator, cfg: TrainConfig) -> None:
    """Fail before training, not after it, when ZeRO-3 could not gather the weights for the final save."""
    from accelerate.utils import DistributedType

    if not cfg.run.save_final or accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    zero = accelerator.deepspeed_config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise ConfigError("DeepSpeed ZeRO-3 with run.save_final=true needs the 16-bit weights gathered at save: set "
                          "zero3_save_16bit_model: true in the accelerate config (configs/accelerate/"
                          "deepspeed_zero3.yaml does), or run.save_final=false and export with zero_to_fp32.py")


def resolve_stages(cfg: TrainConfig) -> list[StageConfig]:
    if cfg.stages:
        return cfg.stages
    return [StageConfig(name="main", max_steps=cfg.run.max_steps, epochs=None if cfg.run.max_steps else cfg.run.epochs)]


def _stage_steps(stage: StageConfig, cfg: TrainConfig, order: BatchOrder) -> int:
    if stage.max_steps:
        return stage.max_steps
    epochs = stage.epochs if stage.epochs is not None else cfg.run.epochs
    return max(1, math.ceil(epochs * order.steps_per_epoch))


def _collate_with_index(collate, dataset, indices: list[int]):
    batch = collate([dataset[i] for i in indices])
    batch.extras["index"] = torch.tensor(indices, dtype=torch.long)
    return batch


class _Batches:
    """Infinite iterator of collated batches over a BatchOrder."""

    def __init__(self, dataset, collate, order: BatchOrder, device):
        self.dataset, self.collate, self.order, self.device = dataset, collate, order, device

    def __next__(self):
        indices = self.order.next_indices()
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:  # per-epoch randomness in the data (diffusion noise) follows the restored order
            set_epoch(self.order.epoch)
        return _collate_with_index(self.collate, self.dataset, indices).to(self.device)


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


def _stage_precomputed(ref: PrecomputedReference, task: Task, data: StageData, cfg: TrainConfig, accelerator,
                       anchors: dict[str, str], drifts: bool) -> tuple[PrecomputedReference, PrecomputedReference]:
    """Train and eval reference tables of a stage, scored once by the policy (adapter disabled with LoRA).

    ``anchors`` maps data keys to the tables scored since the reference was last anchored (run start, a
    re-anchored stage, a LoRA merge): a later stage on the same data reuses them, so the reference stays the
    anchor as with ``copy``; the map is checkpointed, so a resumed run reads the very tables it trained
    against instead of rescoring with the weights it has at restart. New data in a later stage without LoRA
    can only be scored by the current policy (the anchor weights are not kept): ``drifts`` warns about it.
    The data key is the task's content key, or else a hash of the collated batches (so that a changed eval
    file, say, never reuses the old scores)."""
    bs = cfg.run.batch_size

    def table(split: str, dataset, key: str) -> PrecomputedReference:
        def batches():
            return (_collate_with_index(data.collate, dataset, list(range(i, min(i + bs, len(dataset)))))
                    for i in range(0, len(dataset), bs))

        data_key = f"{split}:{key or batches_hash(batches())}"
        out = PrecomputedReference(ref.cache_dir, data_key=data_key)
        if data_key in anchors:
            out.load_state_dict({"path": anchors[data_key]})
        else:
            if drifts:
                log.warning("reference.strategy=precomputed: this stage's %s data is new and is scored by the current "
                            "policy (the initial weights are not kept), so the reference re-anchors here; set "
                            "reanchor_reference: true to make it explicit, or use reference.strategy=copy", split)
            out.build(task.model, task.score, batches(), adapter_disabled=cfg.lora.enabled, device=accelerator.device)
        anchors[data_key] = str(out.path)
        return out

    train_ref = table("train", data.train, data.key)
    eval_ref = train_ref
    if data.eval is not None and len(data.eval):
        eval_ref = table("eval", data.eval, data.eval_key)
    return train_ref, eval_ref


def _mean_metrics(items: list[dict]) -> dict[str, float]:
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
            batch = _collate_with_index(data.collate, data.eval, idx).to(dev)
            with accelerator.autocast():
                pol = model(batch)
                ref = reference.scores(batch) if task.needs_reference else None
                out = task.loss(pol, ref, batch)
            rows.append({"loss": out.loss.item(), **{k: v.item() for k, v in out.metrics.items()}})
    model.train()
    return {f"eval/{k}": v for k, v in _mean_metrics(rows).items()}


def _check_resume(state: dict, stages: list[StageConfig], path: Path) -> None:
    names, idx = [s.name for s in stages], state["stage_idx"]
    saved = state.get("stage_names")
    if saved is not None and saved[: idx + 1] != names[: idx + 1]:
        problem = f"the checkpoint was written by a run with stages {saved}, this config has {names}"
    elif idx >= len(stages):
        problem = f"the checkpoint is in stage {idx} but this config has {len(stages)} stage(s)"
    else:
        return  # stages after the checkpoint's may change (e.g. a stage appended to a finished run)
    raise ConfigError(f"run.resume: {problem}; resume with the config that wrote it, or start over with "
                      "run.resume=never or a new run.output_dir", source=str(path))


def _log_data_stats(logger: MetricsLogger, step: int, stage: StageConfig, stats: dict, main: bool) -> None:
    # As metrics (floats), so that TensorBoard/wandb get the row counts too, under the stats' own names.
    logger.log(step, dict(stats), event="data", stage=stage.name)
    skipped = {k: v for k, v in stats.items() if k.endswith("rows_skipped") and v}
    if skipped and main:
        reasons = {k: v for k, v in stats.items() if "skipped/" in k and v}
        log.warning("stage %r: skipped bad rows %s (data.skip_bad_rows=true); reasons: %s", stage.name, skipped,
                    reasons)


def fit(task: Task, cfg: TrainConfig, accelerator=None) -> dict:
    """Train ``task`` under ``cfg``; returns a summary (final metrics, paths, timings)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out_dir = Path(cfg.run.output_dir)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator is None:
        if launched == 1:
            # accelerate keeps process-wide singletons: a second fit() in one Python process (a notebook, a
            # demo running SFT then DPO) with other settings would otherwise be refused.
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        # accelerate sets up gloo for a launcher's CPU-only processes only when told cpu=True; without it,
        # `torchrun --nproc_per_node N` on a CPU machine runs N independent copies into one output_dir.
        cpu = {"cpu": True} if launched > 1 and not _has_accelerator_device() else {}
        accelerator = Accelerator(mixed_precision=cfg.run.mixed_precision,
                                  gradient_accumulation_steps=cfg.run.grad_accum, **cpu)
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(f"launched with WORLD_SIZE={launched} but accelerate set up {accelerator.num_processes} "
                           "process(es): the processes would train independent copies; launch with `accelerate "
                           "launch` (add --cpu on a machine without GPUs) or check the launcher's environment")
    if accelerator.gradient_accumulation_steps != cfg.run.grad_accum:
        # accelerator.backward divides the loss by its own count: a mismatch would mis-scale every gradient.
        raise ValueError(f"the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches but "
                         f"run.grad_accum={cfg.run.grad_accum}; create it with gradient_accumulation_steps="
                         f"{cfg.run.grad_accum} or let fit() create it")
    set_seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    stages = resolve_stages(cfg)
    if accelerator.is_main_process:
        ckpt.clean_incomplete(out_dir)
    resume_from = ckpt.find_resume_checkpoint(out_dir, cfg.run.resume)
    _check_final_save(accelerator, cfg)
    resume_state = ckpt.read_state(resume_from) if resume_from else None
    if resume_state:
        _check_resume(resume_state, stages, resume_from)
    logger = MetricsLogger(out_dir, cfg.run.report_to, enabled=accelerator.is_main_process)
    reference = _make_reference(task, cfg)
    global_step, summary, t0 = 0, {"stages": []}, time.time()
    model = None  # the prepared (possibly sharded) policy of the current stage
    stage_steps: list[int] = []  # steps of the stages finished so far (checkpoints need it to skip them)
    anchors: dict[str, str] = {}  # precomputed reference tables of the current anchor (see _stage_precomputed)
    procs = dict(world_size=accelerator.num_processes, rank=accelerator.process_index, grad_accum=cfg.run.grad_accum)

    for stage_idx, stage in enumerate(stages):
        if stage_idx > 0 and stage.merge_lora:
            # Replayed for stages finished before a resume too: the checkpoint holds the merged structure.
            task.merge_lora()
            if isinstance(reference, AdapterReference):
                reference = AdapterReference(task.model, task.score)
        if resume_state and stage_idx < resume_state["stage_idx"]:
            n_done = resume_state["stage_steps"][stage_idx]
            global_step += n_done
            stage_steps.append(n_done)
            summary["stages"].append({"name": stage.name, "steps": n_done, "skipped_on_resume": True})
            continue  # finished before the interruption; its effect is in the checkpointed weights
        resuming = resume_state is not None and stage_idx == resume_state["stage_idx"]
        task.configure_stage(stage)
        data = task.stage_data(stage)
        if data.stats:
            _log_data_stats(logger, global_step, stage, data.stats, accelerator.is_main_process)
        if stage_idx > 0 and stage.reanchor_reference:
            reference.reanchor(task.model)

        order = BatchOrder(len(data.train), cfg.run.batch_size, seed=cfg.run.seed + 7919 * stage_idx, **procs)
        n_steps = _stage_steps(stage, cfg, order)
        aux_order = None
        if data.aux is not None:  # one aux micro-batch per train micro-batch, in lockstep
            aux_order = BatchOrder(len(data.aux), cfg.run.batch_size, seed=cfg.run.seed + 1, **procs)

        accelerator._models.clear()  # one model/optimizer pair per stage (a LoRA merge changes the parameters)
        accelerator._optimizers.clear()
        optimizer = build_optimizer(task.model, cfg.optim, lr=stage.lr)
        scheduler = build_scheduler(optimizer, cfg.optim, n_steps)
        ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if ds_plugin is not None:  # no DataLoader is prepared, so DeepSpeed cannot resolve its "auto" batch size
            ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.run.batch_size
        model, optimizer = accelerator.prepare(_Scorer(task.model, task.score), optimizer)
        ref_model = getattr(reference, "model", None)
        if isinstance(ref_model, nn.Module):  # frozen copies are built before prepare() placed the policy
            ref_model.to(accelerator.device)

        saved = ckpt.read_extra(resume_from) if resuming else {}
        eval_ref = reference
        if isinstance(reference, PrecomputedReference):
            anchored = stage_idx > 0 and (stage.reanchor_reference or stage.merge_lora)
            if resuming:
                anchors = dict(saved.get("anchor_tables", {}))
            elif anchored:
                anchors = {}
            drifts = stage_idx > 0 and not anchored and not cfg.lora.enabled
            reference, eval_ref = _stage_precomputed(reference, task, data, cfg, accelerator, anchors, drifts)
            summary["reference_cache_reused"] = reference.reused

        step_in_stage, metrics, stage_eval, eval_step = 0, {}, {}, -1
        if resuming:
            ckpt.load_checkpoint(accelerator, resume_from)  # weights, optimizer, RNG, accelerate's step counter
            scheduler.load_state_dict(saved["scheduler"])
            if not isinstance(reference, PrecomputedReference):
                reference.load_state_dict(saved.get("reference", {}))
            if hasattr(task, "load_state_dict") and "task" in saved:
                task.load_state_dict(saved["task"])
            order.load_state_dict(resume_state["order"])
            if aux_order is not None and resume_state.get("aux_order"):
                aux_order.load_state_dict(resume_state["aux_order"])
            step_in_stage, global_step = resume_state["step_in_stage"], resume_state["global_step"]
            metrics, stage_eval = resume_state.get("metrics", {}), resume_state.get("eval", {})
            eval_step = resume_state.get("eval_step", -1)
            logger.log(global_step, {}, event="resumed", checkpoint=str(resume_from))
            resume_state = None

        batches = _Batches(data.train, data.collate, order, accelerator.device)
        aux_batches = _Batches(data.aux, data.collate, aux_order, accelerator.device) if aux_order else None
        progress = _progress(cfg, accelerator, n_steps, step_in_stage, stage.name)
        prepare = getattr(task, "prepare_batch", None)
        model.train()
        while step_in_stage < n_steps:
            step_metrics, grad_norm = [], None
            for _ in range(cfg.run.grad_accum):
                batch = next(batches)
                aux_batch = next(aux_batches) if aux_batches else None
                if prepare is not None:  # online methods: generate/score candidates with the current policy
                    batch = prepare(task.model, batch, global_step)
                # accumulate(): no DDP all-reduce and no optimizer step except on the last micro-batch, and
                # accelerator.backward divides each micro-batch loss by grad_accum, so the step's gradient is
                # the mean over all grad_accum × processes × batch_size examples (for per-example-mean losses).
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
                    if accelerator.sync_gradients and cfg.optim.max_grad_norm:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_metrics.append({"loss": out.loss.detach(), **out.metrics})
            lr = scheduler.get_last_lr()[0]  # the rate this step used (read before the scheduler moves on)
            scheduler.step()
            step_in_stage += 1
            global_step += 1
            reference.after_step(global_step, task.model)
            if hasattr(task, "after_step"):  # per-step recipe state (weight averages, logit-scale clamps)
                task.after_step(global_step)

            metrics = _mean_metrics([{k: float(v) for k, v in m.items()} for m in step_metrics])
            metrics = {k: _reduce(accelerator, v) for k, v in metrics.items()}
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            metrics["lr"] = lr
            if progress is not None:
                progress.update(1)
                progress.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "rewards/accuracies") if k in metrics})
            if global_step % cfg.run.log_every == 0 or step_in_stage == n_steps:
                logger.log(global_step, metrics, stage=stage.name, epoch=order.epoch)
            if cfg.run.eval_every and global_step % cfg.run.eval_every == 0:
                stage_eval, eval_step = evaluate(task, model, data, eval_ref, cfg, accelerator), global_step
                if stage_eval:
                    logger.log(global_step, stage_eval, stage=stage.name)
            if cfg.run.save_every and global_step % cfg.run.save_every == 0:
                state = {"global_step": global_step, "stage_idx": stage_idx, "step_in_stage": step_in_stage,
                         "stage_names": [s.name for s in stages], "stage_steps": [*stage_steps, n_steps],
                         "order": order.state_dict(), "aux_order": aux_order.state_dict() if aux_order else None,
                         "metrics": metrics, "eval": stage_eval, "eval_step": eval_step}
                extra = {"scheduler": scheduler.state_dict(), "reference": reference.state_dict(),
                         "anchor_tables": anchors}
                if hasattr(task, "state_dict"):  # recipe state beyond the weights (e.g. ZSCL's weight average)
                    extra["task"] = task.state_dict()
                ckpt.save_checkpoint(accelerator, out_dir, global_step, state, keep_last=cfg.run.keep_last,
                                     extra=extra)
        if progress is not None:
            progress.close()
        stage_steps.append(n_steps)
        if eval_step != global_step:  # the end-of-stage evaluation, unless eval_every just did it
            stage_eval = evaluate(task, model, data, eval_ref, cfg, accelerator) or stage_eval
            if stage_eval:
                logger.log(global_step, stage_eval, stage=stage.name)
        summary["stages"].append({"name": stage.name, "steps": n_steps, "final": metrics, "eval": stage_eval,
                                  "data": dict(data.stats)})

    accelerator.wait_for_everyone()
    if cfg.run.save_final:
        final = out_dir / "final"
        full_state = gathered_state_dict(accelerator, model)  # collective: every rank takes part
        if accelerator.is_main_process:
            if full_state is None:
                task.save_pretrained(task.model, final)
            else:
                task.save_pretrained(task.model, final, state_dict=full_state)
            summary["final_model"] = str(final)
    accelerator.wait_for_everyone()  # no process returns (and reads final/) before it is written
    logger.close()
    summary.update(global_step=global_step, stage_steps=stage_steps, seconds=round(time.time() - t0, 2),
                   output_dir=str(out_dir), metrics_file=str(logger.path))
    return summary


def _has_accelerator_device() -> bool:
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6: cuda, xpu, mps, ...
    return bool(acc.is_available()) if acc is not None else torch.cuda.is_available()


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
