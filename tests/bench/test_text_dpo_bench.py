"""Smoke test of the text DPO benchmark (``scripts/bench/text_dpo.py --quick``): it runs end to end in child
processes, prints the documented JSON, and mmalign's step-0 loss equals TRL's on the same batch and weights.

Timings at this size say nothing (both sides are dominated by per-step overhead), so only their presence is
checked; the full-size numbers are in ``scripts/bench/README.md``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "text_dpo.py"


def test_quick_benchmark_reports_ratios_and_equal_step0_losses(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--variants", "trl,mmalign", "--threads", "1",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report  # stdout is exactly the JSON report
    assert report["shape"]["vocab"] == 1000 and report["shape"]["steps"] == 4
    for side in ("trl", "mmalign"):
        entry = report[side]
        assert {"step_s", "steps_per_s", "peak_rss_gb", "cpu_step_s"} <= set(entry)
        assert entry["step_s"] > 0 and entry["peak_rss_gb"] > 0 and len(entry["step_s_each"]) == 2
        assert math.isclose(entry["steps_per_s"], 1 / entry["step_s"], rel_tol=1e-2)
    assert report["speedup"] > 0 and report["cpu_speedup"] > 0 and report["memory_ratio"] > 0
    assert report["step0_loss_max_abs_diff"] < 1e-4
    assert report["step0_logps_max_abs_diff"] < 1e-3
    # The probe reference differs from the policy, so the loss is not the trivial log 2 of step 0.
    assert abs(report["step0_loss"]["mmalign"] - math.log(2)) > 1e-3
