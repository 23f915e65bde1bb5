"""Smoke test of the AVP-RPO round benchmark (``scripts/bench/v2a_round.py --quick``): it runs end to end (the
round in-process, the two flow-DPO reference designs in child processes) and prints the documented JSON; the batched
and the naive per-candidate paths sample the same waves and rewards, and a resumed round samples nothing.

Timings at this size say nothing (per-call overhead dominates), so only their presence is checked."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "v2a_round.py"


def test_quick_round_benchmark(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--videos", "2", "--k", "2", "--threads", "1",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report
    rnd = report["round"]
    for side in ("mmalign", "naive"):
        assert all(rnd[side][k] > 0 for k in ("generation_s", "scoring_s", "training_s", "round_s"))
    assert rnd["mmalign"]["resume_generated"] == 0  # the cache served the whole resumed round
    assert rnd["agree"]["waves_max_abs_diff"] < 1e-4 and rnd["agree"]["rewards_max_abs_diff"] < 1e-4
    assert rnd["agree"]["same_pairs"]
    for variant in ("lora_adapter", "full_copy"):
        assert math.isclose(report["dpo_step"][variant]["step0_loss"], math.log(2), abs_tol=1e-4)
    assert all(v > 0 for v in report["ratios"].values())
