"""The multi-seed demo report (mmalign.demos.seeds) and the ``mmalign demo`` options: statistics on literal numbers,
a fake demo run over seeds, and every registered demo's SeedSpec checked against its ``run`` signature."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmalign.demos import DEMOS, SUMMARY, get_demo
from mmalign.demos.seeds import SeedSpec, lookup, run_seeds, spec_of, spread, t975

# The fake demo below is found by spec_of through this module's SEEDS, like a real demo module's.
SEEDS = SeedSpec(full={"scale": 1.0}, fast={"scale": 0.5}, win_rate="extra.win", metrics={"kl": "kl"},
                 claim=("after", "before"))
CALLS: list[dict] = []


def run(out_dir, *, seed: int = 0, scale: float = 1.0) -> dict:
    """A stand-in demo: after − before = scale · (1 + seed), written like a real demo's report."""
    CALLS.append({"out": Path(out_dir), "seed": seed, "scale": scale})
    rep = {"method": "fake", "metric": "score", "before": 0.5, "after": 0.5 + scale * (1 + seed),
           "higher_is_better": True, "extra": {"win": 0.6 + 0.1 * seed}, "kl": 2.0 * seed}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "report.json").write_text(json.dumps(rep))
    return rep


def test_spread_on_literal_values():
    """[1, 2, 3]: mean 2, sample std 1, 95 % half-width t(0.975, 2)·1/√3 = 4.303/1.7321 = 2.4843."""
    s = spread([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["n"] == 3
    assert s["ci95"] == pytest.approx([2 - 2.4843, 2 + 2.4843], abs=1e-4)
    assert spread([0.7]) == {"mean": 0.7, "std": 0.0, "ci95": [0.7, 0.7], "n": 1}
    assert t975(1) == 12.706 and t975(30) == 2.042
    assert 2.0 < t975(31) < 2.042 and t975(1000) == pytest.approx(1.962, abs=1e-3)  # past the table: monotone to z
    assert math.isnan(t975(0))


def test_lookup_names_the_missing_field():
    assert lookup({"a": {"b": 3}}, "a.b") == 3
    with pytest.raises(KeyError, match=r"no 'a.c' \(at 'c'; keys there: \['b'\]\)"):
        lookup({"a": {"b": 3}}, "a.c")


def test_run_seeds_writes_means_spreads_and_per_seed_values(tmp_path):
    CALLS.clear()
    rep = run_seeds("fake", run, tmp_path, seeds=3, full=False)
    assert [(c["out"], c["seed"], c["scale"]) for c in CALLS] == [(tmp_path / f"seed{k}", k, 0.5) for k in range(3)]
    assert json.loads((tmp_path / "report.json").read_text()) == rep
    # after per seed: 1.0, 1.5, 2.0 -> mean 1.5, std 0.5; before constant 0.5
    assert rep["before"] == 0.5 and rep["after"] == 1.5 and rep["setting"] == "fast" and rep["seeds"] == [0, 1, 2]
    assert rep["before_spread"] == {"std": 0.0, "ci95": [0.5, 0.5], "n": 3}
    assert rep["after_spread"]["std"] == 0.5 and rep["after_spread"]["ci95"][0] < 1.5 < rep["after_spread"]["ci95"][1]
    assert [(p["seed"], p["before"], p["after"]) for p in rep["per_seed"]] == [(0, 0.5, 1.0), (1, 0.5, 1.5),
                                                                             (2, 0.5, 2.0)]
    assert rep["change"]["mean"] == 1.0 and rep["improved_seeds"] == "3/3"
    assert rep["win_rate"]["mean"] == pytest.approx(0.7) and rep["win_rate"]["field"] == "extra.win"
    assert rep["metrics"]["kl"]["mean"] == 2.0 and [p["kl"] for p in rep["per_seed"]] == [0.0, 2.0, 4.0]
    assert rep["run_kwargs"] == {"scale": 0.5}
    assert (tmp_path / "seeds.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "report.md").read_text()
    assert "| after | 1.5000 ± 0.5000 [" in md and "| 2 | 0.5 | 2.0 | 0.8 | 4.0 |" in md and "Fast setting" in md
    CALLS.clear()
    full = run_seeds("fake", run, tmp_path / "full", seeds=1, full=True)
    assert [c["scale"] for c in CALLS] == [1.0] and full["after"] == 1.5 and full["after_spread"]["std"] == 0.0


def test_lower_is_better_counts_improvements_the_other_way(tmp_path, monkeypatch):
    def lower(out_dir, *, seed=0, scale=1.0):
        return {**run(out_dir, seed=seed, scale=scale), "higher_is_better": False}

    lower.__module__ = __name__
    assert run_seeds("fake", lower, tmp_path, seeds=2)["improved_seeds"] == "0/2"
    with pytest.raises(ValueError, match="at least 1 seed"):
        run_seeds("fake", run, tmp_path, seeds=0)


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_every_demo_declares_settings_its_run_accepts(name):
    fn = get_demo(name)
    spec = spec_of(fn)
    params = inspect.signature(fn).parameters
    for setting in (spec.fast, spec.full):
        assert set(setting) <= set(params) - {"out_dir", "seed"}, (name, setting)
    if not spec.deterministic:
        assert "seed" in params and params["seed"].default == 0  # seed 0 = the single-seed run the README quotes
        if spec.claim:
            assert set(spec.claim) <= {"before", "after", *spec.metrics}, (name, spec.claim)
    what, _, fast, _ = SUMMARY[name]  # the line `mmalign demo --help` prints: every demo has one, with a fast time
    assert what and fast > 0, name


def test_cli_options_help_and_a_deterministic_demo(tmp_path):
    from mmalign.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["demo", "--help"], env={"COLUMNS": "300"}).output
    assert "--seeds" in out and "--full" in out and "--fast" in out
    for name in DEMOS:
        assert f"{name}: {SUMMARY[name][0]}" in out
    assert runner.invoke(app, ["demo", "losses", "--seeds", "0"]).exit_code == 2
    res = runner.invoke(app, ["demo", "losses", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "losses" / "report.json").read_text())
    assert saved["seeds"].startswith("none: deterministic") and "sigmoid" in saved["dpo"]
