"""The final model (``<output_dir>/final``), written by the task; on sharded runs from weights gathered first."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from ..schema import TrainConfig
from . import checkpoint as ckpt
from .run_state import Run, save

log = logging.getLogger(__name__)


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


# Modalities whose final/ ``mmalign.models.merge`` can merge (causal LMs, LVLMs, diffusion denoisers).
MERGEABLE = {"text": "causal LM", "prior": "LVLM (LLaVA / PatchLVLM)", "diffusion": "diffusion denoiser"}


def merge_problems(cfg: TrainConfig) -> list[str]:
    """Why ``run.merge_lora_at_end`` cannot work for this run (empty: it can, or it is off)."""
    if not cfg.run.merge_lora_at_end:
        return []
    errs = []
    if not cfg.lora.enabled:
        errs.append("run.merge_lora_at_end=true merges a LoRA adapter, but lora.enabled=false: a full fine-tune's "
                    "final/ already holds full weights; fix: drop run.merge_lora_at_end or set lora.enabled=true")
    if not cfg.run.save_final:
        errs.append("run.merge_lora_at_end=true merges final/, which run.save_final=false does not write; fix: "
                    "drop one of them")
    if cfg.modality not in MERGEABLE:
        errs.append(f"run.merge_lora_at_end=true: merging is implemented for {sorted(MERGEABLE)} runs, not "
                    f"modality={cfg.modality!r}; fix: drop it and load final/ with peft")
    return errs


def check_final_save(accelerator, cfg: TrainConfig) -> None:
    """Fail before training, not after it, when the final save cannot work: ZeRO-3 could not gather the weights,
    or ``run.merge_lora_at_end`` has no adapter (or no implementation) to merge."""
    from accelerate.utils import DistributedType

    problems = merge_problems(cfg)
    if problems:
        raise ConfigError(problems)
    if not cfg.run.save_final or accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    zero = accelerator.deepspeed_config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise ConfigError("DeepSpeed ZeRO-3 with run.save_final=true needs the 16-bit weights gathered at save: set "
                          "zero3_save_16bit_model: true in the accelerate config (configs/accelerate/"
                          "deepspeed_zero3.yaml does), or run.save_final=false and export with zero_to_fp32.py")


FINAL, FINAL_TMP, FINAL_MERGED = "final", "final.tmp", "final_merged"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class _Incomplete(Exception):
    """The export wrote files that do not read back (see :func:`verify_export`)."""


def verify_export(path: Path) -> list[str]:
    """What is wrong with an exported model directory: no weight file, an empty weight or JSON file, a
    safetensors file whose header does not read (or does not match the file's length), a JSON file that does not
    parse, a shard named by an index that is missing. Empty when it is complete."""
    from safetensors import safe_open

    files = sorted(p for p in path.rglob("*") if p.is_file())
    problems = [] if any(p.name.endswith(WEIGHT_SUFFIXES) for p in files) else ["no weight file was written"]
    for p in files:
        rel = p.relative_to(path)
        if (p.suffix == ".json" or p.name.endswith(WEIGHT_SUFFIXES)) and p.stat().st_size == 0:
            problems.append(f"{rel}: empty")
        elif p.suffix == ".safetensors":
            try:
                with safe_open(str(p), "pt") as f:
                    list(f.keys())
            except Exception as err:  # SafetensorError: truncated, or a header that does not parse
                problems.append(f"{rel}: does not read back ({err})")
        elif p.suffix == ".json":
            try:
                index = json.loads(p.read_text())
            except (ValueError, UnicodeDecodeError) as err:
                problems.append(f"{rel}: does not parse ({err})")
                continue
            shards = index.get("weight_map", {}).values() if isinstance(index, dict) else ()
            problems += [f"{rel}: names {s}, which is missing" for s in sorted(set(shards))
                         if isinstance(s, str) and not (p.parent / s).is_file()]
    return problems


def _repoint(tmp: Path, final: Path) -> None:
    """Paths to ``final.tmp`` that the export recorded in its JSON files (a merged LoRA run's
    ``adapter_config.json`` names its ``base/`` by absolute path) → the same path under ``final``."""
    pairs = {json.dumps(str(t))[1:-1]: json.dumps(str(f))[1:-1]
             for t, f in ((tmp, final), (tmp.resolve(), final.resolve().parent / final.name))}
    for p in tmp.rglob("*.json"):
        text = p.read_text()
        new = text
        for old, repl in pairs.items():
            new = new.replace(old, repl)
        if new != text:
            p.write_text(new)


def write_atomically(dest: Path, write, *, no_lora: bool = False) -> Path:
    """``write(tmp)`` into ``<dest>.tmp``, verify it (:func:`verify_export`; with ``no_lora`` also that no LoRA
    tensor is left, see :func:`mmalign.models.merge.lora_keys`), then rename it to ``dest``, replacing a previous
    one only now, so a failed write leaves it as it was. Raises :class:`_Incomplete` for a write that does not
    read back; the partial ``<dest>.tmp`` is removed whatever fails."""
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write(tmp)
        problems = verify_export(tmp)
        if no_lora:
            from ..models.merge import lora_keys

            left = lora_keys(tmp)
            problems += [f"LoRA tensors left after the merge: {left[:3]}{' ...' if len(left) > 3 else ''}"] if left \
                else []
        if problems:
            raise _Incomplete("; ".join(problems))
        _repoint(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():  # a previous one (checked before training: resumed run or run.overwrite=true)
        shutil.rmtree(dest)  # replaced whole, so no file of another layout (full vs adapter) is left
    os.replace(tmp, dest)
    return dest


def _export(run: Run, full_state: dict | None) -> Path:
    """``save_pretrained`` into ``final.tmp``, verify it, then rename it to ``final``."""
    def write(tmp: Path) -> None:
        if full_state is None:
            run.task.save_pretrained(run.task.model, tmp)
        else:
            run.task.save_pretrained(run.task.model, tmp, state_dict=full_state)

    return write_atomically(run.out_dir / FINAL, write)


def export_merged(source: Path, dest: Path, *, dtype: str = "float32", base: str | None = None,
                  copy_full: bool = False) -> tuple[Path, dict]:
    """``dest`` ← the LoRA adapter of ``source`` merged into its base (:func:`mmalign.models.merge.merge_adapter`),
    written atomically and checked to hold no LoRA tensor. ``copy_full``: a ``source`` that holds full weights
    already (a tiny LVLM run saves its LoRA merged) is copied instead of refused."""
    from ..models.merge import NothingToMerge, merge_adapter

    info: dict = {}

    def write(tmp: Path) -> None:
        try:
            info.update(merge_adapter(source, tmp, dtype=dtype, base=base))
        except NothingToMerge:
            if not copy_full:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            info.update(kind="copied", source=str(source), note="final/ holds full weights already")

    return write_atomically(dest, write, no_lora=True), info


def _export_merged(run: Run) -> None:
    """``final_merged/`` from the ``final/`` just written (main process). A failure leaves final/ as it is and
    says how to merge it by hand."""
    final, merged = run.out_dir / FINAL, run.out_dir / FINAL_MERGED
    try:
        path, info = export_merged(final, merged, dtype=run.cfg.model.dtype, copy_full=True)
    except Exception as err:
        cause = str(err) if isinstance(err, (_Incomplete, ConfigError)) else ckpt.describe_os_error(err)
        raise ckpt.SaveError([f"writing {merged} failed: {cause} (final/ is complete and was kept; the partial "
                              f"{merged}.tmp was removed)",
                              f"fix: mmalign merge {final} --out {merged} (after freeing space or fixing the cause)"],
                             source=str(run.out_dir)) from err
    run.summary["final_merged_model"] = str(path)
    log.info("merged the LoRA adapter of %s into %s (%s)", final, path, info.get("class", info.get("kind")))


def _keep_final_state(run: Run) -> tuple[Path, bool] | None:
    """A checkpoint of the final state before the export, so that a kill or a full disk during the export loses
    no training: ``(path, written_for_the_export)``, None when it could not be written. The checkpoint this run
    saved (or resumed from) at its last step is reused; else one is written and removed after the export."""
    step = run.state.global_step
    if run.saved_at is not None and ckpt.checkpoint_step(run.saved_at) == step and run.saved_at.is_dir():
        return run.saved_at, bool(ckpt.read_state(run.saved_at).get("pre_export"))
    if run.stage is None:
        return None
    try:
        return save(run, run.stage, pre_export=True), True
    except ckpt.SaveError as err:
        log.warning("could not keep the final state as a checkpoint before the export: %s", err)
        return None


def _failure(run: Run, err: BaseException, kept: tuple[Path, bool] | None) -> ckpt.SaveError:
    final, step = run.out_dir / FINAL, run.state.global_step
    cause = str(err) if isinstance(err, _Incomplete) else ckpt.describe_os_error(err)
    lines = [f"writing the final model to {final} failed: {cause} (the partial {run.out_dir / FINAL_TMP} was "
             "removed; a previous final/ is left as it was)"]
    if kept is not None:
        lines.append(f"the trained state of step {step} is kept in {kept[0]}; fix: free space in (or make writable) "
                     f"{run.out_dir}, then rerun the same command with run.resume=auto: it resumes at step {step}, "
                     "trains nothing and writes final/ again")
    else:
        older = ckpt.list_checkpoints(run.out_dir)
        lines.append(f"the final state could not be kept as a checkpoint either, so steps after "
                     f"{older[-1].name if older else 'the start'} are lost; fix: free space in {run.out_dir} "
                     "(estimate: twice the model and optimizer size) and rerun")
    return ckpt.SaveError(lines, source=str(run.out_dir))


def save_final(run: Run, *, force_gathered: bool = False) -> None:
    """Write ``final/`` (``run.save_final``) atomically, after keeping the final state as a checkpoint, and with
    ``run.merge_lora_at_end`` then ``final_merged/`` (the adapter merged into its base); a collective call: every
    rank takes part in the gathering, and no process returns (and reads ``final/``) before it is written. A failed
    write raises :class:`~mmalign.train.checkpoint.SaveError` (on the main process) naming the path, the cause and
    the checkpoint to resume from (or, for ``final_merged/``, the ``mmalign merge`` command that redoes it)."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    merge_error = None
    if run.cfg.run.save_final:
        kept = _keep_final_state(run)
        full_state = gathered_state_dict(accelerator, run.model, force=force_gathered)
        error = None
        if accelerator.is_main_process:
            try:
                run.summary["final_model"] = str(_export(run, full_state))
            except Exception as err:
                if not (isinstance(err, _Incomplete) or ckpt.is_write_failure(err)):
                    raise
                error = err
        accelerator.wait_for_everyone()
        if error is not None:
            raise _failure(run, error, kept) from error
        if accelerator.is_main_process and kept is not None and kept[1]:
            shutil.rmtree(kept[0], ignore_errors=True)  # written for the export only; final/ now holds it
        if accelerator.is_main_process and run.cfg.run.merge_lora_at_end:
            try:
                _export_merged(run)  # from final/ on disk: one path for every launcher, sharded runs included
            except ckpt.SaveError as err:
                merge_error = err  # raised after the barrier, so that no other rank waits for this one forever
    accelerator.wait_for_everyone()
    if merge_error is not None:
        raise merge_error
