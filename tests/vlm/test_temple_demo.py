"""Slow tier: ``mmalign demo temple`` (fast setting, 3 seeds) runs end to end and reports every arm per seed, the
spreads and the PNG strip of clean vs perturbed frames with the two responses. No direction is claimed (the
measured table is in the README)."""

from __future__ import annotations

import json

import pytest

from mmalign.demos import temple
from mmalign.demos.seeds import run_seeds


@pytest.mark.slow
def test_temple_demo_reports_arms_over_seeds(tmp_path):
    report = run_seeds("temple", temple.run, tmp_path, seeds=3)
    assert json.loads((tmp_path / "report.json").read_text())["demo"] == "temple"
    assert [p["seed"] for p in report["per_seed"]] == [0, 1, 2]
    assert {"mix", "post_sft", "sft_only", "temple_minus_sft_only"} <= set(report["metrics"])
    for side in ("before", "after"):
        assert 0.0 <= report[side] <= 1.0 and report[f"{side}_spread"]["n"] == 3
    seed0 = json.loads((tmp_path / "seed0" / "report.json").read_text())
    assert set(seed0["arms"]) == {"base", "temple", "mix", "post_sft", "sft_only"} and seed0["pairs"]["pairs"] > 0
    assert all((tmp_path / "seed0" / p).is_file() for p in seed0["plots"])
