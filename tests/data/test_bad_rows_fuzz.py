"""Bad text rows, generated (issue 18, items 1 and 2): every defect class, in every text format (pairs, unpaired,
ranked, sft; plain and conversational), goes through the whole text data path (read → validate → tokenise →
collate) and ends as a DataError naming file:row and the fix, or (``skip_bad_rows=True``) as a counted skip of
that row alone; never as any other exception. A seeded random mutation pass then looks for what the list misses.
Deterministic; a few seconds."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from mmalign.data.rows import ALWAYS_DROPPED, DataError
from mmalign.data.synthetic import addition_rows, corpus
from mmalign.data.text import build_text_dataset
from mmalign.models.tokenizer import train_bpe_tokenizer

FORMATS = [(fmt, conv) for fmt in ("pairs", "unpaired", "ranked", "sft") for conv in (False, True)]
IDS = [f"{fmt}-{'chat' if conv else 'plain'}" for fmt, conv in FORMATS]
CANDIDATE = {"pairs": "chosen", "unpaired": "completion", "sft": "completion"}  # ranked: completions[0]


@pytest.fixture(scope="module")
def tok():
    rows = [r for fmt, conv in FORMATS for r in addition_rows(20, format=fmt, conversational=conv)]
    return train_bpe_tokenizer(corpus(rows), vocab_size=320)


def _good(fmt: str, conv: bool) -> list[dict]:
    return addition_rows(3, format=fmt, conversational=conv, seed=7)


def _dump(row: dict, extra: str = "") -> str:
    """One JSON line; ``extra`` is raw JSON text appended inside the object (``, "key": value``)."""
    text = json.dumps(row)
    return text[:-1] + extra + "}" if extra else text


def _with_candidate(row: dict, fmt: str, value) -> dict:
    row = copy.deepcopy(row)
    if fmt == "ranked":
        row["completions"][0] = value
    else:
        row[CANDIDATE[fmt]] = value
    return row


def _text(conv: bool, content: str, role: str = "assistant"):
    return [{"role": role, "content": content}] if conv else content


def _identical(row: dict, fmt: str, conv: bool) -> str | None:
    if fmt == "pairs":
        return _dump({**row, "rejected": row["chosen"]})
    if fmt == "ranked":
        return _dump({**row, "completions": [row["completions"][0]] * len(row["completions"])})
    return None  # one candidate: nothing to compare


def _nan_scores(row: dict, fmt: str, conv: bool) -> str | None:
    if fmt != "ranked":
        return None
    plain = {k: v for k, v in row.items() if k != "ranking"}
    return _dump(plain, ', "scores": [NaN' + ", 1" * (len(row["completions"]) - 1) + "]")


# name -> (reason counted when skipped, builder(good row, format, conversational) -> raw line or None if n/a)
DEFECTS: dict[str, tuple[str, Callable[[dict, str, bool], str | None]]] = {
    "long_number": ("number_too_long", lambda r, f, c: _dump(r, ', "n": ' + "9" * 5000)),
    "nesting_past_the_parser": ("nested_too_deep", lambda r, f, c: _dump(r, ', "n": ' + "[" * 100_000 + "]" * 100_000)),
    "nesting_past_max_depth": ("nested_too_deep", lambda r, f, c: _dump(r, ', "n": ' + "[" * 40 + "]" * 40)),
    "lone_surrogate": ("bad_unicode", lambda r, f, c: _dump(_with_candidate(r, f, _text(c, " 3\ud800")))),
    "lone_surrogate_in_prompt": ("bad_unicode", lambda r, f, c: _dump({**r, "prompt": _text(c, "add\udc00", "user")})),
    "lone_surrogate_key": ("bad_unicode", lambda r, f, c: _dump(r, ', "\\ud800": 1')),
    "message_without_content": ("bad_type", lambda r, f, c: _dump(_with_candidate(r, f, [{"role": "assistant"}]))),
    "non_message_dicts": ("bad_type", lambda r, f, c: _dump(_with_candidate(r, f, [{"a": 1}, {"b": "x"}]))),
    "unknown_role": ("bad_role", lambda r, f, c: _dump(_with_candidate(r, f, _text(True, "3", "robot")))
                     if c else None),
    "completion_by_user": ("no_assistant_turn", lambda r, f, c: _dump(_with_candidate(r, f, _text(True, "3", "user")))
                           if c else None),
    "identical_candidates": ("identical_candidates", _identical),
    "duplicate_key": ("duplicate_key", lambda r, f, c: _dump(r, ', "prompt": ' + json.dumps(r["prompt"]))),
    "nan_weight": ("not_finite", lambda r, f, c: _dump(r, ', "weight": NaN')),
    "infinite_margin": ("not_finite", lambda r, f, c: _dump(r, ', "margin": -Infinity')),
    "overflowing_margin": ("not_finite", lambda r, f, c: _dump(r, ', "margin": 1e999')),
    "int_too_large_for_a_float": ("not_finite", lambda r, f, c: _dump(r, ', "weight": ' + "9" * 400)),
    "nan_scores": ("bad_ranking", _nan_scores),
    "cut_off_line": ("invalid_json", lambda r, f, c: _dump(r)[:25]),
    "not_an_object": ("not_an_object", lambda r, f, c: json.dumps([r])),
}


def _write(path: Path, lines: list[str], bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
    return path


def _build(path: Path, tok, skip: bool):
    ds, stats = build_text_dataset(path, tok, max_length=64, skip_bad_rows=skip)
    batch = ds.collate([ds[i] for i in range(len(ds))])  # the rows kept must also make a batch
    assert batch.completion_ids.shape[0] == len(ds)
    return ds, stats


CASES = [(fmt, conv, name) for fmt, conv in FORMATS for name, (_, make) in DEFECTS.items()
         if make(_good(fmt, conv)[0], fmt, conv) is not None]


@pytest.mark.parametrize("fmt,conv,defect", CASES, ids=[f"{f}-{'chat' if c else 'plain'}-{d}" for f, c, d in CASES])
def test_each_defect_is_a_clean_error_or_a_counted_skip(fmt, conv, defect, tok, tmp_path):
    reason, make = DEFECTS[defect]
    good = _good(fmt, conv)
    path = _write(tmp_path / "rows.jsonl", [_dump(good[0]), make(good[1], fmt, conv), _dump(good[2])])
    if reason in ALWAYS_DROPPED:  # well-formed but without a preference: dropped and counted either way
        _, stats = _build(path, tok, skip=False)
        assert stats["rows_used"] == 2 and stats[f"skipped/{reason}"] == 1
    else:
        with pytest.raises(DataError) as err:
            _build(path, tok, skip=False)
        msg = str(err.value)
        assert f"{path}:2:" in msg and "fix:" in msg and "skip_bad_rows" in msg, msg
        assert "Traceback" not in msg and len(msg) < 2000
        assert [p.reason for p in err.value.problems] in ([], [reason])  # [] for lines that are not JSON
    ds, stats = _build(path, tok, skip=True)
    assert [ex.meta["data_row"] for ex in ds.examples] == [1, 3]
    assert stats["rows_read"] == 3 and stats["rows_used"] == 2 and stats["rows_skipped"] == 1
    assert stats[f"skipped/{reason}"] == 1, stats


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_byte_order_mark_is_read_over(suffix, tok, tmp_path):
    good = _good("pairs", False)
    lines = [json.dumps(good)] if suffix == ".json" else [_dump(r) for r in good]
    path = _write(tmp_path / f"rows{suffix}", lines, bom=True)
    ds, stats = _build(path, tok, skip=False)
    assert stats["rows_used"] == 3 and [ex.meta["data_row"] for ex in ds.examples] == [1, 2, 3]


# --------------------------------------------------------------------------------------------------------------
# Random mutations: whatever a seeded mutation of a good row does, the outcome is one of the two allowed ones.

_DEEP: list = []
for _ in range(40):
    _DEEP = [_DEEP]
POOL = [None, True, 0, -1, 1.5, float("nan"), float("inf"), 10**400, "", " ", "x", "\ud800", [], {}, [{}], [0, 0],
        [1, 0], ["a", "b"], [[1]], _DEEP, {"role": "assistant", "content": "8"}, [{"role": "robot", "content": "x"}],
        [{"role": "assistant"}], [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "8"}],
        [{"role": "assistant", "content": ["8"]}], [{"role": 3, "content": "8"}]]
KEYS = ["prompt", "chosen", "rejected", "completion", "completions", "label", "ranking", "scores", "text",
        "messages", "margin", "weight", "difficulty"]


def _places(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _places(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _places(v, (*path, i))


def _mutate(row: dict, rng: random.Random) -> str:
    row = copy.deepcopy(row)
    op = rng.choice(["replace", "replace", "delete", "add", "duplicate", "cut"])
    if op == "cut":
        text = _dump(row)
        return text[: rng.randrange(1, len(text))]
    if op == "add":
        row[rng.choice(KEYS)] = copy.deepcopy(rng.choice(POOL))
        return _dump(row)
    if op == "duplicate":
        return _dump(row, f', {json.dumps(rng.choice(KEYS))}: {json.dumps(rng.choice(POOL))}')
    path = rng.choice([p for p in _places(row) if p])
    parent = row
    for step in path[:-1]:
        parent = parent[step]
    if op == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(rng.choice(POOL))
    return _dump(row)


@pytest.mark.parametrize("fmt,conv", FORMATS, ids=IDS)
def test_random_mutations_never_escape_as_other_exceptions(fmt, conv, tok, tmp_path):
    rng = random.Random(f"{fmt}-{conv}")
    good = _good(fmt, conv)
    outcomes = {"kept": 0, "error": 0, "dropped": 0}
    for i in range(30):
        bad = _mutate(good[1], rng)
        path = _write(tmp_path / f"m{i}.jsonl", [_dump(good[0]), bad, _dump(good[2])])
        try:
            _, stats = _build(path, tok, skip=False)
            outcomes["kept" if stats["rows_used"] == 3 else "dropped"] += 1
        except DataError as e:
            assert f"{path}:2:" in str(e) and "fix:" in str(e), (bad, str(e))
            outcomes["error"] += 1
        _, stats = _build(path, tok, skip=True)
        assert stats["rows_read"] == 3 and stats["rows_used"] + stats["rows_skipped"] == 3, (bad, stats)
        assert stats["rows_used"] >= 2, (bad, stats)
    assert outcomes["error"] >= 10, outcomes  # the mutations do hit the checks
