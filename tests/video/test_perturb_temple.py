"""TEMPLE perturbations (``mmalign.data.perturb``), pairs and stages (``mmalign.data.temple``); note §1.8."""

from __future__ import annotations

import json
import random
from itertools import pairwise

import pytest

from mmalign.config import ConfigError
from mmalign.data.perturb import (
    PERTURBATIONS,
    apply_perturbation,
    chunk_size,
    kendall_tau_distance,
    perturb_indices,
)
from mmalign.data.rows import DataError, PairRow, parse_rows
from mmalign.data.synthetic_video import moving_shape_video
from mmalign.data.temple import (
    CAPTION_INSTRUCTIONS,
    SKIP_REASONS,
    VideoResponses,
    build_temple_pairs,
    clean_response,
    collect_responses,
    magnitude_stages,
    parse_split,
)
from mmalign.schema import StageConfig

SIZES = (1, 2, 3, 5, 8, 13, 16, 31, 40)
MAGS = (1, 2, 3, 4, 8, 16, 50)


# --------------------------------------------------------------------------------------------- operator


def _expected_chunks(n, m):
    g = max(1, n // m)
    return [list(range(i, min(i + g, n))) for i in range(0, n, g)]


def _assert_chunked_permutation(out, n, m):
    assert sorted(out) == list(range(n))
    # every chunk of size g = max(1, N // m) appears contiguously, in its own order
    for chunk in _expected_chunks(n, m):
        at = out.index(chunk[0])
        assert out[at:at + len(chunk)] == chunk


def test_table_is_explicit():
    assert list(PERTURBATIONS) == ["none", "drop", "shuffle", "reverse"]


@pytest.mark.parametrize("n", SIZES)
def test_drop_keeps_floor_n_over_m_in_order(n):
    for m in MAGS:
        for seed in range(4):
            kept = perturb_indices(n, "drop", m, seed=seed)
            assert len(kept) == max(1, n // m) == chunk_size(n, m)
            assert kept == sorted(set(kept)) and all(0 <= i < n for i in kept)


@pytest.mark.parametrize("n", SIZES)
def test_shuffle_and_reverse_are_chunk_permutations(n):
    for m in MAGS:
        _assert_chunked_permutation(perturb_indices(n, "reverse", m), n, m)
        for seed in range(4):
            _assert_chunked_permutation(perturb_indices(n, "shuffle", m, seed=seed), n, m)
        assert perturb_indices(n, "none", m) == list(range(n))


def test_reverse_full_when_m_at_least_n_and_segments_otherwise():
    for n in SIZES:
        for m in (n, n + 1, 4 * n):
            assert perturb_indices(n, "reverse", m) == list(range(n))[::-1]
    assert perturb_indices(8, "reverse", 2) == [4, 5, 6, 7, 0, 1, 2, 3]  # segments swapped, not frames
    assert perturb_indices(7, "reverse", 2) == [6, 3, 4, 5, 0, 1, 2]  # g=3, short last chunk
    assert perturb_indices(8, "shuffle", 1, seed=0) == list(range(8))  # one chunk: nothing to move


def test_difficulty_is_monotone_in_magnitude():
    for n in range(1, 33):
        kept = [len(perturb_indices(n, "drop", m, seed=0)) for m in range(1, 2 * n + 2)]
        assert all(a >= b for a, b in pairwise(kept))
        taus = [kendall_tau_distance(perturb_indices(n, "reverse", m)) for m in range(1, 2 * n + 2)]
        assert all(a <= b for a, b in pairwise(taus))
        assert taus[0] == 0 and taus[-1] == n * (n - 1) // 2


def test_kendall_tau_distance():
    assert kendall_tau_distance([0, 1, 2]) == 0
    assert kendall_tau_distance([2, 1, 0]) == 3
    assert kendall_tau_distance([1, 0, 2]) == 1


def test_seeded_determinism_and_generator():
    for kind in ("drop", "shuffle"):
        a = [perturb_indices(20, kind, 4, seed=s) for s in range(10)]
        assert a == [perturb_indices(20, kind, 4, seed=s) for s in range(10)]
        assert len({tuple(x) for x in a}) > 1  # seeds matter
        g1, g2 = random.Random(7), random.Random(7)
        first = perturb_indices(20, kind, 4, generator=g1)
        assert first == perturb_indices(20, kind, 4, generator=g2)
        assert first == perturb_indices(20, kind, 4, seed=7)
        # the generator advances: a second draw need not repeat the first, over several draws it does not
        assert any(perturb_indices(20, kind, 4, generator=g1) != first for _ in range(5))


def test_apply_perturbation_on_any_list():
    captions = [f"clip {i}" for i in range(6)]
    out, idx = apply_perturbation(captions, "drop", 2, seed=1)
    assert out == [captions[i] for i in idx] and len(out) == 3
    frames = list(range(100, 110))
    out, idx = apply_perturbation(frames, "reverse", 5)
    assert idx == [8, 9, 6, 7, 4, 5, 2, 3, 0, 1] and out == [frames[i] for i in idx]
    video = moving_shape_video(12, 32, seed=2, n_segments=3)
    rev, _ = apply_perturbation(video.segment_captions, "reverse", 3)
    assert rev == video.segment_captions[::-1] != video.segment_captions


def test_drop_by_similarity_drops_similar_items_together():
    # two groups of 4; similar inside a group, unrelated across: after the first (uniform) pick, every further
    # drop comes from the same group, so exactly one whole group is kept
    groups = [set(range(4)), set(range(4, 8))]
    sim = [[1.0 if (i < 4) == (j < 4) else -0.2 for j in range(8)] for i in range(8)]
    kept_sets = set()
    for seed in range(12):
        kept = perturb_indices(8, "drop", 2, seed=seed, similarity=sim)
        assert set(kept) in groups
        kept_sets.add(tuple(kept))
    assert len(kept_sets) == 2
    zero = [[0.0] * 8 for _ in range(8)]  # nothing similar: uniform fallback, still K kept
    assert len(perturb_indices(8, "drop", 4, seed=0, similarity=zero)) == 2


def test_operator_errors():
    with pytest.raises(ConfigError, match="kind='flip' is not one of"):
        perturb_indices(5, "flip", 2, seed=0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="magnitude"):
            perturb_indices(5, "drop", bad, seed=0)
    with pytest.raises(ConfigError, match="n=0"):
        perturb_indices(0, "reverse", 2)
    with pytest.raises(ValueError, match="seed"):
        perturb_indices(5, "shuffle", 2)
    with pytest.raises(ConfigError, match="5 x 5"):
        perturb_indices(5, "drop", 2, seed=0, similarity=[[1.0] * 5] * 4)
    with pytest.raises(ConfigError, match="only used by kind='drop'"):
        perturb_indices(5, "shuffle", 2, seed=0, similarity=[[1.0] * 5] * 5)


# --------------------------------------------------------------------------------------------- pairs

CHOSEN = "The red square slides to the left, pauses briefly, and then moves upward to the top of the frame."


def _responses(video):
    return VideoResponses(str(video), CHOSEN, {
        "drop_16": "A red square moves left.",                                   # kept
        ("drop", 8): CHOSEN + " Then it stops for a while at the top.",       # drop_not_shorter
        "caption_caption_drop_4_False_False": CHOSEN,                          # identical
        "shuffle_16": "The red square moves upward first, then it slides left across the dark frame.",  # kept
        "shuffle_8": CHOSEN + " Quickly.",                                    # substring
        "reverse_16": "Up.",                                                   # length_ratio
        "reverse_8": "   ",                                                    # empty
        "reverse_2": "The red square rises to the top of the frame and then slides over to the left side.",  # kept
    }, video_id="v0")


def test_pair_filters_each_reason_counted(tmp_path):
    video = tmp_path / "v0.mp4"
    video.write_bytes(b"x")
    rows, stats = build_temple_pairs([_responses(video)], seed=3)
    assert [(r["perturbation"], r["magnitude"]) for r in rows] == [("drop", 16), ("reverse", 2), ("shuffle", 16)]
    for reason in ("drop_not_shorter", "identical", "substring", "length_ratio", "empty"):
        assert stats[f"skip_{reason}"] == 1, reason
    assert stats["skip_missing_video"] == 0 and set(SKIP_REASONS) == {k[5:] for k in stats if k.startswith("skip_")}
    assert stats["pairs"] == 3 and stats["videos"] == 1 and stats["pairs_drop_16"] == 1
    for r in rows:
        assert r["videos"] == [str(video)]  # one clean video shared by chosen and rejected
        assert r["chosen"] == CHOSEN and r["rejected"] != r["chosen"] and r["chosen"] not in r["rejected"]
        assert r["prompt"] in CAPTION_INSTRUCTIONS and r["video_id"] == "v0"
    parsed = parse_rows(rows)
    assert parsed.format == "pairs" and all(isinstance(p, PairRow) for p in parsed.records)
    assert parsed.records[0].meta["videos"] == [str(video)] and parsed.records[0].meta["magnitude"] == 16


def test_pair_prompts_are_seeded_and_paraphrased(tmp_path):
    video = tmp_path / "v0.mp4"
    video.write_bytes(b"x")
    a, _ = build_temple_pairs([_responses(video)], seed=1)
    b, _ = build_temple_pairs([_responses(video)], seed=1)
    assert a == b
    prompts = {tuple(r["prompt"] for r in build_temple_pairs([_responses(video)], seed=s)[0]) for s in range(8)}
    assert len(prompts) > 1
    tok, _ = build_temple_pairs([_responses(video)], seed=1, video_token="<video>")
    assert [r["prompt"] for r in tok] == ["<video>" + r["prompt"] for r in a]
    assert len(CAPTION_INSTRUCTIONS) == 6
    assert not {"Describe the video in detail.",
                "Provide a detailed description of the events of this video."} & set(CAPTION_INSTRUCTIONS)


def test_missing_video_raises_or_is_skipped(tmp_path):
    item = _responses(tmp_path / "gone.mp4")
    with pytest.raises(DataError, match=r"gone\.mp4 does not exist; fix:"):
        build_temple_pairs([item])
    rows, stats = build_temple_pairs([item], skip_missing_videos=True)
    assert rows == [] and stats["skip_missing_video"] == len(item.rejected)
    (tmp_path / "gone.mp4").write_bytes(b"x")
    rows, _ = build_temple_pairs([{"video": "gone.mp4", "chosen": CHOSEN, "rejected": {"drop_2": "Short."}}],
                                 base_dir=tmp_path)
    assert rows[0]["videos"] == ["gone.mp4"] and rows[0]["video_id"] == "gone"
    with pytest.raises(DataError, match="missing field"):
        build_temple_pairs([{"video": "gone.mp4", "chosen": CHOSEN}], check_videos=False)


def test_parse_split_and_clean_response():
    assert parse_split("caption_caption_shuffle_16_False_False") == ("shuffle", 16)
    assert parse_split(("reverse", 2)) == ("reverse", 2)
    with pytest.raises(ValueError, match="'none'"):
        parse_split("none_1")
    with pytest.raises(ValueError, match="names no perturbation"):
        parse_split("jitter_4")
    assert clean_response("<think>hmm</think> The clip shows a cat.") == "The clip shows a cat."
    text = "ok</think>Draft. The video opens with a cat (see caption 2) walking."
    assert clean_response(text, keep_from_opening=True) == "The video opens with a cat  walking."
    assert clean_response("A cat walks.", keep_from_opening=True) is None


def test_collect_responses_groups_by_video():
    gen = [
        {"video": "a.mp4", "perturbation": "none", "magnitude": 1, "response": "clean a"},
        {"video": "b.mp4", "perturbation": "drop", "magnitude": 2, "response": "b dropped"},
        {"video": "a.mp4", "perturbation": "reverse", "magnitude": 4, "response": "a reversed"},
        {"video": "b.mp4", "perturbation": "none", "magnitude": 1, "response": "clean b"},
    ]
    out = collect_responses(gen)
    assert [(v.video_id, v.chosen, v.rejected) for v in out] == [
        ("a", "clean a", {("reverse", 4): "a reversed"}), ("b", "clean b", {("drop", 2): "b dropped"})]
    with pytest.raises(DataError, match="no clean"):
        collect_responses(gen[1:2])
    with pytest.raises(DataError, match="second"):
        collect_responses(gen + gen[:1])


# --------------------------------------------------------------------------------------------- stages


def _rows_by_mag():
    return {m: [{"prompt": "p", "chosen": f"c{m}{i}", "rejected": f"r{m}{i}", "videos": ["v.mp4"], "magnitude": m,
                 "perturbation": "drop"} for i in range(m // 2)] for m in (1, 2, 4, 8, 16)}


def test_magnitude_stages_easy_to_hard_with_reanchor(tmp_path):
    stages = magnitude_stages(_rows_by_mag(), tmp_path / "stages")
    assert [s["name"] for s in stages] == ["temple_r16", "temple_r8", "temple_r4", "temple_r2"]
    assert [s["reanchor_reference"] for s in stages] == [False, True, True, True]
    assert [s["merge_lora"] for s in stages] == [False, True, True, True]
    for s, m in zip(stages, (16, 8, 4, 2), strict=True):
        cfg = StageConfig(**s)  # the shape the run config expects
        assert cfg.epochs == 1.0 and cfg.max_steps is None
        lines = [json.loads(x) for x in open(s["train"][0])]
        assert len(lines) == m // 2 and {r["magnitude"] for r in lines} == {m}


def test_magnitude_stages_from_pairs_file_and_errors(tmp_path):
    from mmalign.data.pairs import write_jsonl

    rows = [r for rs in _rows_by_mag().values() for r in rs]
    random.Random(0).shuffle(rows)
    pairs = write_jsonl(rows, tmp_path / "pairs.jsonl")
    stages = magnitude_stages(pairs, tmp_path / "out", (8, 2), prefix="t", epochs=None, max_steps=5)
    assert [(s["name"], s["max_steps"], "epochs" in s) for s in stages] == [("t_r8", 5, False), ("t_r2", 5, False)]
    with pytest.raises(DataError, match=r"no pairs for magnitude\(s\) \[32\]"):
        magnitude_stages(_rows_by_mag(), tmp_path / "x", (32, 16))
    with pytest.raises(ValueError, match="repeats"):
        magnitude_stages(_rows_by_mag(), tmp_path / "x", (16, 16))
    bad = write_jsonl([{"prompt": "p", "chosen": "a", "rejected": "b", "magnitude": "16"}], tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl row 1: field 'magnitude'"):
        magnitude_stages(bad, tmp_path / "x")


def test_end_to_end_perturbed_captions_to_stages(tmp_path):
    """Synthetic video -> perturbed segment captions as stand-in responses -> pairs -> stages."""
    from mmalign.data.synthetic_video import write_moving_shape_video

    items = []
    for seed in range(3):
        path = tmp_path / f"v{seed}.mp4"
        v = write_moving_shape_video(path, 8, 32, seed, n_segments=4)
        rejected = {}
        for m in (4, 2):
            for kind in ("drop", "reverse"):
                caps, _ = apply_perturbation(v.segment_captions, kind, m, seed=seed)
                rejected[(kind, m)] = "; ".join(caps) + "."
        items.append(VideoResponses(str(path), "; ".join(v.segment_captions) + ".", rejected))
    rows, stats = build_temple_pairs(items, seed=0)
    assert stats["pairs"] == len(rows) > 0
    assert all(r["chosen"] != r["rejected"] for r in rows)
    stages = magnitude_stages({m: [r for r in rows if r["magnitude"] == m] for m in (4, 2)}, tmp_path / "s", (4, 2))
    assert [s["reanchor_reference"] for s in stages] == [False, True]
