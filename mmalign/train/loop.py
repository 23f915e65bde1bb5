"""The one training loop, shared by every method and modality.

A method recipe builds a :class:`~mmalign.methods.task.Task` (model + data + adapter + loss); :func:`fit` runs
it: stages → (micro-batches → adapter scores → reference scores → loss → backward) × grad_accum → clip → step →
log → evaluate → checkpoint. Distribution (DDP, FSDP, DeepSpeed) is accelerate's; mixed precision is
accelerate's autocast while every loss computes in fp32. The task's hooks (``prepare_batch``, ``after_step``,
``state_dict``, ...) have no-op defaults on the base class and are always called.

The parts: :mod:`.accel` (the accelerator, one prepared model/optimizer pair per stage), :mod:`.stage` (a
stage's data, batch order and reference tables), :mod:`.step` (one optimizer step), :mod:`.evaluate`,
:mod:`.run_state` (what checkpoints save and resume restores), :mod:`.final_save`.

Exact resume (bit-identical weights on CPU with ``run.deterministic``; tests/train/test_resume.py): data order
comes from :class:`~mmalign.train.data_order.BatchOrder` (seeded per epoch, position saved),
RNG/optimizer/model states from ``accelerator.save_state``, and the scheduler, loop position, last metrics,
recipe state and reference state (moving or re-anchored weights, the precomputed tables trained against) from
our own files in the same atomic checkpoint. Stages finished before the checkpoint are skipped, their LoRA
merges replayed. Evaluation runs under a forked RNG, so it never shifts training's random stream.

Data parallelism: N processes × batch b × grad_accum A take the same samples per optimizer step as one process
with batch b and accumulation N·A, and average the same per-example losses (tests/train/test_distributed.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..methods.task import Task
from ..schema import StageConfig, TrainConfig
from . import checkpoint as ckpt
from .accel import make_accelerator
from .evaluate import Validation, evaluate, run_evaluation
from .final_save import check_final_save, gathered_state_dict, save_final
from .metrics_log import MetricsLogger, truncate_metrics
from .output_guard import plan_resume
from .run_state import Resume, Run, RunState, save
from .run_state import restore as restore_stage
from .stage import Stage, make_reference, replay_merge, resolve_stages, setup_stage
from .step import train_step

__all__ = ["FORCE_GATHERED_SAVE", "evaluate", "fit", "gathered_state_dict", "resolve_stages"]

# Tests set this to True to take the gathered-state path on one process (accelerate's get_state_dict then
# returns the unwrapped model's state dict), which is the only way to exercise it without GPUs. Read when the
# final model is saved.
FORCE_GATHERED_SAVE = False


def fit(task: Task, cfg: TrainConfig, accelerator=None) -> dict:
    """Train ``task`` under ``cfg``; returns a summary (final metrics, paths, timings)."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg, accelerator)
    set_seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    stages = resolve_stages(cfg)
    out_dir = Path(cfg.run.output_dir)
    if accelerator.is_main_process:
        ckpt.clean_incomplete(out_dir)
    resume_from = plan_resume(cfg, announce=accelerator.is_main_process, clean=accelerator.is_main_process)
    accelerator.wait_for_everyone()  # run.overwrite: the previous run's checkpoints are gone on every rank
    check_final_save(accelerator, cfg)
    resume = Resume.read(resume_from, stages) if resume_from else None
    if resume and accelerator.is_main_process:  # records of steps after the checkpoint are retrained: drop them
        truncate_metrics(out_dir / "metrics.jsonl", resume.state["global_step"])
    logger = MetricsLogger(out_dir, cfg.run.report_to, enabled=accelerator.is_main_process)
    run = Run(task, cfg, accelerator, logger, make_reference(task, cfg), RunState([s.name for s in stages]),
              validation=Validation.build(cfg))

    for idx, stage in enumerate(stages):
        replay_merge(run, idx, stage)
        if resume and idx < resume.stage_idx:
            _skip_stage(run, stage, resume.state["stage_steps"][idx])
            continue  # finished before the interruption; its effect is in the checkpointed weights
        _run_stage(run, idx, stage, resume)
        resume = None  # stages before the checkpoint's were skipped: this one was the resumed one

    save_final(run, force_gathered=FORCE_GATHERED_SAVE)
    logger.close()
    run.summary.update(global_step=run.state.global_step, stage_steps=run.state.stage_steps,
                       seconds=round(time.time() - run.t0, 2), output_dir=str(out_dir), metrics_file=str(logger.path))
    return run.summary


def _skip_stage(run: Run, stage: StageConfig, n_done: int) -> None:
    run.state.global_step += n_done
    run.state.stage_steps.append(n_done)
    run.summary["stages"].append({"name": stage.name, "steps": n_done, "skipped_on_resume": True})


def _run_stage(run: Run, idx: int, config: StageConfig, resume: Resume | None) -> None:
    """Set up stage ``idx`` (restored from ``resume`` when it is the checkpoint's stage), train it, evaluate it."""
    stage = setup_stage(run, idx, config, resume.extra if resume else None)
    run.model, run.stage = stage.model, stage
    if resume:
        restore_stage(run, stage, resume)
    progress = _progress(run, stage)
    batches, aux_batches = stage.batches(run.accelerator.device)
    stage.model.train()
    while run.state.step_in_stage < stage.n_steps:
        metrics = train_step(run, stage, batches, aux_batches)
        _after_step(run, stage, metrics, progress)
    if progress is not None:
        progress.close()
    _finish_stage(run, stage)


def _after_step(run: Run, stage: Stage, metrics: dict, progress) -> None:
    """Log, evaluate and checkpoint, each on its own schedule."""
    state, every = run.state, run.cfg.run
    state.metrics = metrics
    if progress is not None:
        progress.update(1)
        progress.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "rewards/accuracies") if k in metrics})
    if state.global_step % every.log_every == 0 or state.step_in_stage == stage.n_steps:
        run.logger.log(state.global_step, metrics, stage=stage.config.name, epoch=stage.order.epoch)
    if every.eval_every and state.global_step % every.eval_every == 0:
        _evaluate(run, stage)
    if every.save_every and state.global_step % every.save_every == 0:
        save(run, stage)


def _evaluate(run: Run, stage: Stage) -> dict:
    return run_evaluation(run, stage)  # eval-set loss + sampling validation, logged and printed


def _finish_stage(run: Run, stage: Stage) -> None:
    state = run.state
    if state.eval_step != state.global_step:  # the end-of-stage evaluation, unless eval_every just did it
        _evaluate(run, stage)
    run.summary["stages"].append({"name": stage.config.name, "steps": stage.n_steps, "final": state.metrics,
                                  "eval": state.eval, "data": dict(stage.data.stats)})


def _progress(run: Run, stage: Stage):
    if not (run.cfg.run.progress and run.accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=stage.n_steps, initial=run.state.step_in_stage, desc=progress_label(run.cfg, stage.config),
                dynamic_ncols=True)


def progress_label(cfg: TrainConfig, stage: StageConfig) -> str:
    """``modality/loss[stage]``: a run that trains another first (PRIOR's text-only reference LM, then PRIOR
    itself) shows two bars told apart by it (``text/sft[main]``, then ``prior/prior[main]``)."""
    loss = (stage.loss or {}).get("name") or cfg.loss.name
    return f"{cfg.modality}/{loss}[{stage.name}]"
