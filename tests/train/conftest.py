"""Shared pieces of the end-to-end training tests: synthetic data files, one saved tokenizer, a tiny model
config, and :func:`run` (build the task, snapshot its trainable weights, train through ``mmalign.api.train``).

The tokenizer is trained once per session and passed as ``model.tokenizer``, so runs on different files use
the same vocabulary (and skip retraining a BPE each time); the ``tiny`` path that trains one from the run's
data is covered by the stage tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from mmalign.api import build_task, load_train_config, train
from mmalign.data.synthetic import addition_rows, corpus, write_jsonl
from mmalign.train.metrics_log import read_metrics

# ~20k parameters: a few milliseconds per step on one CPU core.
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
        "initializer_range": 0.1}
NON_METRIC_KEYS = {"step", "time", "stage", "epoch", "event"}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One small file per format (8 rows each), plus a retain set and a second, different pairs file."""
    d = tmp_path_factory.mktemp("data")
    write_jsonl(addition_rows(8, format="pairs", seed=1), d / "pairs.jsonl")
    write_jsonl(addition_rows(8, format="pairs", seed=2), d / "pairs_b.jsonl")
    write_jsonl(addition_rows(8, format="unpaired", seed=3), d / "unpaired.jsonl")
    write_jsonl(addition_rows(8, format="ranked", seed=4, num_candidates=3), d / "ranked.jsonl")
    write_jsonl(addition_rows(8, format="sft", seed=5), d / "sft.jsonl")
    write_jsonl(addition_rows(8, format="sft", seed=6), d / "retain.jsonl")
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from mmalign.models.tokenizer import train_bpe_tokenizer

    rows = [r for fmt in ("pairs", "unpaired", "ranked", "sft") for r in addition_rows(64, format=fmt, seed=0)]
    tok = train_bpe_tokenizer(corpus(rows), vocab_size=300)
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(str(path))
    return path


def config(out: Path, train_files: list[Path | str], *, tokenizer: Path | None = None, **sections: Any) -> dict:
    """A run config as a mapping: tiny model, jsonl logs only, no progress bar, fresh output directory.

    ``sections`` are merged one level deep into the defaults (``run={"max_steps": 2}`` keeps the other run keys).
    """
    cfg: dict[str, Any] = {
        "model": {"name_or_path": "tiny", "tiny": dict(TINY)},
        "data": {"train": [str(p) for p in train_files], "max_length": 64},
        "optim": {"lr": 1e-3, "scheduler": "constant", "max_grad_norm": None},
        "run": {"output_dir": str(out), "max_steps": 3, "batch_size": 4, "resume": "never", "report_to": ["jsonl"],
                "progress": False, "save_final": False, "seed": 0},
    }
    if tokenizer is not None:
        cfg["model"]["tokenizer"] = str(tokenizer)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


@dataclass
class Run:
    summary: dict
    task: Any
    before: dict[str, torch.Tensor]  # trainable parameters before training
    frozen_before: dict[str, torch.Tensor]
    metrics: list[dict]

    @property
    def step_records(self) -> list[dict]:
        return [r for r in self.metrics if "loss" in r and "event" not in r]


def run(cfg: dict, overrides: list[str] = ()) -> Run:
    """Train through the public API with a task built here, so its weights can be compared before/after."""
    task = build_task(load_train_config(cfg, overrides))
    params = dict(task.model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
    summary = train(cfg, overrides, task=task)
    return Run(summary, task, before, frozen, read_metrics(summary["metrics_file"]))


def unchanged_trainable(r: Run) -> list[str]:
    after = dict(r.task.model.named_parameters())
    return [n for n, p in r.before.items() if torch.equal(p, after[n].detach())]


def changed_frozen(r: Run) -> list[str]:
    after = dict(r.task.model.named_parameters())
    return [n for n, p in r.frozen_before.items() if not torch.equal(p, after[n].detach())]


def non_finite_metrics(records: list[dict]) -> list[tuple[int, str, Any]]:
    """(step, key, value) of every logged metric that is not a finite float (the logger writes NaN as 'nan')."""
    bad = []
    for rec in records:
        for k, v in rec.items():
            if k in NON_METRIC_KEYS:
                continue
            if not isinstance(v, float) or not math.isfinite(v):
                bad.append((rec["step"], k, v))
    return bad
