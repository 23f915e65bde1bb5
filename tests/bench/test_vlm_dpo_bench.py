"""Smoke test of the VLM DPO benchmark (``scripts/bench/vlm_dpo.py --quick``): it runs end to end in child
processes (TRL's ``DPOTrainer`` and mmalign on one tiny Qwen2-VL with image rows, whole model or vision frozen;
mmalign's video DPO with its shared scorer and with the naive per-candidate one), prints the documented JSON,
and the step-0 losses agree.

Timings at this size say nothing (per-step overhead dominates), so only their presence is checked; the full-size
figures are in the README. Six child processes each import torch/transformers, hence the slow marker.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "vlm_dpo.py"


@pytest.mark.slow
def test_quick_vlm_benchmark_reports_ratios_and_equal_step0_losses(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--workdir",
                           str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report  # stdout is exactly the JSON report
    assert report["shape"]["arch"] == "qwen2_vl" and report["shape"]["steps"] == 4
    sides = ("trl", "mmalign", "trl_frozen_vision", "mmalign_frozen_vision")
    for entry in (*(report[v] for v in sides), report["video"]["video_mmalign"], report["video"]["video_naive"]):
        assert {"step_s", "steps_per_s", "peak_rss_gb", "cpu_step_s"} <= set(entry)
        assert entry["step_s"] > 0 and entry["peak_rss_gb"] > 0 and len(entry["step_s_each"]) == 2
        assert math.isclose(entry["steps_per_s"], 1 / entry["step_s"], rel_tol=1e-2)
    for section in (report, report["video"]):
        assert section["speedup"] > 0 and section["cpu_speedup"] > 0 and section["memory_ratio"] > 0
        assert section["step0_loss_max_abs_diff"] < 1e-4
        assert section["step0_logps_max_abs_diff"] < 1e-3
    assert report["frozen_vision_speedup"] > 0 and report["frozen_vision_memory_ratio"] > 0
    assert set(report["step0_loss"]) == set(sides)
    # The probe reference differs from the policy, so the loss is not the trivial log 2 of step 0.
    assert abs(report["step0_loss"]["mmalign"] - math.log(2)) > 1e-3
    assert abs(report["video"]["step0_loss"]["video_mmalign"] - math.log(2)) > 1e-3


def test_bad_shape_is_refused_with_the_rule():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--image", "12"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--image=12 must be a positive multiple of 8" in proc.stderr
