"""A synthetic text task whose alignment effect is unambiguous: "warm colours".

Every prompt asks for a list of colours; a completion is 6 colour words. The SFT corpus draws each word
uniformly from 8 warm and 8 cool colours, so a model trained on it writes about half warm words. The
programmatic reward is the fraction of warm words in a completion (invalid words count as 0), so
alignment should raise the mean reward and the win-rate of samples against the SFT model's samples, while
the KL to the SFT reference measures how far it had to move.

Everything is generated from a seed: the same seed gives the same corpus, pairs and prompts. The text demos
build their data from it, and :func:`reward` is the programmatic reward that the methods know by name
(``warm_colors`` in :mod:`mmalign.methods.rewards` and :mod:`mmalign.methods.auto_pairs`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WARM = ["red", "orange", "yellow", "gold", "amber", "coral", "crimson", "peach"]
COOL = ["blue", "green", "teal", "navy", "mint", "azure", "jade", "cyan"]
COLORS = WARM + COOL
PROMPTS = ["list colors:", "name some colors:", "colors please:", "give me colors:", "six colors:",
           "write colors:", "colors:", "pick colors:"]
N_WORDS = 6


def reward(completion: str) -> float:
    """Fraction of warm colour words among the first N_WORDS words (missing or unknown words score 0)."""
    words = completion.replace(",", " ").split()[:N_WORDS]
    return sum(w in WARM for w in words) / N_WORDS


def _completion(rng: random.Random, p_warm: float = 0.5) -> str:
    return " " + " ".join(rng.choice(WARM) if rng.random() < p_warm else rng.choice(COOL) for _ in range(N_WORDS))


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": rng.choice(PROMPTS), "completion": _completion(rng)} for _ in range(n)]


def preference_rows(n: int, seed: int = 1) -> list[dict]:
    """Pairs of two completions from the SFT distribution; the one with more warm words is chosen.

    Ties are re-drawn so that every pair carries a preference; ``margin`` (reward difference) is kept as
    metadata, which curricula can use as difficulty.
    """
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        a, b = _completion(rng), _completion(rng)
        ra, rb = reward(a), reward(b)
        if ra == rb:
            continue
        chosen, rejected = (a, b) if ra > rb else (b, a)
        rows.append({"prompt": rng.choice(PROMPTS), "chosen": chosen, "rejected": rejected,
                     "margin": abs(ra - rb)})
    return rows


def eval_prompts(n: int, seed: int = 2) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(PROMPTS) for _ in range(n)]


def corpus_texts() -> list[str]:
    """Text for training the demo's BPE tokenizer: every prompt and every colour word."""
    return PROMPTS + [" ".join(COLORS)] * 4 + [" " + c for c in COLORS]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p
