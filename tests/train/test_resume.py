"""Exact resume: a run killed with SIGKILL and restarted with ``run.resume=auto`` ends with bit-identical
weights and logs the same metrics as an uninterrupted run; so does a run resumed from an explicit checkpoint
(at a stage boundary, and inside a later stage with a re-anchored reference), and incomplete checkpoints
are never resumed from.

The run: tiny DPO Llama (attention dropout on, so the restored RNG state matters), 2 stages of 4 steps (the
second one with another learning rate and a re-anchored reference), a checkpoint every 2 steps, evaluation
every 3 steps, deterministic algorithms, one CPU thread.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.data.synthetic import addition_rows, write_jsonl
from mmalign.train.metrics_log import read_metrics

from . import _run_tiny

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TINY = "{hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 64, attention_dropout: 0.1}"
STAGES = "[{name: s0, max_steps: 4}, {name: s1, max_steps: 4, lr: 5.0e-4, reanchor_reference: true}]"


def _argv(out: Path, data: Path, *more: str, stages: str = STAGES, reference: str = "copy") -> list[str]:
    return [f"run.output_dir={out}", f"data.train=[{data / 'train.jsonl'}]", f"data.eval=[{data / 'eval.jsonl'}]",
            f"model.tiny={TINY}", f"stages={stages}", "loss.name=dpo", f"reference.strategy={reference}",
            "optim.lr=1e-3",
            "run.batch_size=4", "run.save_every=2", "run.keep_last=10", "run.eval_every=3", "run.seed=3",
            "run.deterministic=true", "run.progress=false", "run.report_to=[jsonl]", "run.resume=auto", *more]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"


def _kind(record: dict) -> str:
    if "event" in record:
        return f"event:{record['event']}"
    return "eval" if any(k.startswith("eval/") for k in record) else "train"


def _after_resume(out: Path) -> list[dict]:
    """Records logged after the last resume (the file is appended across restarts)."""
    records = read_metrics(out)
    last = max(i for i, r in enumerate(records) if r.get("event") == "resumed")
    return records[last + 1 :]


def _assert_same_metrics(resumed: list[dict], straight: Path) -> None:
    reference = {(r["step"], _kind(r)): r for r in read_metrics(straight)}
    assert resumed
    for rec in resumed:
        ref = reference[(rec["step"], _kind(rec))]
        strip = {"time"}
        assert {k: v for k, v in rec.items() if k not in strip} == {k: v for k, v in ref.items() if k not in strip}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("resume_data")
    write_jsonl(addition_rows(40, seed=0), d / "train.jsonl")
    write_jsonl(addition_rows(8, seed=1), d / "eval.jsonl")
    write_jsonl(addition_rows(24, seed=7), d / "train_b.jsonl")
    return d


class _Killed:
    """A training subprocess that a watcher thread SIGKILLs as soon as ``checkpoint-0000002`` is complete."""

    def __init__(self, out: Path, data: Path, sleep: float):
        self.out, self.checkpoint = out, out / "checkpoint-0000002"
        env = _run_tiny.cpu_env(MMALIGN_TEST_STEP_SLEEP=str(sleep))
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_run_tiny.py"), *_argv(out, data)], cwd=REPO,
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.killed = False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if (self.checkpoint / "trainer_state.json").is_file():  # written last, before the atomic rename
                self.proc.send_signal(signal.SIGKILL)
                self.killed = True
                return
            time.sleep(0.02)

    def wait(self) -> tuple[bool, str]:
        self.thread.join()
        if self.proc.poll() is None:  # the watcher timed out
            self.proc.kill()
        _, err = self.proc.communicate()
        return self.killed and self.proc.returncode == -signal.SIGKILL, err.decode(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def killed(data, tmp_path_factory) -> _Killed:
    # Started before `straight`, so that the subprocess's start-up overlaps the in-process reference run.
    return _Killed(tmp_path_factory.mktemp("killed") / "run", data, sleep=0.5)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """The uninterrupted run (keep_last=10 keeps every checkpoint for the explicit-resume tests)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    summary = _run_tiny.run_cpu(_argv(out, data))
    assert summary["global_step"] == 8
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s:07d}" for s in (2, 4, 6, 8)]
    return out


def test_sigkill_then_resume_auto_is_exact(killed, straight, data):
    ok, err = killed.wait()
    out = killed.out
    if not ok:  # too late (the run finished) or it crashed: one retry with a much slower run
        shutil.rmtree(out, ignore_errors=True)
        retry = _Killed(out, data, sleep=3.0)
        ok, err = retry.wait()
    assert ok, f"the run was not killed after its first checkpoint; stderr:\n{err}"
    assert not (out / "final").exists() and not (out / "summary-rank0.json").exists()
    before = [r["step"] for r in read_metrics(out) if _kind(r) == "train"]
    assert before and max(before) < 8

    summary = _run_tiny.run_cpu(_argv(out, data))  # the relaunch, with run.resume=auto

    assert summary["global_step"] == 8
    resumed = [r for r in read_metrics(out) if r.get("event") == "resumed"]
    assert len(resumed) == 1 and Path(resumed[0]["checkpoint"]).name.startswith("checkpoint-")
    start = resumed[0]["step"]
    assert start >= 2
    after = _after_resume(out)
    assert [r["step"] for r in after if _kind(r) == "train"] == list(range(start + 1, 9))
    _assert_same_metrics(after, straight)
    _assert_same_weights(out, straight)
    assert summary["stages"][-1]["eval"] == json.loads((straight / "summary-rank0.json").read_text())["stages"][-1][
        "eval"]


def test_resume_from_explicit_checkpoint_at_stage_boundary(straight, data, tmp_path):
    """Checkpoint 4 is the last step of stage s0: the resumed run trains no step of s0, evaluates it, then
    runs s1 (re-anchoring the reference on the restored weights)."""
    out = tmp_path / "run"
    summary = _run_tiny.run_cpu(_argv(out, data, f"run.resume={straight / 'checkpoint-0000004'}"))
    straight_summary = json.loads((straight / "summary-rank0.json").read_text())
    assert summary["global_step"] == 8
    assert summary["stages"][0]["final"] == straight_summary["stages"][0]["final"]  # restored from the checkpoint
    after = _after_resume(out)
    assert [r["step"] for r in after if _kind(r) == "train"] == [5, 6, 7, 8]
    _assert_same_metrics(after, straight)
    _assert_same_weights(out, straight)


def test_auto_resume_skips_incomplete_checkpoints_and_cleans_them(straight, data, tmp_path):
    """Inside stage s1 (s0 skipped, the re-anchored reference restored from the checkpoint); a newer ``.tmp``
    directory (a save cut short) and a newer directory without ``trainer_state.json`` are not resumed from."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(straight / "checkpoint-0000006", out / "checkpoint-0000006")
    (out / "checkpoint-0000007.tmp").mkdir()
    (out / "checkpoint-0000007.tmp" / "model.safetensors").write_bytes(b"half a file")
    (out / "checkpoint-0000008").mkdir()
    (out / "checkpoint-0000008" / "model.safetensors").write_bytes(b"no state file")

    summary = _run_tiny.run_cpu(_argv(out, data))

    assert not (out / "checkpoint-0000007.tmp").exists()
    assert summary["stages"][0] == {"name": "s0", "steps": 4, "skipped_on_resume": True}
    assert summary["global_step"] == 8
    resumed = [r for r in read_metrics(out) if r.get("event") == "resumed"]
    assert [Path(r["checkpoint"]).name for r in resumed] == ["checkpoint-0000006"]
    after = _after_resume(out)
    assert [r["step"] for r in after if _kind(r) == "train"] == [7, 8]
    _assert_same_metrics(after, straight)
    _assert_same_weights(out, straight)
    assert (out / "checkpoint-0000008" / "trainer_state.json").is_file()  # replaced by a complete save


def test_precomputed_reference_resumes_with_the_tables_it_trained_against(data, tmp_path, caplog):
    """Stage s1 trains on new data, which the precomputed strategy scores with the policy entering s1. A run
    resumed inside s1 must read that table (named in the checkpoint), not rescore the data with the weights
    it has at restart (the initial ones)."""
    stages = f"[{{name: s0, max_steps: 4}}, {{name: s1, max_steps: 4, train: [{data / 'train_b.jsonl'}]}}]"
    straight = tmp_path / "straight"
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        _run_tiny.run_cpu(_argv(straight, data, stages=stages, reference="precomputed"))
    assert "re-anchors here" in caplog.text or torch.cuda.is_available()  # (there it ran in a subprocess)
    assert len(list((straight / "ref_cache").glob("ref_scores-*.pt"))) == 3  # train s0, eval, train s1
    out = tmp_path / "resumed"
    summary = _run_tiny.run_cpu(_argv(out, data, f"run.resume={straight / 'checkpoint-0000006'}", stages=stages,
                                   reference="precomputed"))
    assert summary["reference_cache_reused"] is True
    assert not (out / "ref_cache").exists()  # nothing was rescored
    _assert_same_metrics(_after_resume(out), straight)
    _assert_same_weights(out, straight)
