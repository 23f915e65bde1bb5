"""Row loading and validation: every file format, format detection, conversational rows, and each bad input
raising a DataError that names the file, the row, the field and the fix (or being skipped and counted)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mmalign.data.rows import (
    DataError,
    PairRow,
    RankedRow,
    SFTRow,
    UnpairedRow,
    _split_shared_prompt,  # the implicit-prompt split on its own
    load_rows,
    parse_rows,
)

PAIRS = [
    {"prompt": "add: 1 2 =", "chosen": " 3", "rejected": " 4", "difficulty": 0, "source": "a"},
    {"prompt": "add: 5 6 =", "chosen": " 11", "rejected": " 12", "difficulty": 1, "source": "b"},
    {"prompt": "add: 0 0 =", "chosen": " 0", "rejected": " 1", "difficulty": 0, "source": "a"},
]


def _jsonl(path: Path, rows, blank_after_first: bool = False) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------------
# Loading


def test_jsonl_rows_are_tagged_with_line_numbers(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", PAIRS, blank_after_first=True)
    rows = load_rows(path)
    assert [(f, n) for f, n, _ in rows] == [(str(path), 1), (str(path), 3), (str(path), 4)]
    assert [r for _, _, r in rows] == PAIRS


FILE_KINDS = ["json_list", "json_data", "parquet", "hf_dataset", "hf_dataset_dict", "dir"]


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_every_file_format_loads_the_same_rows(tmp_path, kind):
    if kind == "json_list":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(PAIRS))
    elif kind == "json_data":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({"data": PAIRS}))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(PAIRS), path)
    elif kind == "hf_dataset":
        import datasets

        path = tmp_path / "hf"
        datasets.Dataset.from_list(PAIRS).save_to_disk(str(path))
    elif kind == "hf_dataset_dict":
        import datasets

        path = tmp_path / "hfdict"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS[:1]),
                              "test": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(path))
    else:
        path = tmp_path / "many"
        path.mkdir()
        _jsonl(path / "a.jsonl", PAIRS[:2])
        _jsonl(path / "b.jsonl", PAIRS[2:])
        (path / "notes.txt").write_text("ignored")
    rows = load_rows(path, split="test")
    assert [r for _, _, r in rows] == PAIRS
    if kind != "dir":
        assert [n for _, n, _ in rows] == [1, 2, 3]
    parsed = parse_rows(rows)
    assert parsed.format == "pairs" and len(parsed.records) == 3


def test_list_of_sources_and_limit(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", PAIRS)
    b = _jsonl(tmp_path / "b.jsonl", PAIRS)
    assert len(load_rows([a, b])) == 6
    rows = load_rows([a, b], limit=4)
    expected = [("a.jsonl", 1), ("a.jsonl", 2), ("a.jsonl", 3), ("b.jsonl", 1)]
    assert [(Path(f).name, n) for f, n, _ in rows] == expected


def test_corrupt_json_line_names_file_and_line_or_is_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(PAIRS[0]), json.dumps(PAIRS[1]), "{not json", json.dumps(PAIRS[2])]
    path.write_text("\n".join(lines))
    with pytest.raises(DataError) as err:
        load_rows(path)
    msg = str(err.value)
    assert "bad.jsonl:3" in msg and "line 3" in msg and "fix:" in msg and "skip_bad_rows" in msg
    skipped = Counter()
    rows = load_rows(path, skip_bad_rows=True, skipped=skipped)
    assert [n for _, n, _ in rows] == [1, 2, 4] and skipped == Counter(invalid_json=1)


def test_non_object_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2.*not an object"):
        load_rows(path)
    skipped = Counter()
    assert len(load_rows(path, skip_bad_rows=True, skipped=skipped)) == 1 and skipped["not_an_object"] == 1


@pytest.mark.parametrize("case", ["missing", "bad_json_file", "jsonl_named_json", "bad_parquet",
                                  "json_scalar", "bad_suffix", "missing_split", "empty_dir"])
def test_unreadable_sources_name_the_file_and_fix(tmp_path, case):
    path = tmp_path / {"missing": "nope.jsonl", "bad_json_file": "x.json", "jsonl_named_json": "x.json",
                       "bad_parquet": "x.parquet", "json_scalar": "x.json", "bad_suffix": "x.csv",
                       "missing_split": "hf", "empty_dir": "empty"}[case]
    if case == "bad_json_file":
        path.write_text('[{"prompt": "a",')
    elif case == "jsonl_named_json":
        path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(PAIRS[1]))
    elif case == "bad_parquet":
        path.write_bytes(b"PAR1 this is not parquet")
    elif case == "json_scalar":
        path.write_text("42")
    elif case == "bad_suffix":
        path.write_text("a,b\n")
    elif case == "missing_split":
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(path))
    elif case == "empty_dir":
        path.mkdir()
    with pytest.raises(DataError) as err:
        load_rows(path, split="validation")
    msg = str(err.value)
    assert str(path) in msg and "fix:" in msg
    if case == "jsonl_named_json":
        assert ".jsonl" in msg
    if case == "missing_split":
        assert "'train'" in msg


# ------------------------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("row, fmt, cls", [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "pairs", PairRow),
    ({"prompt": "p", "completion": "a", "label": True}, "unpaired", UnpairedRow),
    ({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]}, "ranked", RankedRow),
    ({"prompt": "p", "completion": "a"}, "sft", SFTRow),
    ({"text": "just text"}, "sft", SFTRow),
])
def test_auto_detects_each_format(row, fmt, cls):
    parsed = parse_rows([dict(row, difficulty=3, weight=0.5)])
    assert parsed.format == fmt and isinstance(parsed.records[0], cls)
    assert parsed.records[0].meta == {"difficulty": 3, "weight": 0.5}
    assert parsed.records[0].origin == ("<rows>", 1)
    assert parse_rows([row], format=fmt).format == fmt


def test_labels_and_candidates_per_format():
    pair, unpaired, ranked, sft = (parse_rows([r]).records[0] for r in [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "completion": "a", "label": "no"},
        {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]},
        {"prompt": "p", "completion": "a"},
    ])
    assert pair.candidates == ["a", "b"] and pair.labels == [0.0, 1.0]
    assert unpaired.label is False and unpaired.labels == [0.0]
    assert ranked.candidates == ["a", "b", "c"] and ranked.labels == [2.0, 0.0, 1.0]
    assert sft.labels[0] != sft.labels[0]  # NaN


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (1, True), (0, False), (1.0, True),
                                             ("true", True), ("False", False), ("yes", True), ("0", False)])
def test_boolean_like_labels(value, expected):
    assert parse_rows([{"prompt": "p", "completion": "a", "label": value}]).records[0].label is expected


def test_scores_give_the_ranking_higher_is_better():
    rec = parse_rows([{"prompt": "p", "completions": ["a", "b", "c"], "scores": [0.1, 0.9, 0.5]}]).records[0]
    assert rec.ranking == [2, 0, 1] and rec.meta["scores"] == [0.1, 0.9, 0.5]


def test_conversational_rows_and_implicit_prompt():
    user = {"role": "user", "content": "What color is the sky?"}
    sys_ = {"role": "system", "content": "Be brief."}
    blue = {"role": "assistant", "content": "Blue."}
    green = {"role": "assistant", "content": "Green."}
    explicit = parse_rows([{"prompt": [user], "chosen": [blue], "rejected": [green]}]).records[0]
    assert explicit.is_conversational and explicit.prompt == [user] and explicit.chosen == [blue]

    # No prompt key: chosen/rejected are whole conversations sharing a prefix (TRL's extract_prompt).
    implicit = parse_rows([{"chosen": [sys_, user, blue], "rejected": [sys_, user, green]}]).records[0]
    assert implicit.prompt == [sys_, user] and implicit.chosen == [blue] and implicit.rejected == [green]

    # Identical conversations still keep their last assistant turn as the completion; such a pair holds no
    # preference, so parse_rows drops and counts it (with or without skip_bad_rows).
    assert _split_shared_prompt([[user, blue], [user, blue]], ["chosen", "rejected"]) == ([user], [[blue], [blue]])
    same = parse_rows([{"chosen": [user, blue], "rejected": [user, blue]}])
    assert not same.records and same.skipped == Counter(identical_candidates=1)

    ranked = parse_rows([{"completions": [[user, blue], [user, green]], "ranking": [1, 0]}]).records[0]
    assert ranked.prompt == [user] and ranked.completions == [[blue], [green]]

    sft = parse_rows([{"messages": [user, blue, {"role": "user", "content": "Sure?"}, blue]}]).records[0]
    assert sft.prompt == [user, blue, {"role": "user", "content": "Sure?"}] and sft.completion == [blue]


def test_none_means_absent():
    """HF datasets / parquet fill absent struct fields and columns with None."""
    msg = {"role": "user", "content": "hi", "name": None}
    rec = parse_rows([{"prompt": [msg], "completion": [{"role": "assistant", "content": "yo"}],
                       "label": None, "difficulty": None, "source": "x"}]).records[0]
    assert isinstance(rec, SFTRow) and rec.prompt == [{"role": "user", "content": "hi"}]
    assert rec.meta == {"source": "x"}


@pytest.mark.parametrize("fmt", ["pairs", "unpaired", "ranked", "sft"])
@pytest.mark.parametrize("conversational", [False, True])
def test_synthetic_rows_are_deterministic_and_valid(fmt, conversational):
    from mmalign.data.synthetic import addition_rows

    rows = addition_rows(8, format=fmt, conversational=conversational, seed=3)
    assert rows == addition_rows(8, format=fmt, conversational=conversational, seed=3)
    assert rows != addition_rows(8, format=fmt, conversational=conversational, seed=4)
    parsed = parse_rows(rows)
    assert parsed.format == fmt and len(parsed.records) == 8 and not parsed.skipped
    assert all(r.is_conversational == conversational for r in parsed.records)


# ------------------------------------------------------------------------------------------------------------
# Bad rows: each one names file, row, field, value and fix; with skip_bad_rows it is counted instead.

GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}
BAD_ROWS = [
    ("missing_field", "rejected", {"prompt": "p", "chosen": "a"}),
    ("missing_field", "prompt", {"chosen": "a", "rejected": "b"}),
    ("empty_completion", "chosen", {"prompt": "p", "chosen": "  \n", "rejected": "b"}),
    ("bad_type", "rejected", {"prompt": "p", "chosen": "a", "rejected": 7}),
    ("bad_type", "chosen", {"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "b"}),
    ("bad_type", "chosen", {"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}],
                            "rejected": "b"}),
    ("bad_type", "margin", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}),
    ("mixed_formats", "completion", {"prompt": "p", "completion": "a"}),
]


@pytest.mark.parametrize("reason, field, row", BAD_ROWS, ids=[f"{r}-{f}" for r, f, _ in BAD_ROWS])
def test_bad_pair_rows(tmp_path, reason, field, row):
    path = _jsonl(tmp_path / "prefs.jsonl", [GOOD, GOOD, row, GOOD])
    rows = load_rows(path)
    with pytest.raises(DataError) as err:
        parse_rows(rows)
    msg = str(err.value)
    assert "prefs.jsonl:3" in msg and repr(field) in msg and "fix:" in msg and "skip_bad_rows" in msg
    assert err.value.problems[0].reason == reason and err.value.problems[0].row == 3
    parsed = parse_rows(rows, skip_bad_rows=True)
    assert len(parsed.records) == 3 and parsed.skipped == Counter({reason: 1})
    assert [r.origin[1] for r in parsed.records] == [1, 2, 4]


@pytest.mark.parametrize("reason, field, row", [
    ("bad_label", "label", {"prompt": "p", "completion": "a", "label": "maybe"}),
    ("bad_label", "label", {"prompt": "p", "completion": "a", "label": 2}),
    ("missing_field", "label", {"prompt": "p", "completion": "a"}),
])
def test_bad_unpaired_rows(reason, field, row):
    rows = [{"prompt": "p", "completion": "a", "label": True}] * 2 + [row]
    with pytest.raises(DataError, match=rf"<rows>:3: field '{field}'.*fix:"):
        parse_rows(rows)
    assert parse_rows(rows, skip_bad_rows=True).skipped == Counter({reason: 1})


@pytest.mark.parametrize("reason, field, row", [
    ("bad_ranking", "ranking", {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 0, 1]}),
    ("bad_ranking", "ranking", {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [1, 2, 3]}),
    ("bad_ranking", "ranking", {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1]}),
    ("bad_ranking", "scores", {"prompt": "p", "completions": ["a", "b"], "scores": [1.0]}),
    ("missing_field", "ranking", {"prompt": "p", "completions": ["a", "b"]}),
    ("bad_type", "completions", {"prompt": "p", "completions": ["a"], "ranking": [0]}),
    ("empty_completion", "completions[1]", {"prompt": "p", "completions": ["a", ""], "ranking": [0, 1]}),
])
def test_bad_ranked_rows(reason, field, row):
    rows = [{"prompt": "p", "completions": ["a", "b"], "ranking": [1, 0]}, row]
    with pytest.raises(DataError, match=rf"<rows>:2: field '{re_escape(field)}'.*fix:"):
        parse_rows(rows)
    assert parse_rows(rows, skip_bad_rows=True).skipped == Counter({reason: 1})


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_string_prompt_with_conversational_completion_is_refused():
    with pytest.raises(DataError, match="'chosen' is a conversation but 'prompt' is a string"):
        parse_rows([{"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}],
                     "rejected": [{"role": "assistant", "content": "b"}]}])


def test_conversation_without_assistant_turn():
    user = {"role": "user", "content": "hi"}
    with pytest.raises(DataError, match="no assistant turn"):
        parse_rows([{"messages": [user]}])


def test_up_to_ten_bad_rows_in_one_error():
    rows = [{"prompt": "p", "chosen": "a"} for _ in range(12)]
    with pytest.raises(DataError) as err:
        parse_rows(rows)
    assert str(err.value).startswith("12 bad rows (the first 10 shown)")
    assert len(err.value.problems) == 10 and str(err.value).count("\n  - ") == 10


def test_unknown_format_and_bad_format_name():
    with pytest.raises(DataError, match=r"<rows>:1: cannot tell the data format.*\['foo'\]"):
        parse_rows([{"foo": 1}])
    with pytest.raises(ValueError, match="format='dpo'"):
        parse_rows([GOOD], format="dpo")


def test_majority_format_wins_and_minority_rows_are_mixed_formats():
    rows = [GOOD, GOOD, {"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1]}]
    parsed = parse_rows(rows, skip_bad_rows=True)
    assert parsed.format == "pairs" and parsed.skipped == Counter(mixed_formats=1)
