"""The whole CLI on a 300-row file mixing good rows with every kind of bad text row (issue 18, items 1 and 2):
without skipping, one ``error:`` message and exit code 2, no traceback; with ``data.skip_bad_rows=true``, the run
trains on the good rows only and logs the count of each skip reason. The file starts with a UTF-8 byte-order
mark, which must not cost the first (good) row."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from mmalign.data.synthetic import addition_rows
from mmalign.train.metrics_log import read_metrics

from .test_bad_rows_fuzz import DEFECTS, _dump, _write

ROOT = Path(__file__).resolve().parents[2]


def _mixed_file(path: Path) -> tuple[Path, int, Counter]:
    """300 pairs rows, plain and conversational in turn: every 5th one bad (each defect class in turn, the
    conversational ones in conversational rows), the first one good."""
    plain, chat = addition_rows(300, format="pairs", seed=3), addition_rows(300, format="pairs", seed=4,
                                                                           conversational=True)
    defects = [(reason, make, conv) for conv in (False, True) for reason, make in DEFECTS.values()
               if make((chat if conv else plain)[0], "pairs", conv) is not None]
    lines, reasons, used = [], Counter(), set()
    for i in range(300):
        if i % 5 == 4:
            reason, make, conv = defects[(i // 5) % len(defects)]
            lines.append(make((chat if conv else plain)[i], "pairs", conv))
            reasons[reason] += 1
            used.add((make, conv))
        else:
            lines.append(_dump((chat if i % 2 else plain)[i]))
    assert len(used) == len(defects) >= 30  # every defect class of pairs rows is in the file
    return _write(path, lines, bom=True), 300 - sum(reasons.values()), reasons


def _train(path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "mmalign", "train", "configs/text/tiny_dpo.yaml", f"data.train=[{path}]",
           "data.eval=[]", "run.max_steps=2", f"run.output_dir={out}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_cli_on_300_mixed_rows(tmp_path):
    path, n_good, reasons = _mixed_file(tmp_path / "mixed.jsonl")

    run = _train(path, tmp_path / "strict")
    output = run.stdout + run.stderr
    assert run.returncode == 2, output[-3000:]
    assert "Traceback" not in output and [ln for ln in output.splitlines() if ln.startswith("error:")] == [
        next(ln for ln in run.stderr.splitlines() if ln.startswith("error:"))], output[-3000:]
    # The file reader stops at the first line it cannot use (here line 5, a 5000-digit number); rows that decode
    # are listed together, up to 10, by the row checks after it.
    assert run.stderr.startswith(f"error: {path}:5: ") and "fix:" in run.stderr, run.stderr

    run = _train(path, tmp_path / "skip", "data.skip_bad_rows=true")
    assert run.returncode == 0 and "Traceback" not in run.stdout + run.stderr, (run.stdout + run.stderr)[-3000:]
    data = next(m for m in read_metrics(tmp_path / "skip") if m.get("event") == "data")
    assert data["rows_read"] == 300 and data["rows_used"] == n_good
    assert data["rows_skipped"] == sum(reasons.values())
    assert {k.removeprefix("skipped/"): v for k, v in data.items() if k.startswith("skipped/")} == dict(reasons)
    assert "skipped/identical_candidates" in run.stderr  # the drop is warned about, not only counted
