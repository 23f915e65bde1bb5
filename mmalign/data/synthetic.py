"""Deterministic synthetic text preference data for tests and demos: additions with right and wrong sums.

``addition_rows(n, format=...)`` gives rows in any format of :mod:`mmalign.data.rows` (plain or
conversational), so every data path can be exercised without shipping files. The preferred answer is the
correct sum; wrong answers are off by a random non-zero amount, and ranked lists rank candidates by how far
off they are. Each row carries ``difficulty`` (the number of carries, 0 or 1) and ``source`` metadata.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmalign.data.rows import FORMATS


def _wrong(rng: random.Random, answer: int, avoid: set[int]) -> int:
    while True:
        guess = answer + rng.choice([-3, -2, -1, 1, 2, 3])
        if guess >= 0 and guess not in avoid:
            return guess


def addition_rows(n: int, *, format: str = "pairs", conversational: bool = False, seed: int = 0,
                  max_operand: int = 9, num_candidates: int = 4) -> list[dict[str, Any]]:
    """``n`` rows such as ``{"prompt": "add: 3 5 =", "chosen": " 8", "rejected": " 9", ...}``.

    Args:
        n: number of rows.
        format: one of ``pairs``, ``unpaired`` (alternating desirable/undesirable), ``ranked``, ``sft``.
        conversational: emit TRL conversational rows (user/assistant messages) instead of strings.
        seed: the same seed gives the same rows.
        max_operand: operands are drawn from ``0..max_operand``.
        num_candidates: list length for ``ranked`` rows (>= 2).
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {list(FORMATS)}")
    if num_candidates < 2:
        raise ValueError(f"num_candidates={num_candidates} must be >= 2")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        answer = a + b
        if conversational:
            prompt: Any = [{"role": "user", "content": f"add: {a} {b}"}]

            def text(value: int) -> Any:
                return [{"role": "assistant", "content": str(value)}]
        else:
            prompt = f"add: {a} {b} ="

            def text(value: int) -> Any:
                return f" {value}"
        meta = {"difficulty": int(a % 10 + b % 10 >= 10), "source": "synthetic/addition"}
        if format == "pairs":
            row = {"prompt": prompt, "chosen": text(answer), "rejected": text(_wrong(rng, answer, {answer}))}
        elif format == "unpaired":
            good = i % 2 == 0
            value = answer if good else _wrong(rng, answer, {answer})
            row = {"prompt": prompt, "completion": text(value), "label": good}
        elif format == "ranked":
            values = [answer]
            while len(values) < num_candidates:
                values.append(_wrong(rng, answer, set(values)))
            rng.shuffle(values)
            by_error = sorted(range(len(values)), key=lambda k: (abs(values[k] - answer), values[k]))
            ranking = [by_error.index(k) for k in range(len(values))]
            row = {"prompt": prompt, "completions": [text(v) for v in values], "ranking": ranking}
        else:
            row = {"prompt": prompt, "completion": text(answer)}
        rows.append({**row, **meta})
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON lines (creating parent directories); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def corpus(rows: Iterable[dict[str, Any]]) -> list[str]:
    """All text of the rows (prompts, completions, message contents), e.g. to train a tokenizer on.

    Any row shape is taken (this runs on the raw rows, before they are validated): strings are collected, lists
    searched, and of a dict only its ``content`` (a message) or ``text`` (a content part); anything else is
    passed over, so that a malformed row is left for validation to report."""
    out: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    add(item.get("content"))
                    add(item.get("text"))
                else:
                    add(item)

    for row in rows:
        for key in ("prompt", "chosen", "rejected", "completion", "completions", "text", "messages"):
            add(row.get(key))
    return out
