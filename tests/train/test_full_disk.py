"""A disk that fills up mid-run (issue 18): the run ends with one clean :class:`SaveError` naming the checkpoint
path, the cause and the fix, the partial checkpoint is gone, the previous complete one verifies, and the rerun
with ``run.resume=auto`` (after space is freed) ends with the weights of an uninterrupted run.

Two ways to fill the disk:

* fault injection, always available: the write of one file of checkpoint 4 (model weights through safetensors,
  optimizer / RNG / loop state through ``torch.save``, ``trainer_state.json`` / ``checksums.json`` through
  ``Path.write_text``) writes half its bytes and raises ``OSError(ENOSPC)``, as a full disk does mid-file;
* a real tmpfs of a few hundred KiB (only as root where ``mount -t tmpfs`` works; skipped elsewhere), sized so
  that checkpoint 2 fits and checkpoint 4 does not; it is then grown (``mount -o remount``) and the run resumed.
  It found two faults, fixed in ``mmalign/train/checkpoint.py``: torch.save reports a full disk only as
  ``unexpected pos N vs M`` (now named "No space left on device"), and its writer kept the removed partial file
  open, so its space stayed taken while the error lived.

The run is ``tests/train/test_integrity.py``'s: tiny DPO Llama with attention dropout, 4 steps, one CPU thread,
``run.check_disk_space=false`` (the start-up estimate would refuse the small disk; here it fills while running).
"""

from __future__ import annotations

import errno
import io
import os
import pathlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mmalign.train import checkpoint as ckpt

from .test_integrity import STEPS, _argv, _assert_same_weights, _train, _train_steps

FILES = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "loop_extra.pt", "trainer_state.json",
         "checksums.json"]
FAILING_STEP = "checkpoint-0000004.tmp"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from mmalign.data.synthetic import addition_rows, write_jsonl

    d = tmp_path_factory.mktemp("full_disk_data")
    write_jsonl(addition_rows(24, seed=0), d / "train.jsonl")
    return d


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full_disk_straight") / "run"
    assert _train(_argv(out, data, "run.save_every=2"))["global_step"] == STEPS
    return out


def _enospc(path: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _fill_disk_at(monkeypatch, name: str) -> list[str]:
    """Make the write of ``<FAILING_STEP>/<name>`` leave half its bytes and raise ENOSPC; returns the names
    written into that directory (to check that the injection was reached)."""
    import accelerate.utils.other as acc_other
    import safetensors.torch

    written: list[str] = []

    def hit(path) -> bool:
        p = Path(str(path))
        if p.parent.name != FAILING_STEP:
            return False
        written.append(p.name)
        return p.name == name

    def half(path, data: bytes) -> None:
        Path(str(path)).write_bytes(data[: len(data) // 2])

    real_torch_save, real_write_text = torch.save, pathlib.Path.write_text
    real_safe = acc_other.safe_save_file

    def torch_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and hit(f):
            buf = io.BytesIO()
            real_torch_save(obj, buf, *args, **kwargs)
            half(f, buf.getvalue())
            raise _enospc(Path(f))
        return real_torch_save(obj, f, *args, **kwargs)

    def safe_save_file(tensors, filename, metadata=None):
        if hit(filename):
            half(filename, safetensors.torch.save(tensors, metadata=metadata))
            raise _enospc(Path(filename))
        return real_safe(tensors, filename, metadata=metadata)

    def write_text(self, text, *args, **kwargs):
        if hit(self):
            real_write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise _enospc(self)
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(acc_other, "safe_save_file", safe_save_file)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    return written


def _assert_clean_full_disk(err: ckpt.SaveError, out: Path) -> None:
    text = str(err)
    assert f"writing checkpoint {out / 'checkpoint-0000004'} failed: No space left on device" in text, text
    assert f"the newest intact checkpoint is {out / 'checkpoint-0000002'}" in text, text
    assert "fix: free space in" in text and "run.resume=auto" in text, text
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-0000002"]
    assert not list(out.glob("*.tmp")), "the partial checkpoint was left behind"
    assert ckpt.verify_checkpoint(out / "checkpoint-0000002") == ([], True)
    assert not (out / "final").exists()


def _full_disk_then_resume(name: str, data: Path, straight: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = _argv(out, data, "run.save_every=2", "run.check_disk_space=false")
    with pytest.MonkeyPatch.context() as mp:
        written = _fill_disk_at(mp, name)
        with pytest.raises(ckpt.SaveError) as err:
            _train(argv)
    assert name in written, f"the injection never reached {name}: {written}"
    _assert_clean_full_disk(err.value, out)
    summary = _train(argv)  # space freed: resume=auto continues from checkpoint 2
    assert summary["global_step"] == STEPS
    _assert_same_weights(out, straight)
    assert _train_steps(out) == list(range(1, STEPS + 1))


def test_full_disk_while_writing_the_weights(data, straight, tmp_path):
    _full_disk_then_resume("model.safetensors", data, straight, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES[1:])
def test_full_disk_at_every_other_file_of_a_checkpoint(name, data, straight, tmp_path):
    _full_disk_then_resume(name, data, straight, tmp_path)


# -- a real small filesystem -----------------------------------------------------------------------------------------


def _mount(target: Path, size: int, remount: bool = False) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    opts = f"{'remount,' if remount else ''}size={size}"
    cmd = ["mount", "-o", opts, str(target)] if remount else ["mount", "-t", "tmpfs", "-o", opts, "tmpfs",
                                                                str(target)]
    return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0


def _open_files_under(folder: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


@pytest.mark.slow
def test_a_real_tmpfs_fills_up_then_grows(data, straight, tmp_path):
    one = sum(p.stat().st_size for p in (straight / "checkpoint-0000002").iterdir())
    disk = tmp_path / "disk"
    disk.mkdir()
    # Room for config, metrics and one checkpoint, not two (tmpfs counts whole 4 KiB pages).
    if not _mount(disk, one + one // 2 + (64 << 10)):
        pytest.skip("cannot mount a tmpfs here (needs root and mount); the fault-injection tests cover the logic")
    try:
        out = disk / "run"
        argv = _argv(out, data, "run.save_every=2", "run.check_disk_space=false")
        with pytest.raises(ckpt.SaveError) as err:
            _train(argv)
        _assert_clean_full_disk(err.value, out)
        # The removed partial file is really gone: torch.save's writer used to keep it open (and its space taken)
        # for as long as the error lived.
        assert not _open_files_under(disk)
        assert _mount(disk, 64 << 20, remount=True)  # what the error's fix asks for: more space
        assert _train(argv)["global_step"] == STEPS
        _assert_same_weights(out, straight)
        assert _train_steps(out) == list(range(1, STEPS + 1))
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True, timeout=20).returncode:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=20)
