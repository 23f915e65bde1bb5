"""Slow tier: every demo's full setting over 3 seeds (``mmalign demo NAME --full --seeds 3``), asserting the direction
of each effect the README claims on the means over the seeds (each demo's ``SEEDS.claim``: text, online_dpo,
token_guidance, seq_contrastive, prior after > before; tdpo TDPO2 > DPO at equal KL; clip gap after < before;
diffusion DPO > base). Curriculum, Self-NPO and NPO-CFG on DPO claim no effect (they do not appear on these toys):
their fields are checked to be reported, not their direction.

Run time, 2-core CPU, one thread: about 20-25 minutes for all (diffusion ~13 of them); one demo at a time with
``-k``, e.g. ``pytest -m slow tests/demos/test_demo_effects.py -k text``."""

from __future__ import annotations

import json
import math

import pytest

from mmalign.demos import DEMOS, get_demo
from mmalign.demos.seeds import run_seeds, spec_of

SEEDS = 3


def _mean(report: dict, name: str) -> float:
    return report[name] if name in ("before", "after") else report["metrics"][name]["mean"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DEMOS))
def test_full_setting_over_three_seeds_moves_the_claimed_way(name, tmp_path):
    run = get_demo(name)
    spec = spec_of(run)
    report = run_seeds(name, run, tmp_path, seeds=SEEDS, full=True)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    if spec.deterministic:
        assert report["seeds"].startswith("none: deterministic")
        return
    assert report["setting"] == "full" and [p["seed"] for p in report["per_seed"]] == list(range(SEEDS))
    for p in report["per_seed"]:
        assert math.isfinite(p["before"]) and math.isfinite(p["after"])
        assert (tmp_path / p["report"]).is_file()
    for side in ("before", "after"):
        lo, hi = report[f"{side}_spread"]["ci95"]
        assert lo <= report[side] <= hi and report[f"{side}_spread"]["n"] == SEEDS
    assert (tmp_path / "report.md").is_file() and (tmp_path / "seeds.png").is_file()
    if spec.claim is None:  # measured, not claimed: every aggregated field is still there, per seed
        assert all(set(spec.metrics) <= set(p) for p in report["per_seed"])
        return
    larger, smaller = spec.claim
    assert _mean(report, larger) > _mean(report, smaller), (
        f"{name}: mean {larger} {_mean(report, larger)} is not above mean {smaller} {_mean(report, smaller)} over "
        f"{SEEDS} seeds; per seed: {report['per_seed']}")
