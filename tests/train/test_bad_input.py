"""Bad input through ``mmalign.api.train``: every bad row or file stops the run with a DataError that names the
file, the row and the problem (or, with ``data.skip_bad_rows=true``, is skipped and counted in the run's
logs); a bad config gives one ConfigError listing every problem; and a failed restart loses nothing that an
earlier run wrote."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from mmalign.api import train
from mmalign.config import ConfigError
from mmalign.data.rows import DataError
from mmalign.data.synthetic import addition_rows, write_jsonl
from mmalign.train.metrics_log import read_metrics

from .conftest import config

GOOD = addition_rows(6, format="pairs", seed=11)
# (bad row, reason counted when skipped, text the error must contain)
BAD_ROWS = {
    "missing_field": ({"prompt": "add: 1 2 =", "chosen": " 3"}, "field 'rejected' is missing"),
    "empty_completion": ({"prompt": "add: 1 2 =", "chosen": "", "rejected": " 4"},
                         "field 'chosen' is an empty completion"),
    "bad_type": ({"prompt": "add: 1 2 =", "chosen": 3, "rejected": " 4"}, "field 'chosen' must be a string"),
}


def _write_with_bad_row(path: Path, bad: dict, at: int = 3) -> Path:
    rows = list(GOOD)
    rows.insert(at - 1, bad)  # 1-based line number `at`
    return write_jsonl(rows, path)


def _data_event(out: Path) -> dict:
    return next(m for m in read_metrics(out) if m.get("event") == "data")


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_row_raises_data_error(reason, tokenizer_dir, tmp_path):
    bad, text = BAD_ROWS[reason]
    path = _write_with_bad_row(tmp_path / "pairs.jsonl", bad, at=3)
    with pytest.raises(DataError) as err:
        train(config(tmp_path / "out", [path], tokenizer=tokenizer_dir))
    msg = str(err.value)
    assert f"{path}:3:" in msg and text in msg and "fix:" in msg, msg
    assert [(p.file, p.row, p.reason) for p in err.value.problems] == [(str(path), 3, reason)]


def test_truncated_jsonl_line_raises_data_error(tokenizer_dir, tmp_path):
    path = write_jsonl(GOOD, tmp_path / "pairs.jsonl")
    with path.open("a") as f:
        f.write('{"prompt": "add: 1 2 =", "chosen": " 3", "rej')  # a write cut off mid-line
    with pytest.raises(DataError, match=rf"{path}:7: invalid JSON on line 7"):
        train(config(tmp_path / "out", [path], tokenizer=tokenizer_dir))


@pytest.mark.parametrize("skip", [False, True])
def test_garbage_parquet_raises_data_error(skip, tokenizer_dir, tmp_path):
    """A file that cannot be read at all is an error even with skip_bad_rows (there is no row to skip)."""
    path = tmp_path / "pairs.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(DataError, match=rf"{path}: cannot read parquet file"):
        train(config(tmp_path / "out", [path], tokenizer=tokenizer_dir, data={"skip_bad_rows": skip}))


def test_long_prompt_keeps_its_end_and_is_counted(tokenizer_dir, tmp_path):
    """The recipe's truncation mode keeps the end of a prompt longer than max_length (the BOS stays) instead
    of dropping the row; the cut is counted in the data event of metrics.jsonl."""
    rows = list(GOOD)
    rows[1] = {**rows[1], "prompt": "add: " + " ".join(["1"] * 200) + " ="}
    path = write_jsonl(rows, tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    summary = train(config(out, [path], tokenizer=tokenizer_dir, data={"max_length": 24}, run={"max_steps": 1}))
    assert summary["global_step"] == 1
    event = _data_event(out)
    assert event["encode/prompts_truncated"] == 1 and event["rows_used"] == len(rows)


def test_long_prompt_with_keep_start_raises_data_error(tokenizer_dir, tmp_path):
    rows = list(GOOD)
    rows[1] = {**rows[1], "prompt": "add: " + " ".join(["1"] * 200) + " ="}
    path = write_jsonl(rows, tmp_path / "pairs.jsonl")
    with pytest.raises(DataError, match=rf"{path}:2: field 'prompt' is \d+ tokens and fills max_length=24"):
        train(config(tmp_path / "out", [path], tokenizer=tokenizer_dir,
                     data={"max_length": 24, "truncation": "keep_start"}))


def test_skip_bad_rows_skips_and_counts(tokenizer_dir, tmp_path, caplog):
    rows = list(GOOD)
    for i, (bad, _) in enumerate(BAD_ROWS.values()):
        rows.insert(2 * i + 1, bad)
    path = write_jsonl(rows, tmp_path / "pairs.jsonl")
    with path.open("a") as f:
        f.write('{"prompt": "add: 1 2 =", "cho\n')
    eval_path = write_jsonl([*GOOD[:3], {"prompt": "p", "chosen": " 1"}], tmp_path / "eval.jsonl")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        summary = train(config(out, [path], tokenizer=tokenizer_dir, run={"max_steps": 2},
                               data={"skip_bad_rows": True, "eval": [str(eval_path)]}))
    assert summary["global_step"] == 2
    event = _data_event(out)
    assert event["rows_read"] == len(GOOD) + 4 and event["rows_used"] == len(GOOD) and event["rows_skipped"] == 4
    assert {k: v for k, v in event.items() if k.startswith("skipped/")} == {
        "skipped/bad_type": 1, "skipped/empty_completion": 1, "skipped/invalid_json": 1, "skipped/missing_field": 1}
    assert event["eval/rows_skipped"] == 1 and event["eval/skipped/missing_field"] == 1
    assert "rows skipped" in caplog.text  # said on the console too
    logged = {k: v for k, v in event.items() if k not in ("step", "time", "event", "stage")}
    assert summary["stages"][0]["data"] == logged  # and in the returned summary


def test_bad_config_lists_every_problem(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as err:
        train(None, ["data.train=[x.jsonl]", f"run.output_dir={out}", "optim.lrr=1e-3", "run.batch_size=zero",
                     "reference.strategy=bogus", "optim.lr=-1"])
    text = "\n".join(err.value.errors)
    assert len(err.value.errors) == 4, text
    for needle in ("optim.lrr", "did you mean", "run.batch_size", "reference.strategy", "bogus", "lr=-1"):
        assert needle in text, (needle, text)
    assert not out.exists()  # refused before anything is written


def test_bad_loss_options_listed_before_training(tokenizer_dir, tmp_path):
    """Loss names and loss.kwargs of the run and of every stage are checked together, before any training (a
    typo in loss.kwargs used to surface as a TypeError at step 1)."""
    path = write_jsonl(GOOD, tmp_path / "pairs.jsonl")
    cfg = config(tmp_path / "out", [path], tokenizer=tokenizer_dir, loss={"name": "alphapo", "kwargs": {"betta": 1}},
                 stages=[{"name": "a", "max_steps": 1, "loss": {"name": "dpoo"}},
                         {"name": "b", "max_steps": 1, "loss": {"name": "sft", "kwargs": {"beta": 0.1}}}])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    errors = err.value.errors
    assert len(errors) == 4, errors
    assert errors[0].startswith("loss.kwargs.betta: not an option of loss 'alphapo'; valid: ['alpha', 'beta'")
    assert errors[1].startswith("loss.kwargs.alpha: loss 'alphapo' needs a value")
    assert errors[2].startswith("stages.0.loss.name='dpoo' is not a text method; valid: ['alphapo'")
    assert errors[3].startswith("stages.1.loss.kwargs.beta: not an option of loss 'sft'")
    assert not list((tmp_path / "out").glob("metrics.jsonl"))


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_failed_resume_loses_nothing(tokenizer_dir, tmp_path):
    """A run checkpoints; the data file is then corrupted and the run restarted with resume=auto: it stops with
    a DataError, and the checkpoints, metrics and final model of the first run are byte-for-byte intact."""
    path = write_jsonl(GOOD, tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    cfg = config(out, [path], tokenizer=tokenizer_dir,
                 run={"max_steps": 2, "save_every": 1, "keep_last": 2, "save_final": True, "resume": "auto"})
    train(cfg)
    before = _tree(out)
    assert any(k.startswith("checkpoint-0000002/") for k in before) and "metrics.jsonl" in before
    assert any(k.startswith("final/") for k in before)
    with path.open("a") as f:
        f.write('{"prompt": "add: 1 2 =", "chosen"\n')
    with pytest.raises(DataError, match=rf"{path}:7"):
        train(cfg)
    assert _tree(out) == before
    assert json.loads((out / "checkpoint-0000002" / "trainer_state.json").read_text())["global_step"] == 2
