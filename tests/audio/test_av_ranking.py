"""AVP-RPO ranking step and SF-CAVP-style reward (``mmalign.data.av_ranking``)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from mmalign.config import ConfigError
from mmalign.data import synthetic_audio as S
from mmalign.data.av_ranking import av_reward, rank_av_pairs
from mmalign.data.rows import DataError

# ------------------------------------------------------------------------------------------------- ranking


@pytest.mark.parametrize("strategy", ["best_worst", "all"])
@pytest.mark.parametrize("seed", range(4))
def test_ranker_invariants(strategy, seed):
    g = torch.Generator().manual_seed(seed)
    v, k = 6, 5
    scores = torch.rand(v, k, generator=g).round(decimals=1)  # coarse: ties within rows happen
    scores[0] = 0.3  # a fully tied video
    ids = [f"vid{i}" for i in range(v)]
    rows = rank_av_pairs(scores, ids, strategy=strategy)
    for r in rows:
        i = ids.index(r["video"])
        assert r["chosen"] == r["chosen_index"] and r["rejected"] == r["rejected_index"]
        assert r["chosen_score"] == float(scores[i, r["chosen"]].double())
        assert r["rejected_score"] == float(scores[i, r["rejected"]].double())
        assert r["chosen_score"] >= r["rejected_score"] and r["margin"] > 0
        assert math.isclose(r["margin"], r["chosen_score"] - r["rejected_score"])
    counts = Counter(r["video"] for r in rows)
    assert "vid0" not in counts
    assert all(c <= k * (k - 1) // 2 for c in counts.values())
    if strategy == "best_worst":
        non_tied = [ids[i] for i in range(v) if scores[i].max() > scores[i].min()]
        assert sorted(counts) == sorted(non_tied) and set(counts.values()) == {1}
        for r in rows:
            i = ids.index(r["video"])
            assert r["chosen_score"] == float(scores[i].max().double())
            assert r["rejected_score"] == float(scores[i].min().double())
    else:
        for i in range(1, v):  # every strictly ordered pair appears exactly once
            row = scores[i]
            n_ordered = sum(int(row[a] > row[b]) for a in range(k) for b in range(k))
            assert counts.get(ids[i], 0) == n_ordered


def test_distinct_scores_give_all_pairs_and_max_cap():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    rows = rank_av_pairs(scores, ["v"], strategy="all")
    assert len(rows) == 4 * 3 // 2
    margins = [r["margin"] for r in rows]
    assert margins == sorted(margins, reverse=True)
    capped = rank_av_pairs(scores, ["v"], strategy="all", max_pairs_per_video=2)
    assert [(r["chosen"], r["rejected"]) for r in capped] == [(0, 1), (0, 3)]  # the two largest margins


def test_min_margin_is_strict():
    scores = torch.tensor([[1.0, 0.5, 0.0], [0.25, 0.0, 0.0]])  # exact binary fractions
    rows = rank_av_pairs(scores, ["a", "b"], strategy="all", min_margin=0.5)
    assert [(r["video"], r["chosen"], r["rejected"]) for r in rows] == [("a", 0, 2)]  # 0.5 margins dropped
    assert rank_av_pairs(scores, ["a", "b"], min_margin=1.0) == []
    bw = rank_av_pairs(scores, ["a", "b"], min_margin=0.25)
    assert [r["video"] for r in bw] == ["a"]


def test_candidate_names_prompts_and_captions():
    scores = torch.tensor([[0.2, 0.8], [0.6, 0.1]])
    rows = rank_av_pairs(scores, ["x", "y"], candidates=[["x0.wav", "x1.wav"], ["y0.wav", "y1.wav"]],
                         prompts=["px", "py"], captions=["a dog barks", "rain"])
    assert rows == [
        {"video": "x", "chosen": "x1.wav", "rejected": "x0.wav", "margin": rows[0]["margin"], "chosen_index": 1,
         "rejected_index": 0, "chosen_score": rows[0]["chosen_score"], "rejected_score": rows[0]["rejected_score"],
         "prompt": "px", "caption": "a dog barks"},
        {"video": "y", "chosen": "y0.wav", "rejected": "y1.wav", "margin": rows[1]["margin"], "chosen_index": 0,
         "rejected_index": 1, "chosen_score": rows[1]["chosen_score"], "rejected_score": rows[1]["rejected_score"],
         "prompt": "py", "caption": "rain"},
    ]
    assert math.isclose(rows[0]["margin"], 0.6, rel_tol=1e-6) and math.isclose(rows[1]["margin"], 0.5, rel_tol=1e-6)


def test_ranker_errors():
    ok = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match=r"\['all', 'best_worst'\]"):
        rank_av_pairs(ok, ["a", "b"], strategy="top")
    with pytest.raises(ConfigError, match="min_margin"):
        rank_av_pairs(ok, ["a", "b"], min_margin=-1.0)
    with pytest.raises(ConfigError, match="max_pairs_per_video"):
        rank_av_pairs(ok, ["a", "b"], max_pairs_per_video=0)
    with pytest.raises(DataError, match=">= 2 candidates"):
        rank_av_pairs(torch.zeros(2, 1), ["a", "b"])
    with pytest.raises(DataError, match="1 video ids for 2 rows"):
        rank_av_pairs(ok, ["a"])
    bad = ok.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(DataError, match=r"video 'b' candidate 2 = nan"):
        rank_av_pairs(bad, ["a", "b"])
    with pytest.raises(DataError, match="K=3"):
        rank_av_pairs(ok, ["a", "b"], candidates=[["p", "q", "r"], ["p"]])
    with pytest.raises(DataError, match="1 captions for 2 videos"):
        rank_av_pairs(ok, ["a", "b"], captions=["c"])


# -------------------------------------------------------------------------------------------------- reward


def _features(b=4, t=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(b, t, d, generator=g)


def test_identical_features_give_the_maximal_reward():
    slow, fast = _features()
    best = av_reward(slow, slow * 3.0, fast, fast, weights=(1.0, 2.0))  # cosine ignores scale
    torch.testing.assert_close(best, torch.full((4,), 3.0))
    other_slow, other_fast = _features(seed=1)
    assert (av_reward(slow, other_slow, fast, other_fast, weights=(1.0, 2.0)) < best).all()


def test_shuffling_fast_audio_in_time_lowers_the_reward():
    slow, fast = _features(t=8)
    noisy = fast + 0.3 * torch.randn(fast.shape, generator=torch.Generator().manual_seed(5))
    aligned = av_reward(slow, slow, fast, noisy)
    for seed in range(3):
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(seed))
        if torch.equal(perm, torch.arange(8)):
            continue
        shuffled = av_reward(slow, slow, fast, noisy[:, perm])
        assert (shuffled < aligned).all()
    # the slow term alone cannot see the shuffle
    torch.testing.assert_close(av_reward(slow, slow), torch.ones(4))


def test_reward_broadcasts_to_video_by_candidate_and_masks():
    slow, fast = _features(b=3)
    cand_slow = torch.stack([slow, -slow], 1)  # [V, 2, D]
    cand_fast = torch.stack([fast, fast.flip(1)], 1)  # [V, 2, T, D]
    r = av_reward(slow[:, None], cand_slow, fast[:, None], cand_fast)
    assert r.shape == (3, 2)
    assert (r[:, 0] > r[:, 1]).all()
    rows = rank_av_pairs(r, ["a", "b", "c"])
    assert all(row["chosen"] == 0 and row["rejected"] == 1 for row in rows) and len(rows) == 3
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[:, :2] = True
    wrong = fast.clone()
    wrong[:, 2:] = -wrong[:, 2:]  # masked-out steps do not count
    torch.testing.assert_close(av_reward(slow, slow, fast, wrong, fast_mask=mask), torch.full((3,), 2.0))
    torch.testing.assert_close(av_reward(slow, slow, fast, wrong, fast_mask=torch.zeros(3, 6, dtype=torch.bool)),
                               torch.ones(3))


def test_reward_errors():
    slow, fast = _features()
    with pytest.raises(ConfigError, match="weights"):
        av_reward(slow, slow, weights=(-1.0, 1.0))
    with pytest.raises(ConfigError, match="weights"):
        av_reward(slow, slow, weights=(0.0, 0.0))
    with pytest.raises(ValueError, match="both"):
        av_reward(slow, slow, fast, None)
    with pytest.raises(ValueError, match="common number of time steps"):
        av_reward(slow, slow, fast, fast[:, :3])
    with pytest.raises(ValueError, match="width"):
        av_reward(slow, slow[:, :3])


# ----------------------------------------------------------------------------------- synthetic end to end


def _pitch_energy(wave: torch.Tensor, sr: int) -> torch.Tensor:
    spec = torch.fft.rfft(wave.double().flatten()).abs()
    bins = [round(p * wave.shape[-1] / sr) for p in S.PITCHES]
    return torch.stack([spec[b - 2: b + 3].sum() for b in bins]).float()


def _fast(signal: torch.Tensor) -> torch.Tensor:
    x = signal / signal.max().clamp_min(1e-8)
    return torch.stack([x, 1 - x], -1)  # [T, 2]: "sound on" / "sound off" per frame


def test_reward_ranks_synchronised_audio_first():
    """Toy encoders on synthetic clips: slow = which pitches sound, fast = when. The synchronised rendering must
    be chosen over late, wrong-pitch and late-and-wrong renderings."""
    duration, sr, fps = 3.0, 8000, 8.0
    vids, v_slow, v_fast, a_slow, a_fast = [], [], [], [], []
    for seed in range(3):
        clip = S.make_clip(4, duration=duration, sample_rate=sr, fps=fps, seed=seed)
        dur_per_pitch = torch.tensor([sum(e.duration for e in clip.events if e.pitch == p) for p in S.PITCHES])
        wrong = [S.Event(e.onset, e.duration, S.PITCHES[(S.PITCHES.index(e.pitch) + 2) % 5]) for e in clip.events]
        late = S.shift_events(clip.events, 0.375, duration=duration)
        variants = [clip.events, late, wrong, S.shift_events(wrong, 0.375, duration=duration)]
        waves = [S.tone_bursts(ev, duration=duration, sample_rate=sr) for ev in variants]
        vids.append(f"clip{seed}")
        v_slow.append(dur_per_pitch.float())
        v_fast.append(_fast(clip.visual))
        a_slow.append(torch.stack([_pitch_energy(w, sr) for w in waves]))
        a_fast.append(torch.stack([_fast(S.frame_envelope(w, sr, fps)) for w in waves]))
    scores = av_reward(torch.stack(v_slow)[:, None], torch.stack(a_slow), torch.stack(v_fast)[:, None],
                       torch.stack(a_fast))
    assert scores.shape == (3, 4)
    assert (scores.argmax(1) == 0).all() and (scores.argmin(1) == 3).all()
    rows = rank_av_pairs(scores, vids, strategy="best_worst")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [(0, 3)] * 3
    assert F.cosine_similarity(torch.stack(v_slow), torch.stack(a_slow)[:, 0]).min() > 0.9
