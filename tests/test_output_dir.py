"""An output directory that cannot take a write is a clean config error before any model is built (issue 18,
item 4): a file, a path under a file, a full disk (fault-injected at the probe's fsync)."""

from __future__ import annotations

import errno
import os

import pytest

from mmalign.api import train, writable_output_dir
from mmalign.config import ConfigError


def test_a_file_and_a_path_under_a_file(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        writable_output_dir(f)
    with pytest.raises(ConfigError, match=r"cannot be written \(Not a directory"):
        writable_output_dir(f / "run")


def test_full_disk_is_named_before_training(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="No space left on device") as e:
        train("configs/text/tiny_dpo.yaml", ["run.max_steps=1", f"run.output_dir={out}"])
    assert "run.output_dir=" in str(e.value) and "fix:" in str(e.value)
    assert not (out / "config.yaml").exists() and not list(out.iterdir())  # the probe file was not left behind


def test_a_writable_directory_is_created_and_left_clean(tmp_path):
    out = tmp_path / "a" / "b"
    writable_output_dir(out)
    assert out.is_dir() and not list(out.iterdir())
