"""Resuming into an output directory that holds a run (issue 17, bug 3): the same training config resumes and
says so; a changed one is refused naming the keys (old → new) unless ``run.resume=force``; a finished ``final/``
is never replaced by a run that starts over without ``run.overwrite=true``; checkpoints written before configs
were stored still resume (with a warning)."""

from __future__ import annotations

import json
import logging

import pytest

from mmalign.api import train
from mmalign.config import ConfigError
from mmalign.train import checkpoint as ckpt
from mmalign.train.output_guard import IGNORED, config_diff, training_config

from .conftest import config


def _cfg(tmp_path, data_dir, tokenizer_dir, **run):
    return config(tmp_path / "out", [data_dir / "pairs.jsonl"], tokenizer=tokenizer_dir,
                  loss={"name": "dpo", "kwargs": {"beta": 0.1, "loss_type": "sigmoid"}},
                  run={"max_steps": 2, "save_every": 1, "resume": "auto", "save_final": True, **run})


def test_same_config_resumes_and_says_so(tmp_path, data_dir, tokenizer_dir, capsys):
    cfg = _cfg(tmp_path, data_dir, tokenizer_dir)
    train(cfg)
    stored = ckpt.read_state(ckpt.list_checkpoints(cfg["run"]["output_dir"])[-1])["config"]
    assert stored["loss.kwargs.loss_type"] == "sigmoid" and not set(stored) & IGNORED
    capsys.readouterr()
    # keys that do not change training (logging, progress, checkpoint schedule) may change
    summary = train(cfg, ["run.log_every=2", "run.progress=false", "run.keep_last=3"])
    err = capsys.readouterr().err
    assert "resuming from" in err and "same training config" in err
    assert summary["global_step"] == 2


def test_changed_config_is_refused_with_the_keys(tmp_path, data_dir, tokenizer_dir):
    cfg = _cfg(tmp_path, data_dir, tokenizer_dir)
    train(cfg)
    out = tmp_path / "out"
    before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        train(cfg, ["loss.kwargs.loss_type=ipo", "optim.lr=0.01"])
    text = str(err.value)
    assert "loss.kwargs.loss_type: 'sigmoid' → 'ipo'" in text and "optim.lr: 0.001 → 0.01" in text
    assert "run.resume=force" in text and "run.overwrite=true" in text and "run.output_dir" in text
    assert (out / "config.yaml").read_text() == before  # nothing written


def test_force_resumes_a_changed_config(tmp_path, data_dir, tokenizer_dir, capsys):
    cfg = _cfg(tmp_path, data_dir, tokenizer_dir)
    train(cfg)
    capsys.readouterr()
    summary = train(cfg, ["loss.kwargs.loss_type=ipo", "run.resume=force"])
    assert "under a changed config: loss.kwargs.loss_type" in capsys.readouterr().err
    assert summary["global_step"] == 2


def test_finished_final_is_not_overwritten(tmp_path, data_dir, tokenizer_dir):
    cfg = _cfg(tmp_path, data_dir, tokenizer_dir, save_every=0)
    train(cfg)
    final = tmp_path / "out" / "final"
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(final) in str(err.value) and "run.overwrite=true" in str(err.value)
    assert "run.output_dir" in str(err.value)
    with pytest.raises(ConfigError, match="holds the final model"):
        train(cfg, ["run.resume=never"])
    stamp = (final / "config.json").stat().st_mtime_ns
    train(cfg, ["run.overwrite=true"])
    assert (final / "config.json").stat().st_mtime_ns != stamp


def test_overwrite_starts_over_and_removes_old_checkpoints(tmp_path, data_dir, tokenizer_dir):
    cfg = _cfg(tmp_path, data_dir, tokenizer_dir)
    train(cfg)
    summary = train(cfg, ["run.overwrite=true", "loss.kwargs.loss_type=ipo", "run.save_every=0"])
    assert summary["global_step"] == 2 and "resumed" not in json.dumps(summary)
    assert ckpt.list_checkpoints(tmp_path / "out") == []


def test_checkpoint_without_stored_config_resumes_with_a_warning(tmp_path, data_dir, tokenizer_dir, caplog,
                                                                  capsys):
    cfg = _cfg(tmp_path, data_dir, tokenizer_dir, max_steps=1)
    train(cfg)
    last = ckpt.list_checkpoints(tmp_path / "out")[-1]
    state = ckpt.read_state(last)
    del state["config"]  # as written before checkpoints stored their config
    (last / ckpt.STATE_FILE).write_text(json.dumps(state))
    (last / ckpt.MANIFEST_FILE).unlink()  # nor checksums (an edited file would rightly fail them)
    with caplog.at_level(logging.WARNING, logger="mmalign.train.output_guard"):
        summary = train(cfg, ["run.max_steps=2"])
    assert "not compared" in caplog.text and "config is unknown" in capsys.readouterr().err
    assert summary["global_step"] == 2


def test_config_diff_compares_stages_up_to_the_checkpoints():
    old = {"stages.0.lr": 0.1, "stages.1.lr": 0.2, "seed": 0}
    new = {"stages.0.lr": 0.1, "stages.1.lr": 0.3, "stages.2.lr": 0.1, "seed": 0}
    assert config_diff(old, new, stage_idx=0) == []
    assert config_diff(old, new, stage_idx=1) == ["stages.1.lr: 0.2 → 0.3"]
    assert config_diff({"a": 1}, {"b": 2}) == ["a: 1 → '(not set)'", "b: '(not set)' → 2"]


def test_ignored_keys_are_run_keys_that_exist():
    from mmalign.api import load_train_config
    from mmalign.config import to_dict

    run_keys = {f"run.{k}" for k in to_dict(load_train_config({}).run)}
    assert IGNORED <= run_keys
    assert "run.seed" in training_config(load_train_config({}))


def test_cli_refusal_exits_2(tmp_path, data_dir, tokenizer_dir):
    from typer.testing import CliRunner

    from mmalign.api import load_train_config
    from mmalign.cli import app
    from mmalign.config import dump_yaml

    cfg = _cfg(tmp_path, data_dir, tokenizer_dir)
    train(cfg)
    path = dump_yaml(load_train_config(cfg), tmp_path / "cfg.yaml")
    res = CliRunner().invoke(app, ["train", str(path), "loss.kwargs.loss_type=ipo"])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output, res.output
