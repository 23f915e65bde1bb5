"""AVP-RPO (mmalign.methods.avp_rpo): pairs stay within a video with chosen ≥ rejected (research note §2.8), the
candidate cache is hit on a resumed round (generator calls counted), flow DPO starts at ln 2, and a 2-round tiny run
trains through mmalign.api.train."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmalign.api import build_task, load_train_config, train
from mmalign.config import ConfigError
from mmalign.data.avp_pairs import CandidateCache, round_examples
from mmalign.schema import StageConfig

from . import tiny_config


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A tiny random SF-CAVP model saved the way a modality=av run saves it (16 kHz, 1 s clips)."""
    from mmalign.models.cavp import build_sf_cavp, save_sf_cavp

    return save_sf_cavp(build_sf_cavp(seed=3), tmp_path_factory.mktemp("reward") / "final")


def _config(tmp_path, v2a_data, reward_dir, **sections):
    opts = {"reward_model": str(reward_dir), "num_candidates": 3, **sections.pop("options", {})}
    return tiny_config(tmp_path, v2a_data["sft"], loss={"name": "avp_rpo"}, options=opts, **sections)


def test_pairs_share_the_video_and_chosen_wins():
    rewards = torch.tensor([[0.1, 0.5, 0.3, 0.5], [0.2, 0.2, 0.2, 0.2], [0.9, -0.1, 0.4, 0.0]])
    for pairing in ("best_worst", "margin", "ranking"):
        examples = round_examples(rewards, pairing=pairing, margin=0.05)
        assert [e.video for e in examples] == [0, 1, 2]
        for e in examples:
            assert len(e.pairs) <= len(e.candidates) * (len(e.candidates) - 1) // 2
            for c, r in e.pairs:
                assert e.rewards[c] - e.rewards[r] > 0.05  # strict margin: ties never pair
                assert float(rewards[e.video, e.candidates[c]]) == e.rewards[c]
        assert examples[1].pairs == []  # all four tie
    bw = round_examples(rewards, pairing="best_worst")
    assert bw[2].candidates == [0, 1] and bw[2].pairs == [(0, 1)]
    assert len(round_examples(rewards, pairing="margin", margin=0.05)[0].pairs) == 5  # 0.5 = 0.5 is a tie
    with pytest.raises(ValueError, match="pairing"):
        round_examples(rewards, pairing="best")


def test_two_rounds_through_api_train(tmp_path, v2a_data, reward_dir):
    cfg = _config(tmp_path, v2a_data, reward_dir, options={"pairing": "margin"},
                  stages=[{"name": "round1", "max_steps": 2}, {"name": "round2", "max_steps": 2,
                                                                "reanchor_reference": True}])
    task = build_task(load_train_config(cfg))
    start = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    summary = train(cfg, task=task)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["stage"], r["loss"]) for r in rows if "loss" in r and r.get("event") is None]
    assert math.isclose(losses[0][1], math.log(2), abs_tol=1e-5)  # flow DPO at policy == reference
    round2 = [v for s, v in losses if s == "round2"]
    assert math.isclose(round2[0], math.log(2), abs_tol=1e-5)  # re-anchored: the reference is the round's policy
    assert task.generated == 2 * 4 * 3  # two rounds regenerate 4 videos x K=3 with the current policy
    assert set(task.round_stats) == {0, 1}
    assert task.round_stats[0]["pairs"] >= 1
    assert [s["name"] for s in summary["stages"]] == ["round1", "round2"]
    assert any(not torch.equal(p.detach(), start[n]) for n, p in task.model.named_parameters())
    info = json.loads((tmp_path / "final" / "v2a_config.json").read_text())["info"]
    assert info["method"] == "avp_rpo" and info["avp_rpo"]["pairing"] == "margin"


def test_a_resumed_round_reads_the_cache(tmp_path, v2a_data, reward_dir):
    cfg = load_train_config(_config(tmp_path, v2a_data, reward_dir, options={"pairing": "ranking"}))
    first = build_task(cfg)
    data = first.stage_data(StageConfig())
    batch = data.collate([data.train[i] for i in range(2)])  # the first item generates the round
    assert first.generated == 4 * 3 and first.cache.misses == 12
    assert batch.labels.shape == (2, 3) and batch.extras["pairs"].shape[-1] == 2
    recorded = first.state_dict()

    again = build_task(cfg)  # same weights (seeded), same cache directory: nothing is sampled again
    with torch.no_grad():
        for p in again.model.parameters():  # a restarted run has other weights until the checkpoint is loaded ...
            p.add_(0.01)
    data2 = again.stage_data(StageConfig())
    again.load_state_dict(recorded)  # ... and the round's recorded model key points to the cached candidates
    assert data2.train.waves is None  # materialized lazily, on the first item
    data2.train[0]
    assert again.generated == 0 and again.cache.hits == 12
    assert torch.equal(data2.train.waves, data.train.waves)

    policy = first.score(first.model, batch)
    out = first.loss(policy, first.score(first.model, batch), batch)
    assert math.isclose(out.loss.item(), math.log(6), rel_tol=1e-5)  # Plackett–Luce over K=3 at equal scores


def test_cache_files_are_atomic_and_keyed(tmp_path):
    cache = CandidateCache(tmp_path)
    assert cache.get("m" * 64, "v", 1) is None
    cache.put("m" * 64, "v", 1, torch.ones(4))
    assert torch.equal(cache.get("m" * 64, "v", 1), torch.ones(4))
    assert cache.get("n" * 64, "v", 1) is None and cache.get("m" * 64, "v", 2) is None
    (tmp_path / ("m" * 24) / "v_3.pt").write_text("garbage")
    assert cache.get("m" * 64, "v", 3) is None  # a damaged entry is regenerated, not trusted
    assert not list(tmp_path.rglob("*.tmp"))


def test_config_errors(tmp_path, v2a_data, reward_dir):
    bad = _config(tmp_path, v2a_data, reward_dir, options={"pairing": "best", "num_candidates": 1, "margin": -1},
                  reference={"strategy": "precomputed"})
    with pytest.raises(ConfigError) as e:
        build_task(load_train_config(bad))
    text = str(e.value)
    for part in ("options.pairing='best'", "num_candidates=1", "margin=-1", "reference.strategy=precomputed"):
        assert part in text
    with pytest.raises(ConfigError, match="sf_cavp_config.json"):
        build_task(load_train_config(_config(tmp_path, v2a_data, tmp_path)))


@pytest.mark.parametrize("name", ["tiny_avp_rpo.yaml", "mmaudio_small_avp_rpo.yaml"])
def test_shipped_configs_validate(name, reward_dir):
    from mmalign.api import task_target
    from mmalign.methods.avp_rpo import AVPRPOTask
    from mmalign.registry import resolve

    from . import REPO

    cfg = load_train_config(REPO / "configs" / "v2a" / name, [f"options.reward_model={reward_dir}"])
    assert resolve(task_target(cfg)) is AVPRPOTask
    uses = AVPRPOTask.validate(cfg)  # every check made before building: loss rows, options, reference, stages
    assert [u.method.name for u in uses] == ["avp_rpo"] * (1 + len(cfg.stages))
    assert (REPO / "scripts" / "train_v2a.sh").stat().st_mode & 0o111


@pytest.mark.slow
def test_demo_runs_and_reports_before_after(tmp_path):
    """``mmalign demo v2a`` at a reduced budget, 2 seeds: the multi-seed report and its plots exist (the effect
    itself is reported in the README from the fast setting, not asserted)."""
    from mmalign.demos.seeds import run_seeds
    from mmalign.demos.v2a import run

    report = run_seeds("v2a", run, tmp_path, seeds=2)
    assert {"before", "after", "per_seed", "before_spread", "after_spread"} <= set(report)
    assert [p["seed"] for p in report["per_seed"]] == [0, 1]
    assert report["higher_is_better"] is False
    for seed in (0, 1):
        single = json.loads((tmp_path / f"seed{seed}" / "report.json").read_text())
        assert {"reward", "independent", "mel_distance"} <= set(single)
        assert all((tmp_path / f"seed{seed}" / p).is_file() for p in single["plots"])
    assert (tmp_path / "report.md").is_file()
