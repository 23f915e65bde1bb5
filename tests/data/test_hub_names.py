"""Hub dataset ids in ``data.train`` (usability issue, item 5): a name that is not a local path goes to
``datasets.load_dataset(name, subset, split=..., streaming=...)``; offline, the error says the hub could not be
reached (not "no such file")."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from mmalign.api import train
from mmalign.data.row_files import HubOptions, load_rows, looks_like_hub_id
from mmalign.data.rows import DataError
from mmalign.data.synthetic import addition_rows

ROOT = Path(__file__).resolve().parents[2]


def test_what_reads_as_a_hub_id(tmp_path):
    (tmp_path / "local.jsonl").write_text("{}\n")
    assert looks_like_hub_id("trl-lib/ultrafeedback_binarized")
    assert looks_like_hub_id("imdb")
    assert not looks_like_hub_id(str(tmp_path / "local.jsonl"))  # exists
    assert not looks_like_hub_id("missing.jsonl")  # a data file name: a missing file, not a hub id
    assert not looks_like_hub_id("data/a/b.jsonl") and not looks_like_hub_id("a/b/c")


def test_missing_file_is_still_no_such_file():
    with pytest.raises(DataError, match="no such file or directory"):
        load_rows("data/missing.jsonl")


def test_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_rows("trl-lib/ultrafeedback_binarized")
    msg = str(err.value)
    assert "hub could not be reached" in msg and "no such file" not in msg and "save_to_disk" in msg


def _fake_hub(monkeypatch, rows):
    calls = []

    def load_dataset(name, subset=None, *, split, streaming=False):
        calls.append((name, subset, split, streaming))
        if split != "train_prefs":
            raise ValueError(f"Unknown split {split!r}. Should be one of ['train_prefs', 'test_prefs'].")
        ds = datasets.Dataset.from_list(rows)
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_rows_with_split_subset_streaming(monkeypatch):
    rows = addition_rows(6, format="pairs", seed=0)
    calls = _fake_hub(monkeypatch, rows)
    got = load_rows(["org/prefs"], hub=HubOptions("train_prefs", "default", True), limit=4)
    assert calls == [("org/prefs", "default", "train_prefs", True)]
    assert [r for _, _, r in got] == rows[:4] and got[0][:2] == ("hub:org/prefs", 1)
    with pytest.raises(DataError, match=r"data.hub_split"):
        load_rows(["org/prefs"], hub=HubOptions("nope"))


def test_training_on_a_hub_name(monkeypatch, tmp_path):
    calls = _fake_hub(monkeypatch, addition_rows(16, format="pairs", seed=1))
    summary = train(ROOT / "configs/text/tiny_dpo.yaml",
                    ["data.train=[org/prefs]", "data.eval=[]", "data.hub_split=train_prefs", "run.max_steps=1",
                     "run.batch_size=4", "run.progress=false", "run.save_final=false",
                     f"run.output_dir={tmp_path / 'out'}"])
    assert [s["steps"] for s in summary["stages"]] == [1]
    assert calls and all(c == ("org/prefs", None, "train_prefs", False) for c in calls)
