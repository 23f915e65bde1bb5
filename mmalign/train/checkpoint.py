"""Atomic, checksummed checkpoints, keep-last-N and ``resume=auto``.

A checkpoint is written under ``<output_dir>/checkpoint-<step>.tmp`` and renamed to
``checkpoint-<step>`` only after every file is on disk, so a crash mid-save never leaves a directory that
looks complete. ``trainer_state.json`` and then ``checksums.json`` (the sha256 and size of every other file)
are written last inside the temporary directory: ``trainer_state.json``'s presence marks a complete
checkpoint, and resume verifies the checksums (:func:`verify_checkpoint`), falling back to the previous
complete checkpoint with a warning naming the damaged file when the newest one fails. Model, optimizer, RNG
states and registered objects (the loop state, moving references) are saved through
``accelerator.save_state``, so DDP/FSDP/DeepSpeed sharding is accelerate's.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import shutil
import traceback
from pathlib import Path

import torch

from ..config import ConfigError

log = logging.getLogger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
EXTRA_FILE = "loop_extra.pt"
MANIFEST_FILE = "checksums.json"
RNG_PREFIX = "random_states_"  # accelerate's random_states_<process>.pkl
RNG_FILE = f"{RNG_PREFIX}0.pkl"


class SaveError(ConfigError):
    """Writing a checkpoint or the final model failed (full disk, unwritable directory, ...): the path, the cause
    and what was kept. A :class:`ConfigError`, so the CLI prints it as a clean ``error:`` and exits 2."""

    def __init__(self, errors, source: str | None = None):
        super().__init__(errors, source)
        ValueError.__init__(self, "\n".join(self.errors))


def describe_os_error(err: BaseException) -> str:
    """``No space left on device`` (or the error's own text): the cause of a failed write, without a traceback."""
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if code:
        return os.strerror(code)
    text = str(err)
    if "No space left" in text:
        return "No space left on device"
    if any(s in text for s in _SHORT_WRITE):
        # torch.save's zip writer reports a full disk only as a short write ("[enforce fail at
        # inline_container.cc] . unexpected pos N vs M"), which names neither the disk nor the cause.
        return (f"No space left on device (most likely: the writer stopped short, {' '.join(text.split())[:160]}; "
                "a disk quota or a file-size limit does the same)")
    return text or type(err).__name__


_SHORT_WRITE = ("unexpected pos", "failed writing")


def is_write_failure(err: BaseException) -> bool:
    """An OSError, or what torch.save / safetensors raise for one (``RuntimeError ... unexpected pos``,
    ``SafetensorError ... No space left``)."""
    text = str(err)
    return isinstance(err, OSError) or any(s in text for s in ("No space left", "unexpected pos", "failed writing",
                                                              "Read-only file system", "Permission denied"))


def release_files(err: BaseException) -> None:
    """Close what a failed write left open. torch.save's zip writer stays referenced from the frames of the
    exception's traceback with its file open, so a removed partial file kept its disk space for as long as the
    error lived (a notebook that catches it, frees space and trains again would find the space still taken)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:  # the writer's own error is the context of the one raised
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__
    gc.collect()  # the writer may sit in a reference cycle


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


def checkpoint_step(path: str | Path) -> int | None:
    m = _CKPT.match(Path(path).name)
    return int(m.group(1)) if m else None


def clean_incomplete(output_dir: str | Path) -> list[Path]:
    """Delete ``checkpoint-*.tmp`` (and ``final.tmp``) leftovers of saves that a crash or kill interrupted.

    Call on the main process only, before training starts (no save can be in flight then)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    stale = [p for p in out.iterdir() if p.is_dir() and p.name.endswith(".tmp")
             and (p.name.startswith("checkpoint-") or p.name == "final.tmp")]
    for p in stale:
        log.warning("removing incomplete %s %s (left by an interrupted save)",
                    "final model" if p.name == "final.tmp" else "checkpoint", p)
        shutil.rmtree(p, ignore_errors=True)
    return stale


# -- integrity --------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(directory: Path) -> None:
    """``checksums.json``: sha256 and size of every file of the checkpoint; written last."""
    files = {p.relative_to(directory).as_posix(): {"sha256": _sha256(p), "size": p.stat().st_size}
             for p in _files(directory)}
    (directory / MANIFEST_FILE).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))


_VERIFIED: dict[tuple, list[tuple[str, str]]] = {}  # (path, stat of every file) -> problems; one hash per state


def _check_unverified(path: Path) -> list[tuple[str, str]]:
    """What can be checked of a checkpoint written before checksums: the files exist and the state parses."""
    problems = []
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        problems.append((STATE_FILE, f"unreadable ({type(err).__name__})"))
    for name in (EXTRA_FILE, RNG_FILE):
        f = path / name
        if not f.is_file() or f.stat().st_size == 0:
            problems.append((name, "missing" if not f.is_file() else "empty"))
    return problems


def _check_manifest(path: Path) -> list[tuple[str, str]]:
    try:
        listed = json.loads((path / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [(MANIFEST_FILE, f"unreadable ({type(err).__name__})")]
    problems = []
    for name, want in sorted(listed.items()):
        f = path / name
        if not f.is_file():
            problems.append((name, "missing"))
        elif f.stat().st_size != want["size"]:
            problems.append((name, f"truncated or changed: {f.stat().st_size} bytes, {want['size']} written"))
        elif _sha256(f) != want["sha256"]:
            problems.append((name, "checksum mismatch (the file was damaged after it was written)"))
    if RNG_FILE not in listed:
        problems.append((RNG_FILE, "missing (never written)"))
    return problems


def verify_checkpoint(path: str | Path) -> tuple[list[tuple[str, str]], bool]:
    """``(problems, verified)``: each problem is ``(file, what is wrong)``; ``verified`` is False for a
    checkpoint written before checksums (only checked for missing or unreadable files)."""
    path = Path(path)
    verified = (path / MANIFEST_FILE).is_file()
    key = (str(path.resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))
                                      if p.is_file()))
    if key not in _VERIFIED:  # plan_resume runs twice per run (api, loop): each state is hashed once
        _VERIFIED[key] = _check_manifest(path) if verified else _check_unverified(path)
    return list(_VERIFIED[key]), verified


def _rng_only(problems: list[tuple[str, str]]) -> bool:
    return bool(problems) and all(name.startswith(RNG_PREFIX) for name, _ in problems)


def _listing(problems: list[tuple[str, str]]) -> str:
    return "; ".join(f"{name}: {what}" for name, what in problems)


_RNG_FIX = ("without it the resumed run cannot repeat the interrupted one's random stream (dropout, sampling); "
            "fix: run.resume=<an older checkpoint dir>, run.resume=never to start over, or run.resume=force to "
            "continue anyway (the result will not be bit-identical to an uninterrupted run)")


def _newest_verified(output_dir: str | Path, force: bool) -> Path | None:
    """The newest complete checkpoint that verifies, with a warning for each newer one that does not."""
    ckpts = list_checkpoints(output_dir)
    failed: list[str] = []
    for path in reversed(ckpts):
        problems, verified = verify_checkpoint(path)
        if not problems:
            if not verified:
                log.warning("resuming from %s: written before checkpoints had checksums, not verified", path)
            return path
        failed.append(f"{path.name}: {_listing(problems)}")
        log.warning("checkpoint %s fails verification (%s)%s", path, _listing(problems),
                    "; falling back to the previous complete checkpoint" if path != ckpts[0] else "")
    if not ckpts:
        return None
    if force:  # no checkpoint verifies: force may still take the newest one whose only loss is the RNG state
        for path in reversed(ckpts):
            problems, _ = verify_checkpoint(path)
            if _rng_only(problems):
                log.warning("run.resume=force: resuming from %s WITHOUT its RNG state (%s): exactness is lost, the "
                            "result will differ from an uninterrupted run", path, _listing(problems))
                return path
    fix = (_RNG_FIX if any(_rng_only(verify_checkpoint(p)[0]) for p in ckpts) else
           "fix: run.resume=never (or run.overwrite=true) to start over, or restore the files from a copy")
    raise ConfigError([f"run.resume: no checkpoint in {output_dir} is intact: " + " | ".join(failed), fix])


def find_resume_checkpoint(output_dir: str | Path, resume: str) -> Path | None:
    """``auto`` / ``force``: the newest complete checkpoint that verifies (None when there is none); ``never``:
    None; else a path, which must verify.

    Incomplete checkpoints (``*.tmp`` directories, or directories without ``trainer_state.json``) are never
    chosen by ``auto``, and are refused when named explicitly."""
    if resume == "never":
        return None
    if resume in ("auto", "force"):
        return _newest_verified(output_dir, force=resume == "force")
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"run.resume={resume!r} is not a complete checkpoint (no {STATE_FILE} inside); "
            f"complete checkpoints in {output_dir}: {[p.name for p in list_checkpoints(output_dir)]}; "
            "name one of them, or use run.resume=auto (newest complete one) or run.resume=never"
        )
    problems, verified = verify_checkpoint(path)
    if problems:
        fix = _RNG_FIX if _rng_only(problems) else "fix: name another checkpoint, or run.resume=never"
        raise ConfigError([f"run.resume={resume!r} fails verification: {_listing(problems)}", fix])
    if not verified:
        log.warning("resuming from %s: written before checkpoints had checksums, not verified", path)
    return path


def _write(accelerator, tmp: Path, final: Path, state: dict, extra: dict | None) -> None:
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
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


def _prune(out: Path, step: int, keep_last: int) -> None:
    kept = []
    for p in list_checkpoints(out):
        if checkpoint_step(p) > step:
            # Left by an earlier run that went further before this one resumed from an older checkpoint:
            # that future was abandoned, and resume=auto must not jump back onto it.
            log.warning("removing %s: newer than the resumed run's step %d (an abandoned continuation)", p, step)
            shutil.rmtree(p, ignore_errors=True)
        else:
            kept.append(p)
    for old in kept[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, *, keep_last: int,
                    extra: dict | None = None) -> Path:
    """Save the accelerate state, ``extra`` (torch objects: scheduler, moving reference), ``state`` (json) and
    the checksums atomically, then prune to ``keep_last``. A failed write (full disk, ...) removes its temporary
    directory, leaves every earlier checkpoint intact and raises :class:`SaveError`."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step:07d}"
    tmp = out / f"checkpoint-{step:07d}.tmp"
    failure = None
    try:
        _write(accelerator, tmp, final, state, extra)
    except Exception as err:
        if not is_write_failure(err):
            raise
        release_files(err)
        shutil.rmtree(tmp, ignore_errors=True)
        failure = err
    if failure is None and accelerator.is_main_process:
        _prune(out, step, keep_last)
    accelerator.wait_for_everyone()
    if failure is not None:
        previous = list_checkpoints(out)
        kept = f"the newest intact checkpoint is {previous[-1]}" if previous else "no earlier checkpoint exists"
        raise SaveError([f"writing checkpoint {final} failed: {describe_os_error(failure)} (the partial {tmp} "
                         f"was removed)", f"{kept}; fix: free space in (or make writable) {out}, then rerun with "
                         "run.resume=auto"], source=str(out)) from failure
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

