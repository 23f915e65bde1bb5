"""Automatic preference pairs from models of different strength, and an easy→hard curriculum over them.

Xu, C. et al. 2023, "Automatic Pair Construction for Contrastive Post-training" (arXiv 2310.02263; first
titled "Contrastive Post-training LLMs on Data Curriculum"); research note ``llm_losses.md`` §3.

What follows the abstract (verified there):

- for each prompt, responses of models of different strength; the **stronger model's response is chosen**,
  the weaker one's rejected, so no human or AI judge labels the pairs;
- the pairs train SFT / SLiC / DPO (here: any pairwise text method, e.g. ``loss.name: dpo`` or ``slic``);
- a curriculum goes from "easier" to "harder" pairs.

What is **unverified** (the note's *recollection*/*inference* items; the paper body was not read):

- difficulty = the capability gap of the two source models (wide gap = easy: GPT-4 vs InstructGPT; narrow
  gap = hard: GPT-4 vs ChatGPT), and the schedule = a staged switch from the easy pool to the hard pool;
- a reward model's margin as a continuous proxy of the same difficulty (the note's inference);
- the reward model as a *check* of the strength assumption (agreement statistics), not as the labeller.

Difficulty, as this module defines it (larger = harder; the row's ``difficulty`` field):

- without a reward: ``difficulty = -(rank[chosen_model] - rank[rejected_model])`` — minus the strength gap,
  ranks being integers given per model (higher = stronger). The gap is also written as ``strength_gap``.
- with a reward ``r(prompt, completion)``: ``difficulty = -(r(chosen) - r(rejected))`` — minus the reward
  margin (written as ``reward_margin``); a pair the reward finds wrongly ordered is the hardest of all.

Pairs with an empty response (a model that stopped at once) are dropped and counted (``empty_dropped``): the
row format refuses empty completions. Ties are dropped and counted: identical completion texts always, and
equal rewards when a reward is given (they carry no preference signal). With a reward, pairs where the weaker
model scores higher are kept as the paper labels them (stronger = chosen, ``on_disagreement="keep"``),
dropped, or flipped; each is counted.
The field names avoid ``margin``: the collator turns a ``margin`` column into a loss input.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from .rows import DataError, load_rows

# (prompts, completions) -> one scalar per completion, higher is better (batched: reward models score in batches)
RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
DISAGREEMENT_MODES = ("keep", "drop", "flip")


def build_pairs(prompts: Sequence[str], responses: Mapping[str, Sequence[str]], strength: Mapping[str, int | float],
                *, rewards: Mapping[str, Sequence[float]] | None = None,
                on_disagreement: str = "keep") -> tuple[list[dict], dict[str, int]]:
    """Pair every two models' responses per prompt, the stronger model's response chosen.

    Args:
        prompts: the N prompts, in the order of every ``responses[model]`` list.
        responses: model name -> N completions (same prompts, same sampling seed).
        strength: model name -> rank (higher = stronger); two models of equal rank are never paired.
        rewards: optional model name -> N reward values of its responses (see :func:`score_responses`); then
            ``difficulty`` is minus the reward margin.
        on_disagreement: with a reward, what to do when the weaker model's response scores higher:
            ``keep`` (the paper's labels), ``drop`` or ``flip`` (the reward decides).

    Returns:
        ``(rows, stats)``: TRL-format rows ``{prompt, chosen, rejected, difficulty, strength_gap,
        chosen_model, rejected_model[, reward_chosen, reward_rejected, reward_margin]}`` in prompt order, and
        counts (``pairs``, ``empty_dropped``, ``ties_identical``, ``ties_reward``, ``disagreements``,
        ``dropped_disagreements``, ``flipped``, ``pairs_<chosen>_vs_<rejected>``).
    """
    if on_disagreement not in DISAGREEMENT_MODES:
        raise ValueError(f"on_disagreement={on_disagreement!r} is not one of {list(DISAGREEMENT_MODES)}")
    missing = sorted(set(responses) - set(strength))
    if missing:
        raise ValueError(f"models {missing} have responses but no strength rank; give strength[name]=int "
                         f"(higher = stronger) for every model in {sorted(responses)}")
    if rewards is not None:
        bad = [m for m in responses if m not in rewards or len(rewards[m]) != len(prompts)]
        if bad:
            raise ValueError(f"rewards must hold {len(prompts)} values for every model; wrong or missing for {bad}")
    if len(responses) < 2:
        raise ValueError(f"need responses of at least two models to make pairs; got {sorted(responses)}")
    for name, comps in responses.items():
        if len(comps) != len(prompts):
            raise ValueError(f"model {name!r} has {len(comps)} responses for {len(prompts)} prompts; every model "
                             "must answer every prompt, in the same order")
    # strongest first, so that (a, b) below has a the stronger model; ties in rank are skipped
    models = sorted(responses, key=lambda m: -strength[m])
    stats: Counter = Counter({k: 0 for k in ("ties_identical", "ties_reward", "disagreements", "dropped_disagreements",
                                             "flipped", "same_rank_skipped", "empty_dropped")})
    rows: list[dict] = []
    for i, prompt in enumerate(prompts):
        for strong, weak in combinations(models, 2):
            gap = strength[strong] - strength[weak]
            if gap <= 0:
                stats["same_rank_skipped"] += 1
                continue
            chosen, rejected = responses[strong][i], responses[weak][i]
            if not chosen.strip() or not rejected.strip():  # the row format refuses empty completions
                stats["empty_dropped"] += 1
                continue
            if chosen.strip() == rejected.strip():
                stats["ties_identical"] += 1
                continue
            row: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                                   "chosen_model": strong, "rejected_model": weak, "strength_gap": gap}
            if rewards is None:
                row["difficulty"] = -gap
            else:
                rc, rr = float(rewards[strong][i]), float(rewards[weak][i])
                if not (math.isfinite(rc) and math.isfinite(rr)):
                    raise ValueError(f"reward returned a non-finite value ({rc}, {rr}) for prompt {i} {prompt!r}")
                if rc == rr:
                    stats["ties_reward"] += 1
                    continue
                if rc < rr:
                    stats["disagreements"] += 1
                    if on_disagreement == "drop":
                        stats["dropped_disagreements"] += 1
                        continue
                    if on_disagreement == "flip":
                        stats["flipped"] += 1
                        row.update(chosen=rejected, rejected=chosen, chosen_model=weak, rejected_model=strong)
                        rc, rr = rr, rc
                row.update(reward_chosen=rc, reward_rejected=rr, reward_margin=rc - rr, difficulty=-(rc - rr))
            stats[f"pairs_{row['chosen_model']}_vs_{row['rejected_model']}"] += 1
            rows.append(row)
    stats["pairs"] = len(rows)
    stats["prompts"] = len(prompts)
    return rows, dict(stats)


def score_responses(reward: RewardFn, prompts: Sequence[str], responses: Mapping[str, Sequence[str]]
                    ) -> dict[str, list[float]]:
    """Each model's responses scored by ``reward`` in one batched call per model."""
    out = {}
    for name, comps in responses.items():
        values = [float(v) for v in reward(list(prompts), list(comps))]
        if len(values) != len(prompts):
            raise ValueError(f"reward returned {len(values)} values for {len(prompts)} responses of {name!r}")
        out[name] = values
    return out


def write_jsonl(rows: Sequence[Mapping], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(dict(r)) + "\n" for r in rows))
    return p


def read_responses(path: str | Path, *, field: str | None = None) -> tuple[list[str], list[str]]:
    """``(prompts, completions)`` from a jsonl of generated responses.

    Each row needs ``prompt`` and a completion under ``field`` (default: the first of ``completion``,
    ``response``, ``model``; ``mmalign sample text --out`` writes ``model``)."""
    prompts, comps = [], []
    for file, n, row in load_rows(path):
        keys = [field] if field else ["completion", "response", "model"]
        key = next((k for k in keys if k in row), None)
        if not isinstance(row.get("prompt"), str):
            raise DataError(f"{file} row {n}: field 'prompt' is {row.get('prompt')!r}; a responses file needs a "
                            "string 'prompt' per row")
        if key is None or not isinstance(row[key], str):
            raise DataError(f"{file} row {n}: no string completion under {keys}; write each response as "
                            "{\"prompt\": ..., \"completion\": ...}")
        prompts.append(row["prompt"])
        comps.append(row[key])
    return prompts, comps


def _difficulties(path: Path, rows: list[tuple[str, int, dict]], key: str) -> list[float]:
    out = []
    for file, n, row in rows:
        v = row.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DataError(f"{file} row {n}: field {key!r} is {v!r}; a curriculum needs a finite number per pair "
                            f"(write it with `mmalign pairs`, or pass key=<your numeric column>)")
        out.append(float(v))
    return out


def curriculum_split(pairs_file: str | Path, n_stages: int, *, key: str = "difficulty") -> list[list[dict]]:
    """Rows of ``pairs_file`` sorted easy→hard (stable: equal difficulties keep file order) and cut into
    ``n_stages`` contiguous parts of near-equal size. Every row lands in exactly one part and each part's
    largest difficulty is <= the next part's smallest (equal values may straddle a boundary)."""
    path = Path(pairs_file)
    rows = load_rows(path)
    if not isinstance(n_stages, int) or n_stages < 1:
        raise ValueError(f"n_stages={n_stages!r} must be an int >= 1")
    if len(rows) < n_stages:
        raise DataError(f"{path}: {len(rows)} pairs cannot fill {n_stages} curriculum stages; use fewer stages "
                        "or more prompts")
    diff = _difficulties(path, rows, key)
    order = sorted(range(len(rows)), key=lambda i: diff[i])
    bounds = [round(s * len(rows) / n_stages) for s in range(n_stages + 1)]
    return [[rows[i][2] for i in order[a:b]] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def curriculum_stages(pairs_file: str | Path, n_stages: int, out_dir: str | Path, *, total_steps: int | None = None,
                      key: str = "difficulty", prefix: str = "difficulty") -> list[dict]:
    """Write the easy→hard split of ``pairs_file`` into ``out_dir`` and return the run's ``stages:`` list.

    Each entry is a :class:`~mmalign.schema.StageConfig` mapping ``{name: <prefix>_<i>, train: [file],
    max_steps?}`` (files ``<out_dir>/<prefix>_stage<i>.jsonl``);
    ``total_steps`` is shared among the stages in proportion to their sizes (at least 1 each), so a
    curriculum run and a shuffled-mix run can be given the same budget. The reference model stays the run's
    (no ``reanchor_reference``): the paper's choice here is not known (unverified)."""
    parts = curriculum_split(pairs_file, n_stages, key=key)
    out = Path(out_dir)
    n = sum(len(p) for p in parts)
    steps = None
    if total_steps is not None:
        if total_steps < n_stages:
            raise ValueError(f"total_steps={total_steps} must be >= n_stages={n_stages} (one step per stage)")
        steps = [max(1, round(total_steps * len(p) / n)) for p in parts]
        steps[-1] = total_steps - sum(steps[:-1])  # exact budget; rounding error goes to the last stage
        if steps[-1] < 1:
            steps = [total_steps // n_stages] * n_stages
            steps[-1] += total_steps - sum(steps)
    stages = []
    for s, part in enumerate(parts):
        file = write_jsonl(part, out / f"{prefix}_stage{s}.jsonl")
        entry: dict[str, Any] = {"name": f"{prefix}_{s}", "train": [str(file)]}
        if steps is not None:
            entry["max_steps"] = steps[s]
        stages.append(entry)
    return stages


def shuffled_mix(pairs_file: str | Path, out_path: str | Path, *, seed: int = 0) -> Path:
    """The baseline: every pair of ``pairs_file`` in one seeded random order (one stage, same rows)."""
    rows = [r for _, _, r in load_rows(Path(pairs_file))]
    random.Random(seed).shuffle(rows)
    return write_jsonl(rows, out_path)
