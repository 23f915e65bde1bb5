"""The final model (``<output_dir>/final``), written by the task; on sharded runs from weights gathered first."""

from __future__ import annotations

import shutil

import torch
from torch import nn

from ..config import ConfigError
from ..schema import TrainConfig
from .run_state import Run


def gathered_state_dict(accelerator, model: nn.Module | None, *, force: bool = False) -> dict[str, torch.Tensor] | None:
    """The policy's full state dict when its weights are sharded across ranks (FSDP, DeepSpeed ZeRO-3), else
    ``None`` (each process holds the whole model and the task saves it directly). ``force``: take the gathered
    path on an unsharded run too (tests; see ``mmalign.train.loop.FORCE_GATHERED_SAVE``).

    A sharded model's own ``state_dict()`` on the main process holds only that rank's shards, so the final
    ``save_pretrained`` would write a broken checkpoint; accelerate's ``get_state_dict`` gathers full tensors
    (to CPU, on the main rank) and must run on every rank, as HF ``Trainer`` does. ZeRO-3 gathers the 16-bit
    weights (``zero3_save_16bit_model: true``, checked when the run starts): the final model is then saved in
    the training dtype, not fp32. Keys are relative to ``task.model`` (the ``_Scorer`` wrapper's ``model.`` is
    dropped); tasks write them with ``save_pretrained(..., state_dict=...)``."""
    from accelerate.utils import DistributedType

    dtype = accelerator.distributed_type
    zero3 = (dtype == DistributedType.DEEPSPEED
             and accelerator.deepspeed_config.get("zero_optimization", {}).get("stage") == 3)
    if model is None or not (dtype == DistributedType.FSDP or zero3 or force):
        return None
    state = accelerator.get_state_dict(model)
    if state is None:  # ZeRO-3 consolidates on rank 0 only and returns None elsewhere; only rank 0 saves
        return {}
    prefix = "model."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def check_final_save(accelerator, cfg: TrainConfig) -> None:
    """Fail before training, not after it, when ZeRO-3 could not gather the weights for the final save."""
    from accelerate.utils import DistributedType

    if not cfg.run.save_final or accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    zero = accelerator.deepspeed_config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise ConfigError("DeepSpeed ZeRO-3 with run.save_final=true needs the 16-bit weights gathered at save: set "
                          "zero3_save_16bit_model: true in the accelerate config (configs/accelerate/"
                          "deepspeed_zero3.yaml does), or run.save_final=false and export with zero_to_fp32.py")


def save_final(run: Run, *, force_gathered: bool = False) -> None:
    """Write ``final/`` (``run.save_final``); a collective call: every rank takes part in the gathering, and no
    process returns (and reads ``final/``) before it is written."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if run.cfg.run.save_final:
        final = run.out_dir / "final"
        full_state = gathered_state_dict(accelerator, run.model, force=force_gathered)
        if accelerator.is_main_process:
            if final.exists():  # a previous final/ (checked before training: resumed run or run.overwrite=true)
                shutil.rmtree(final)  # replaced whole, so no file of another layout (full vs adapter) is left
            if full_state is None:
                run.task.save_pretrained(run.task.model, final)
            else:
                run.task.save_pretrained(run.task.model, final, state_dict=full_state)
            run.summary["final_model"] = str(final)
    accelerator.wait_for_everyone()
