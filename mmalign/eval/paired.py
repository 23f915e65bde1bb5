"""Paired comparisons of a model against a reference on the same prompts and seeds (``mmalign eval text``,
``mmalign eval diffusion``, the mid-run evaluation of ``run.eval_prompts`` and the demos).

Every sample of the model has a partner from the reference drawn from the same prompt and seed, so the
win-rate compares the two rewards of each pair: 1 for a win, ½ for a tie, 0 for a loss (the convention of the
demos and of AlpacaEval's length-uncontrolled win-rate). Results are also given per seed, with the spread over
seeds (population standard deviation of the per-seed means; 0 for one seed), as the demos report them.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data.rows import DataError

__all__ = ["PROMPT_KEYS", "read_prompts", "seed_summary", "win_rate", "wins"]

PROMPT_KEYS = ("prompt", "caption")  # the field a .jsonl prompt file's rows carry the prompt in


def wins(model: Sequence[float] | torch.Tensor, reference: Sequence[float] | torch.Tensor) -> list[float]:
    """Per pair: 1.0 when the model's reward is higher, 0.5 on a tie, 0.0 when lower."""
    a = [float(x) for x in model]
    b = [float(x) for x in reference]
    if len(a) != len(b):
        raise ValueError(f"win-rate needs paired samples: {len(a)} model rewards, {len(b)} reference rewards")
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)]


def win_rate(model: Sequence[float] | torch.Tensor, reference: Sequence[float] | torch.Tensor) -> float:
    """The mean of :func:`wins` (NaN for no pairs)."""
    w = wins(model, reference)
    return sum(w) / len(w) if w else float("nan")


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def seed_summary(per_seed: list[dict[str, float | None]], keys: Sequence[str]) -> dict[str, float]:
    """``{key: mean over all seeds, key_std: spread of the per-seed means}`` for each key every seed has (the
    per-seed values are means over the same number of samples, so their mean is the overall mean)."""
    out: dict[str, float] = {}
    for k in keys:
        vals = [float(s[k]) for s in per_seed if s.get(k) is not None]
        if len(vals) != len(per_seed) or not vals:
            continue
        out[k] = _mean(vals)
        out[f"{k}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return out


def read_prompts(source: str | Path | Sequence[str], *, where: str = "prompts") -> list[str]:
    """Prompts from a list (as given) or a file: ``.jsonl`` / ``.json`` rows with a ``prompt`` (or ``caption``)
    string, any other file one prompt per non-empty line. A bad file or row raises :class:`DataError` naming it."""
    if not isinstance(source, (str, Path)):
        prompts = [str(p) for p in source]
        if not prompts:
            raise DataError(f"{where}: no prompts given; fix: list at least one prompt, or name a prompt file")
        return prompts
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"{where}: no prompt file at {str(path)!r}; fix: a .txt file (one prompt per line) or a "
                        "jsonl file with a 'prompt' field per row")
    if path.suffix in (".jsonl", ".json"):
        text = path.read_text()
        try:
            rows = json.loads(text) if path.suffix == ".json" else []
        except ValueError as err:
            raise DataError(f"{path}: not valid JSON ({err}); fix: a JSON list of {{'prompt': ...}} rows") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json prompt file must hold a list of {{'prompt': ...}} rows")
        if path.suffix == ".jsonl":
            for i, line in enumerate(text.splitlines(), start=1):
                try:
                    rows.append(json.loads(line) if line.strip() else None)
                except ValueError as err:
                    raise DataError(f"{path}:{i}: not a JSON object ({err}); fix the line") from None
        prompts = []
        for i, row in enumerate(rows, start=1):
            if row is None:
                continue
            value = next((row[k] for k in PROMPT_KEYS if isinstance(row, dict) and k in row), None)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}:{i}: no prompt: each row needs a non-empty string in one of "
                                f"{list(PROMPT_KEYS)} (got {str(row)[:80]!r}); fix the row or use a .txt file")
            prompts.append(value)
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{path}: holds no prompts; fix: one prompt per line (.txt) or a 'prompt' per row (.jsonl)")
    return prompts
