"""Nothing trained is lost, nothing damaged is resumed (issue 18 items 5-7).

* The final save is atomic (``final.tmp`` → verified → renamed) and the final state is kept as a checkpoint
  while it is written: a full disk during the export is a clean error naming the path and the cause, and the
  rerun resumes at the last step, trains nothing and writes ``final/`` with the weights of an uninterrupted run.
* Checkpoints carry sha256 checksums (``checksums.json``, written last); a damaged newest checkpoint is skipped
  with a warning naming the file, and the run resumes bit-identically from the previous one; a missing RNG
  state is refused (``run.resume=force`` proceeds, saying that exactness is lost); a checkpoint that cannot be
  written is a clean error that leaves the previous one intact.
* A resumed run drops the metrics records after its checkpoint; a refused run leaves ``config.yaml`` alone.

The run: tiny DPO Llama with attention dropout (the RNG state matters), one stage of 4 steps, one CPU thread.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.api import build_task, load_train_config, train
from mmalign.config import ConfigError
from mmalign.data.synthetic import addition_rows, write_jsonl
from mmalign.train import checkpoint as ckpt
from mmalign.train.metrics_log import read_metrics, truncate_metrics

TINY = "{hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 64, attention_dropout: 0.1}"
STEPS = 4


def _argv(out: Path, data: Path, *more: str) -> list[str]:
    return [f"run.output_dir={out}", f"data.train=[{data / 'train.jsonl'}]", f"model.tiny={TINY}",
            f"run.max_steps={STEPS}", "loss.name=dpo", "optim.lr=1e-3", "run.batch_size=4", "run.keep_last=10",
            "run.seed=3", "run.deterministic=true", "run.progress=false", "run.report_to=[jsonl]",
            "run.log_every=1", "run.resume=auto", *more]


def _train(argv: list[str], task_hook=None) -> dict:
    """One in-process run; ``task_hook(task)`` may patch the task first (fault injection)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_train_config(None, argv)
        task = build_task(cfg)
        if task_hook is not None:
            task_hook(task)
        return train(cfg, task=task)
    finally:
        torch.set_num_threads(threads)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert not [k for k in wa if not torch.equal(wa[k], wb[k])]


def _train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out) if "loss" in r and "event" not in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("integrity_data")
    write_jsonl(addition_rows(24, seed=0), d / "train.jsonl")
    return d


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """The uninterrupted run, with a checkpoint every 2 steps (kept: the corruption tests copy it)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    summary = _train(_argv(out, data, "run.save_every=2"))
    assert summary["global_step"] == STEPS
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-0000002", "checkpoint-0000004"]
    return out


def _copy(straight: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "final")
    return out


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# -- item 5: the final save ------------------------------------------------------------------------------------------


def _full_disk_during_export(task) -> None:
    def save_pretrained(model, path, state_dict=None):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text("{}")  # what a real full disk left: config files, no weights
        _no_space()

    task.save_pretrained = save_pretrained


def test_full_disk_during_final_save_keeps_the_state_and_the_rerun_exports_it(straight, data, tmp_path):
    out = tmp_path / "run"
    argv = _argv(out, data)  # run.save_every=0 (the default): no scheduled checkpoint
    with pytest.raises(ckpt.SaveError) as err:
        _train(argv, task_hook=_full_disk_during_export)
    text = str(err.value)
    assert "No space left on device" in text and str(out / "final") in text
    assert "checkpoint-0000004" in text and "run.resume=auto" in text
    assert not (out / "final").exists() and not (out / "final.tmp").exists()
    kept = ckpt.list_checkpoints(out)
    assert [p.name for p in kept] == ["checkpoint-0000004"] and ckpt.verify_checkpoint(kept[0]) == ([], True)

    (out / "final.tmp").mkdir()  # as a kill during the export would leave it: cleaned at the next start
    (out / "final.tmp" / "config.json").write_text("{}")
    summary = _train(argv)  # the rerun: resumes at step 4, trains nothing, exports
    assert summary["global_step"] == STEPS and summary["final_model"] == str(out / "final")
    assert not (out / "final.tmp").exists()
    assert ckpt.list_checkpoints(out) == []  # the checkpoint kept for the export is gone once final/ is written
    _assert_same_weights(out, straight)
    assert _train_steps(out) == list(range(1, STEPS + 1))


def test_an_export_that_does_not_read_back_is_refused(data, tmp_path):
    def truncating(task):
        save = task.save_pretrained

        def save_pretrained(model, path, state_dict=None):
            save(model, path, state_dict=state_dict)
            f = Path(path) / "model.safetensors"
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

        task.save_pretrained = save_pretrained

    out = tmp_path / "run"
    with pytest.raises(ckpt.SaveError, match="model.safetensors: does not read back"):
        _train(_argv(out, data, "run.max_steps=2"), task_hook=truncating)
    assert not (out / "final").exists() and [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-0000002"]


def test_a_failed_export_leaves_the_previous_final_alone(straight, data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = _weights(out)
    with pytest.raises(ckpt.SaveError):  # resumes at step 4 (nothing to train) and exports again: fails
        _train(_argv(out, data, "run.save_every=2"), task_hook=_full_disk_during_export)
    after = _weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-0000002", "checkpoint-0000004"]


def test_verify_export_names_what_is_wrong(tmp_path):
    from mmalign.train.final_save import verify_export

    assert verify_export(tmp_path) == ["no weight file was written"]
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text("{")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    problems = verify_export(tmp_path)
    assert "model.safetensors: empty" in problems and any(p.startswith("config.json: does not parse") for p in problems)
    assert "model.safetensors.index.json: names model-1.safetensors, which is missing" in problems


# -- item 6: checkpoint integrity --------------------------------------------------------------------------------


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])


def _flip(f: Path) -> None:
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))


@pytest.mark.parametrize(("name", "damage"), [("model.safetensors", _truncate), ("model.safetensors", _flip),
                                              ("optimizer.bin", _truncate), ("loop_extra.pt", _truncate),
                                              ("trainer_state.json", _truncate), ("random_states_0.pkl", _truncate)])
def test_a_damaged_newest_checkpoint_falls_back_with_a_warning(straight, tmp_path, caplog, name, damage):
    out = _copy(straight, tmp_path)
    damage(out / "checkpoint-0000004" / name)
    with caplog.at_level(logging.WARNING, logger="mmalign.train.checkpoint"):
        chosen = ckpt.find_resume_checkpoint(out, "auto")
    assert chosen == out / "checkpoint-0000002"
    assert "checkpoint-0000004" in caplog.text and name in caplog.text and "falling back" in caplog.text


def test_resume_after_a_fallback_is_exact(straight, data, tmp_path, caplog):
    out = _copy(straight, tmp_path)
    _flip(out / "checkpoint-0000004" / "model.safetensors")
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"step": 4, "lo')  # cut by a kill
    with caplog.at_level(logging.WARNING, logger="mmalign.train.checkpoint"):
        summary = _train(_argv(out, data, "run.save_every=2"))
    assert "model.safetensors: checksum mismatch" in caplog.text
    assert summary["global_step"] == STEPS
    _assert_same_weights(out, straight)
    assert _train_steps(out) == list(range(1, STEPS + 1))  # steps 3-4 logged once, not twice
    assert ckpt.verify_checkpoint(out / "checkpoint-0000004") == ([], True)  # rewritten by the resumed run


def test_no_intact_checkpoint_is_a_clean_error(straight, tmp_path):
    out = _copy(straight, tmp_path)
    for step in (2, 4):
        _truncate(out / f"checkpoint-{step:07d}" / "optimizer.bin")
    with pytest.raises(ConfigError) as err:
        ckpt.find_resume_checkpoint(out, "auto")
    assert "no checkpoint" in str(err.value) and "optimizer.bin: truncated" in str(err.value)
    assert "run.resume=never" in str(err.value)
    with pytest.raises(ConfigError, match="fails verification: optimizer.bin"):
        ckpt.find_resume_checkpoint(out, str(out / "checkpoint-0000004"))


def test_a_missing_rng_state_is_refused_unless_forced(straight, tmp_path, caplog):
    out = _copy(straight, tmp_path)
    (out / "checkpoint-0000004" / ckpt.RNG_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="mmalign.train.checkpoint"):
        assert ckpt.find_resume_checkpoint(out, "auto") == out / "checkpoint-0000002"  # the older one is exact
    assert "random_states_0.pkl: missing" in caplog.text
    (out / "checkpoint-0000002" / ckpt.RNG_FILE).unlink()
    with pytest.raises(ConfigError) as err:
        ckpt.find_resume_checkpoint(out, "auto")
    assert "random_states_0.pkl" in str(err.value) and "run.resume=force" in str(err.value)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmalign.train.checkpoint"):
        assert ckpt.find_resume_checkpoint(out, "force") == out / "checkpoint-0000004"
    assert "WITHOUT its RNG state" in caplog.text and "exactness is lost" in caplog.text


def test_checkpoints_without_checksums_resume_unverified(straight, tmp_path, caplog):
    out = _copy(straight, tmp_path)
    for p in ckpt.list_checkpoints(out):
        (p / ckpt.MANIFEST_FILE).unlink()  # as written before checksums
    with caplog.at_level(logging.WARNING, logger="mmalign.train.checkpoint"):
        assert ckpt.find_resume_checkpoint(out, "auto") == out / "checkpoint-0000004"
    assert "not verified" in caplog.text
    (out / "checkpoint-0000004" / ckpt.RNG_FILE).unlink()  # still refused without the RNG state: falls back
    assert ckpt.find_resume_checkpoint(out, "auto") == out / "checkpoint-0000002"


def test_a_checkpoint_that_cannot_be_written_is_a_clean_error(data, tmp_path, monkeypatch):
    write = ckpt.write_manifest

    def failing(directory):
        if "0000004" in directory.name:
            _no_space()
        write(directory)

    monkeypatch.setattr(ckpt, "write_manifest", failing)
    out = tmp_path / "run"
    with pytest.raises(ckpt.SaveError) as err:
        _train(_argv(out, data, "run.save_every=2"))
    text = str(err.value)
    assert "writing checkpoint" in text and "No space left on device" in text
    assert "checkpoint-0000002" in text  # the one that is intact
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-0000002"]
    assert not list(out.glob("*.tmp")) and ckpt.verify_checkpoint(out / "checkpoint-0000002") == ([], True)


# -- item 7: resume hygiene --------------------------------------------------------------------------------------------


def test_truncate_metrics_keeps_records_up_to_the_step(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 2, 3, 4)) + '{"step": 5, "lo')
    assert truncate_metrics(f, 2) == 3
    assert [r["step"] for r in read_metrics(f)] == [1, 2, 2]
    assert truncate_metrics(f, 2) == 0 and truncate_metrics(tmp_path / "absent.jsonl", 1) == 0


def test_a_refused_run_leaves_config_yaml_alone(straight, data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = (out / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match="different training config"):  # checkpoints of another config
        train(None, _argv(out, data, "optim.lr=2e-3"))
    assert (out / "config.yaml").read_bytes() == before
    for p in ckpt.list_checkpoints(out):
        shutil.rmtree(p)
    with pytest.raises(ConfigError, match="holds the final model"):  # a finished final/, nothing to resume
        train(None, _argv(out, data, "optim.lr=2e-3"))
    assert (out / "config.yaml").read_bytes() == before


# -- slow tier: SIGKILL during the final save and during a checkpoint write ----------------------------------------


def _killed_run(out: Path, data: Path, argv: list[str], marker: Path, timeout: float = 240.0, **env: str) -> None:
    """Run ``argv`` in a subprocess and SIGKILL it as soon as ``marker`` exists."""
    import subprocess
    import sys
    import time

    from . import _run_tiny

    here = Path(__file__).resolve().parent
    proc = subprocess.Popen([sys.executable, str(here / "_run_tiny.py"), *argv], cwd=here.parents[1],
                            env=_run_tiny.cpu_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.02)
    alive = proc.poll() is None
    proc.kill()
    _, err = proc.communicate()
    assert alive and marker.exists(), f"the run was not killed at {marker}; stderr:\n{err.decode()[-3000:]}"


@pytest.fixture(scope="module")
def straight_cpu(data, tmp_path_factory) -> Path:
    from . import _run_tiny

    out = tmp_path_factory.mktemp("straight_cpu") / "run"
    _run_tiny.run_cpu(_argv(out, data, "run.save_every=2"))
    return out


@pytest.mark.slow
def test_sigkill_during_the_final_save_then_resume_is_exact(straight_cpu, data, tmp_path):
    from . import _run_tiny

    out = tmp_path / "run"
    argv = _argv(out, data)  # run.save_every=0
    _killed_run(out, data, argv, out / "final.tmp" / "model.safetensors", MMALIGN_TEST_SAVE_SLEEP="60")
    assert not (out / "final").exists()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-0000004"]  # kept for the export
    summary = _run_tiny.run_cpu(argv)
    assert summary["global_step"] == STEPS and not (out / "final.tmp").exists()
    assert ckpt.list_checkpoints(out) == []
    _assert_same_weights(out, straight_cpu)
    assert _train_steps(out) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume_is_exact(straight_cpu, data, tmp_path):
    from . import _run_tiny

    out = tmp_path / "run"
    argv = _argv(out, data, "run.save_every=2")
    _killed_run(out, data, argv, out / "checkpoint-0000004.tmp" / ckpt.STATE_FILE, MMALIGN_TEST_CKPT_SLEEP="60:4")
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-0000002"]
    summary = _run_tiny.run_cpu(argv)
    assert summary["global_step"] == STEPS and not list(out.glob("*.tmp"))
    _assert_same_weights(out, straight_cpu)
    assert _train_steps(out) == list(range(1, STEPS + 1))
