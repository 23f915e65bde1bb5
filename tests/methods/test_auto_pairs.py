"""Automatic pair construction (Xu et al. 2023, arXiv 2310.02263): orientation, difficulty, ties, curriculum
split, the ``mmalign pairs`` CLI, and a 2-stage curriculum run through the one loop."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmalign.api import build_task, load_train_config, train
from mmalign.data import warm_colors as W
from mmalign.data.pairs import build_pairs, curriculum_split, curriculum_stages, shuffled_mix, write_jsonl
from mmalign.data.rows import DataError, load_rows, parse_rows
from mmalign.methods.auto_pairs import auto_pairs, resolve_reward

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
PROMPTS = ["colors:", "list colors:", "six colors:", "pick colors:"]
RESPONSES = {  # per model, one completion per prompt
    "big": [" red red red red red red", " gold amber red red red red", " blue", " red"],
    "mid": [" red red red blue blue blue", " gold amber red red red red", " blue", " red red"],
    "small": [" blue blue blue blue blue blue", " teal", " blue", " red red red"],
}
STRENGTH = {"big": 2, "mid": 1, "small": 0}


def test_stronger_model_is_chosen_and_difficulty_is_minus_the_strength_gap():
    rows, stats = build_pairs(PROMPTS, RESPONSES, STRENGTH)
    for r in rows:
        assert STRENGTH[r["chosen_model"]] > STRENGTH[r["rejected_model"]]
        i = PROMPTS.index(r["prompt"])
        assert r["chosen"] == RESPONSES[r["chosen_model"]][i] and r["rejected"] == RESPONSES[r["rejected_model"]][i]
        assert r["strength_gap"] == STRENGTH[r["chosen_model"]] - STRENGTH[r["rejected_model"]]
        assert r["difficulty"] == -r["strength_gap"]  # wide gap = easy (unverified recollection of the paper)
        assert "margin" not in r  # a 'margin' column would become a loss input
    # identical texts carry no preference: prompt 1 (big = mid), prompt 2 (all three equal) are ties
    assert stats["ties_identical"] == 1 + 3
    assert stats["pairs"] == len(rows) == 4 * 3 - 4
    assert stats["pairs_big_vs_small"] == 3


def test_reward_margin_difficulty_ties_and_disagreements():
    reward = resolve_reward("warm_colors")
    rewards = {m: reward(PROMPTS, c) for m, c in RESPONSES.items()}
    kept, st_keep = build_pairs(PROMPTS, RESPONSES, STRENGTH, rewards=rewards, on_disagreement="keep")
    for r in kept:
        assert r["reward_chosen"] == W.reward(r["chosen"]) and r["reward_rejected"] == W.reward(r["rejected"])
        assert r["difficulty"] == pytest.approx(-(r["reward_chosen"] - r["reward_rejected"]))
        assert STRENGTH[r["chosen_model"]] > STRENGTH[r["rejected_model"]]  # keep: the paper's labels
    # prompt 3: big " red" (1/6) vs mid " red red" (2/6) vs small (3/6): all three pairs disagree with the reward
    assert st_keep["disagreements"] == 3 and st_keep["ties_reward"] == 0
    dropped, st_drop = build_pairs(PROMPTS, RESPONSES, STRENGTH, rewards=rewards, on_disagreement="drop")
    assert st_drop["dropped_disagreements"] == 3 and len(dropped) == len(kept) - 3
    assert all(r["reward_margin"] > 0 for r in dropped)
    flipped, st_flip = build_pairs(PROMPTS, RESPONSES, STRENGTH, rewards=rewards, on_disagreement="flip")
    assert st_flip["flipped"] == 3 and all(r["reward_margin"] > 0 for r in flipped) and len(flipped) == len(kept)
    # equal rewards, different texts: a reward tie is dropped and counted
    tie = {"a": [" red blue"], "b": [" blue red"]}
    rows, st = build_pairs(["x"], tie, {"a": 1, "b": 0}, rewards={"a": [0.5], "b": [0.5]})
    assert rows == [] and st["ties_reward"] == 1
    rows, st = build_pairs(["x"], {"a": [" red"], "b": [""]}, {"a": 1, "b": 0})  # the row format refuses ''
    assert rows == [] and st["empty_dropped"] == 1
    with pytest.raises(ValueError, match="no strength rank"):
        build_pairs(PROMPTS, RESPONSES, {"big": 1, "mid": 0})


def test_curriculum_split_is_monotone_and_covers_every_pair_once(tmp_path: Path):
    rng = random.Random(0)
    rows = [{"prompt": f"p{i}", "chosen": " a", "rejected": " b", "difficulty": rng.choice([-3, -2, -1, -0.5]),
             "id": i} for i in range(23)]
    path = write_jsonl(rows, tmp_path / "pairs.jsonl")
    parts = curriculum_split(path, 3)
    ids = [r["id"] for p in parts for r in p]
    assert sorted(ids) == list(range(23))  # every pair exactly once
    assert [len(p) for p in parts] == [8, 7, 8]
    for a, b in zip(parts[:-1], parts[1:], strict=True):
        assert max(r["difficulty"] for r in a) <= min(r["difficulty"] for r in b)
    stages = curriculum_stages(path, 3, tmp_path / "cur", total_steps=10)
    assert sum(s["max_steps"] for s in stages) == 10
    assert [[r["id"] for _, _, r in load_rows(s["train"][0])] for s in stages] == [[r["id"] for r in p] for p in parts]
    mix = [r["id"] for _, _, r in load_rows(shuffled_mix(path, tmp_path / "mix.jsonl", seed=1))]
    assert sorted(mix) == list(range(23)) and mix != list(range(23))
    write_jsonl([*rows[:2], {"prompt": "p", "chosen": " a", "rejected": " b", "difficulty": "hard"}], path)
    with pytest.raises(DataError, match=r"row 3: field 'difficulty' is 'hard'"):
        curriculum_split(path, 2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """Two random tiny Llamas (different seeds) with one BPE tokenizer, saved the way users load them."""
    from mmalign.models.text import build_tiny_causal_lm
    from mmalign.models.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(W.corpus_texts() * 4, vocab_size=300)
    root = tmp_path_factory.mktemp("ckpt")
    out = []
    for name, seed in (("strong", 1), ("weak", 2)):
        model = build_tiny_causal_lm(len(tok), seed=seed, **TINY)
        model.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
        out.append(root / name)
    return out[0], out[1]


def _config(out: Path, train_files: list[str], tokenizer: Path, **extra) -> dict:
    return {"model": {"name_or_path": "tiny", "tokenizer": str(tokenizer), "tiny": dict(TINY)},
            "data": {"train": train_files, "max_length": 48},
            "optim": {"lr": 1e-2, "scheduler": "constant", "max_grad_norm": None},
            "run": {"output_dir": str(out), "max_steps": 2, "batch_size": 4, "resume": "never",
                    "report_to": ["jsonl"], "progress": False, "save_final": False, "seed": 0}, **extra}


def test_cli_writes_trl_jsonl_that_train_reads(checkpoints, tmp_path: Path):
    from mmalign.cli import app

    strong, weak = checkpoints
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 2) + "\n")
    # the strong side is sampled from a checkpoint, the weak side read from a responses file
    weak_file = write_jsonl([{"prompt": p, "completion": " blue teal"} for p in PROMPTS * 2], tmp_path / "weak.jsonl")
    out = tmp_path / "pairs.jsonl"
    res = CliRunner().invoke(app, ["pairs", "--strong", str(strong), "--weak", str(weak_file), "--prompts",
                                   str(prompts), "--out", str(out), "--max-new-tokens", "6", "--curriculum", "2"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)  # stdout only: progress bars go to stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["pairs"] == len(rows) > 0 and summary["prompts"] == 8
    assert summary["pairs"] + summary["ties_identical"] + summary["empty_dropped"] == 8
    assert all(r["chosen_model"] == "strong" and r["rejected"] == " blue teal" and r["difficulty"] == -1 for r in rows)
    parsed = parse_rows(load_rows(out), format="auto")  # TRL's prompt/chosen/rejected; extra fields -> meta
    assert parsed.format == "pairs" and len(parsed.records) == len(rows)
    assert all(math.isfinite(r.meta["difficulty"]) for r in parsed.records)
    assert (tmp_path / "pairs_stages.yaml").is_file()
    summary = train(_config(tmp_path / "run", [str(out)], strong, loss={"name": "dpo", "kwargs": {"beta": 0.1}}))
    assert summary["global_step"] == 2
    # a responses file is read instead of sampling; a missing source is reported by name
    bad = CliRunner().invoke(app, ["pairs", "--strong", str(tmp_path / "nope"), "--weak", str(weak), "--prompts",
                                   str(prompts), "--out", str(tmp_path / "x.jsonl")])
    assert bad.exit_code == 2 and "neither a checkpoint directory" in bad.output


def test_responses_files_are_paired_like_checkpoints(tmp_path: Path):
    files = {}
    for name, comps in RESPONSES.items():
        files[name] = write_jsonl([{"prompt": p, "completion": c} for p, c in zip(PROMPTS, comps, strict=True)],
                                  tmp_path / f"{name}.jsonl")
    rows, stats, _ = auto_pairs(files, STRENGTH, PROMPTS)
    assert (rows, stats) == build_pairs(PROMPTS, RESPONSES, STRENGTH)
    with pytest.raises(ValueError, match="prompts differ"):
        auto_pairs(files, STRENGTH, list(reversed(PROMPTS)))


def test_reward_model_directory_scores_in_batches(checkpoints, tmp_path: Path):
    from mmalign.models.text import ValueHeadModel, load_causal_lm, load_tokenizer

    strong, _ = checkpoints
    ValueHeadModel(load_causal_lm(strong)).save_pretrained(tmp_path / "rm")
    load_tokenizer(strong).save_pretrained(str(tmp_path / "rm"))
    reward = resolve_reward(str(tmp_path / "rm"))
    comps = [" red", " blue teal", " gold gold gold", " mint"]
    values = reward(PROMPTS, comps)
    assert len(values) == 4 and all(math.isfinite(v) for v in values)
    assert reward(PROMPTS[:1], comps[:1])[0] == pytest.approx(values[0], abs=1e-5)  # padding-independent
    with pytest.raises(ValueError, match="no value_head.safetensors"):
        resolve_reward(str(strong))
    with pytest.raises(ValueError, match="not module:function"):
        resolve_reward("no_such_reward")


@pytest.mark.parametrize("loss", ["dpo", "slic"])
def test_two_stage_curriculum_run_changes_params(checkpoints, tmp_path: Path, loss: str):
    strong, _ = checkpoints
    rows, _ = build_pairs(PROMPTS * 4, {m: c * 4 for m, c in RESPONSES.items()}, STRENGTH)
    stages = curriculum_stages(write_jsonl(rows, tmp_path / "pairs.jsonl"), 2, tmp_path / "cur", total_steps=4)
    extra = {"stages": stages, "loss": {"name": loss}}
    if loss == "slic":
        extra["reference"] = {"strategy": "none"}
    cfg = _config(tmp_path / "run", [], strong, **extra)
    task = build_task(load_train_config(cfg))
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    summary = train(cfg, task=task)
    assert [s["name"] for s in summary["stages"]] == ["difficulty_0", "difficulty_1"]
    assert summary["global_step"] == 4
    for stage in summary["stages"]:
        assert all(math.isfinite(v) for v in stage["final"].values()), stage
    after = dict(task.model.named_parameters())
    assert all(not torch.equal(p, after[n].detach()) for n, p in before.items()), "every weight should move"


@pytest.mark.slow
def test_curriculum_demo_runs(tmp_path: Path):
    from mmalign.demos.curriculum import run

    report = run(tmp_path, weak_steps=30, sft_steps=80, strong_steps=30, align_steps=20, n_seeds=1, n_prompts=64,
                 n_eval=64)
    assert report["method"] == "auto_pairs_curriculum"
    for key in ("before", "after", "base", "mix"):
        assert 0.0 <= report[key] <= 1.0
    assert report["before"] == report["base"]
    assert report["curriculum_minus_mix"] == pytest.approx(report["after"] - report["mix"], abs=2e-4)
    assert len(report["per_seed"]["mix"]) == len(report["per_seed"]["curriculum"]) == 1
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.json").is_file()
