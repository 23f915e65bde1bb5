"""What a run may do with an output directory that already holds a run: resume it, refuse, or start over.

Every checkpoint stores the *training config* it was written under (``trainer_state.json["config"]``: the resolved
config, flattened to dotted keys, without :data:`IGNORED`). :func:`plan_resume` compares it with this run's:

==============================  =====================================================================================
``run.resume=auto`` (default)   newest complete checkpoint; same training config → resume (one console line);
                                different → :class:`ConfigError` naming each differing key ``old → new``
``run.resume=force``            newest complete checkpoint, resumed even when the config differs (the keys listed)
``run.resume=<checkpoint dir>`` that checkpoint; the user chose it, so differences are listed as a warning
``run.resume=never``            start over
``run.overwrite=true``          start over; the previous run's checkpoints are removed and ``final/`` replaced
==============================  =====================================================================================

"Newest complete checkpoint" is the newest one whose checksums verify (:func:`~mmalign.train.checkpoint.
verify_checkpoint`; a damaged newer one is skipped with a warning naming the file); ``force`` also takes one whose
only fault is a missing RNG state, warning that exactness is lost.

A run that starts over (no checkpoint to resume) refuses an output directory whose ``final/`` holds a finished
run's model unless ``run.overwrite=true``. A checkpoint written before configs were stored resumes with a warning
(nothing to compare). Stages after the checkpoint's stage may change (a stage appended to a finished run); the
checkpoint's stage and the ones before it may not.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError, to_dict
from ..schema import TrainConfig
from . import checkpoint as ckpt

log = logging.getLogger(__name__)

__all__ = ["IGNORED", "check_free_space", "config_diff", "estimate_output_bytes", "plan_resume", "training_config"]

# Keys that do not change what is trained (weights, data order, random streams) — where and how often the run
# writes, logs and evaluates (evaluation runs under a forked RNG, so it never shifts training's stream), and how
# the output directory is handled. Everything else, run.max_steps / epochs included (they set the scheduler's
# horizon and the stages' lengths), must match to resume under run.resume=auto.
IGNORED = frozenset({
    "run.output_dir", "run.resume", "run.overwrite", "run.progress", "run.report_to", "run.log_every",
    "run.eval_every", "run.eval_batches", "run.save_every", "run.keep_last", "run.save_final",
    "run.check_disk_space",
})


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = ((str(i), v) for i, v in enumerate(value))  # stages: one key per stage field
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def training_config(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as dotted keys → JSON values, without :data:`IGNORED` (what a checkpoint stores)."""
    flat = {k: v for k, v in _flatten(to_dict(cfg)).items() if k not in IGNORED}
    return json.loads(json.dumps(flat, default=str))


def config_diff(old: dict[str, Any], new: dict[str, Any], stage_idx: int | None = None) -> list[str]:
    """``key: old → new`` for every training key that differs; stages after ``stage_idx`` are not compared."""

    def compared(key: str) -> bool:
        parts = key.split(".")
        return not (stage_idx is not None and parts[0] == "stages" and len(parts) > 1 and parts[1].isdigit()
                    and int(parts[1]) > stage_idx)

    missing = "(not set)"
    return [f"{k}: {old.get(k, missing)!r} → {new.get(k, missing)!r}" for k in sorted(set(old) | set(new))
            if compared(k) and old.get(k, missing) != new.get(k, missing)]


def _say(line: str, announce: bool) -> None:
    if announce:
        print(f"mmalign: {line}", file=sys.stderr, flush=True)


def plan_resume(cfg: TrainConfig, *, announce: bool = False, clean: bool = False) -> Path | None:
    """The checkpoint this run resumes from (None: it starts over), after the checks in the module docstring;
    raises ConfigError before anything is written. ``announce``: print the one console line (main process);
    ``clean``: with ``run.overwrite=true``, remove the previous run's checkpoints (main process, at start)."""
    r, out = cfg.run, Path(cfg.run.output_dir)
    explicit = r.resume not in ("auto", "force", "never")
    if r.overwrite and not explicit:
        if clean:
            for old in ckpt.list_checkpoints(out):
                shutil.rmtree(old, ignore_errors=True)
        if announce and (out / "final").exists():
            _say(f"run.overwrite=true: starting over in {out} ({out / 'final'} will be replaced)", announce)
        return None
    path = ckpt.find_resume_checkpoint(out, r.resume)
    if path is None:
        final = out / "final"
        if final.is_dir() and any(final.iterdir()):
            raise ConfigError(f"run.output_dir={str(out)!r}: {final} holds the final model of a finished run and "
                              "this run would start over and replace it; fix: run.overwrite=true to replace it, or "
                              "a new run.output_dir (to continue that run instead, keep its checkpoints: "
                              "run.save_every>0)")
        return None
    state = ckpt.read_state(path)
    stored, here = state.get("config"), training_config(cfg)
    if stored is None:
        log.warning("resuming from %s, written before checkpoints stored their config: not compared", path)
        _say(f"resuming from {path} (step {state.get('global_step')}); its config is unknown (older "
             "checkpoint), not compared", announce)
        return path
    diff = config_diff(stored, here, state.get("stage_idx"))
    if not diff:
        _say(f"resuming from {path} (step {state.get('global_step')}): same training config", announce)
        return path
    listing = "; ".join(diff)
    if r.resume == "auto":
        raise ConfigError(
            [f"run.resume=auto: {path} was written under a different training config: {listing}",
             "fix: rerun with the old values, run.resume=force to continue that checkpoint under the new config, "
             "run.overwrite=true to start over in this directory, or a new run.output_dir"])
    log.warning("resuming from %s under a different config (run.resume=%s): %s", path, r.resume, listing)
    _say(f"resuming from {path} (step {state.get('global_step')}) under a changed config: {listing}", announce)
    return path


# Optimizer state bytes per trainable parameter: AdamW's two fp32 moments; bitsandbytes' 8-bit AdamW two bytes;
# Adafactor's factored second moment and SGD's momentum buffer counted at one fp32 value (upper bounds).
_OPTIM_BYTES = {"adamw": 8, "adamw_8bit": 2, "adafactor": 4, "sgd": 4}


def estimate_output_bytes(cfg: TrainConfig, model) -> dict[str, int]:
    """What the run will write, from the built model: each checkpoint holds every weight of the model (accelerate's
    ``save_state``, frozen LoRA bases included) plus the optimizer state of the trainable ones; at most
    ``keep_last + 1`` live at once while a new one is written before the oldest is pruned, and one of the final
    state is kept until the export succeeds; the final model holds the weights again. Logs, configs and caches
    are not counted (small next to these)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values() if hasattr(t, "element_size"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    checkpoint = weights + trainable * _OPTIM_BYTES.get(cfg.optim.name, 8)
    copies = (cfg.run.keep_last + 1 if cfg.run.save_every > 0 else 0) + 1
    parts = {"checkpoints": copies * checkpoint}
    if cfg.run.save_final:
        parts["final model"] = weights
    return parts


def _gib(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}"
    return ""


def check_free_space(cfg: TrainConfig, model) -> None:
    """Refuse to start when the filesystem of ``run.output_dir`` has less free space than
    :func:`estimate_output_bytes` (so that a long run does not die at its first checkpoint or final save): one
    ConfigError naming the path, both sizes and the fixes. ``run.check_disk_space=false`` skips it."""
    if not cfg.run.check_disk_space or model is None:
        return
    out = Path(cfg.run.output_dir)
    free = shutil.disk_usage(out if out.exists() else out.parent).free
    parts = estimate_output_bytes(cfg, model)
    need = sum(parts.values())
    if free >= need:
        return
    detail = " + ".join(f"{k} {_gib(v)}" for k, v in parts.items())
    raise ConfigError(
        f"run.output_dir={str(out)!r}: its filesystem has {_gib(free)} free, but this run will write about "
        f"{_gib(need)} ({detail}); fix: free space there or pick run.output_dir on a larger disk, keep fewer "
        f"checkpoints (run.keep_last={cfg.run.keep_last}, or run.save_every=0 for only the final model), or train a "
        "LoRA adapter (lora.enabled=true); run.check_disk_space=false starts anyway")
