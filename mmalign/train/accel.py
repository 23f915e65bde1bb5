"""The accelerate side of a run: the :class:`~accelerate.Accelerator` of a ``fit`` call and the model/optimizer
pair it prepares for every stage."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..schema import StageConfig, TrainConfig
from .optim import build_optimizer, build_scheduler


def make_accelerator(cfg: TrainConfig, accelerator=None):
    """The accelerator ``fit`` runs on: the caller's (checked against ``cfg``) or a fresh one."""
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator is None:
        if launched == 1:
            _reset_accelerate_state()
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
    return accelerator


def _reset_accelerate_state() -> None:
    # accelerate keeps process-wide singletons: a second fit() in one Python process (a notebook, a demo running
    # SFT then DPO) with other settings (mixed precision, accumulation) would otherwise be refused. accelerate
    # has no public API for this; `_reset_state` is what its own test scripts call between runs. Only on a
    # single process: under a launcher the state holds the process group, which must survive.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _has_accelerator_device() -> bool:
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6: cuda, xpu, mps, ...
    return bool(acc.is_available()) if acc is not None else torch.cuda.is_available()


def prepare_stage_pair(accelerator, scorer: nn.Module, cfg: TrainConfig, stage: StageConfig, n_steps: int):
    """A new optimizer and schedule for ``scorer``'s parameters, prepared with it: ``(model, optimizer,
    scheduler)``. One pair per stage, because a LoRA merge between stages replaces the trainable parameters.

    ``free_memory()`` drops the previous stage's prepared model/optimizer (so that ``save_state`` and
    ``load_state``, which walk every prepared object, see only this stage's pair), destroys a DeepSpeed engine
    and resets ``accelerator.step``, the micro-batch counter that decides which ``accumulate()`` call syncs
    gradients. The reset is safe: every stage ends on an optimizer step, where the counter is a multiple of
    ``grad_accum``, so counting from 0 syncs on the same micro-batches; a resumed stage calls ``load_state``
    after this, which restores the checkpoint's counter (also a multiple of ``grad_accum``: checkpoints are
    taken after optimizer steps). The scheduler is stepped by the loop, not by accelerate, and is not prepared."""
    accelerator.free_memory()
    optimizer = build_optimizer(scorer.model, cfg.optim, lr=stage.lr)
    scheduler = build_scheduler(optimizer, cfg.optim, n_steps)
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:  # no DataLoader is prepared, so DeepSpeed cannot resolve its "auto" batch size
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.run.batch_size
    model, optimizer = accelerator.prepare(scorer, optimizer)
    return model, optimizer, scheduler
