"""Atomic checkpoints, keep-last-N and ``resume=auto``.

A checkpoint is written under ``<output_dir>/checkpoint-<step>.tmp`` and renamed to
``checkpoint-<step>`` only after every file is on disk, so a crash mid-save never leaves a directory that
looks complete. ``trainer_state.json`` is written last inside the temporary directory: its presence marks a
complete checkpoint. Model, optimizer, RNG states and registered objects (the loop state, moving
references) are saved through ``accelerator.save_state``, so DDP/FSDP/DeepSpeed sharding is accelerate's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
EXTRA_FILE = "loop_extra.pt"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def clean_incomplete(output_dir: str | Path) -> list[Path]:
    """Delete ``checkpoint-*.tmp`` leftovers of saves that a crash or kill interrupted; returns them.

    Call on the main process only, before training starts (no save can be in flight then)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    stale = [p for p in out.iterdir() if p.is_dir() and p.name.startswith("checkpoint-") and p.name.endswith(".tmp")]
    for p in stale:
        log.warning("removing incomplete checkpoint %s (left by an interrupted save)", p)
        shutil.rmtree(p, ignore_errors=True)
    return stale


def find_resume_checkpoint(output_dir: str | Path, resume: str) -> Path | None:
    """``auto``: the newest complete checkpoint (None when there is none); ``never``: None; else a path.

    Incomplete checkpoints (``*.tmp`` directories, or directories without ``trainer_state.json``) are never
    chosen by ``auto``, and are refused when named explicitly."""
    if resume == "never":
        return None
    if resume == "auto":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"run.resume={resume!r} is not a complete checkpoint (no {STATE_FILE} inside); "
            f"complete checkpoints in {output_dir}: {[p.name for p in list_checkpoints(output_dir)]}; "
            "name one of them, or use run.resume=auto (newest complete one) or run.resume=never"
        )
    return path


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, *, keep_last: int,
                    extra: dict | None = None) -> Path:
    """Save the accelerate state, ``extra`` (torch objects: scheduler, moving reference) and ``state`` (json)
    atomically, then prune to ``keep_last``."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step:07d}"
    tmp = out / f"checkpoint-{step:07d}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # a leftover from a crash mid-save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(extra or {}, tmp / EXTRA_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        kept = []
        for p in list_checkpoints(out):
            if int(_CKPT.match(p.name).group(1)) > step:
                # Left by an earlier run that went further before this one resumed from an older checkpoint:
                # that future was abandoned, and resume=auto must not jump back onto it.
                log.warning("removing %s: newer than the resumed run's step %d (an abandoned continuation)", p, step)
                shutil.rmtree(p, ignore_errors=True)
            else:
                kept.append(p)
        for old in kept[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    log.info("checkpoint saved: %s", final)
    return final


def read_state(path: str | Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def read_extra(path: str | Path) -> dict:
    """The ``extra`` objects of a checkpoint (scheduler, reference state); plain tensors and python values, so
    they load with ``weights_only=True`` (no arbitrary pickles from a checkpoint directory)."""
    f = Path(path) / EXTRA_FILE
    if not f.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {EXTRA_FILE}: it was not written by mmalign or is "
                                "damaged; resume from another checkpoint (run.resume=<dir>) or use run.resume=never")
    return torch.load(f, weights_only=True)


def load_checkpoint(accelerator, path: str | Path) -> dict:
    """Restore model/optimizer/RNG through accelerate; returns the ``extra`` objects saved beside them."""
    extra = read_extra(path)
    accelerator.load_state(str(path))
    return extra
