"""Preference rows: read them from files, then validate them into typed records.

Two steps, kept apart so that every error says what is wrong and where:

1. :func:`load_rows` reads ``.jsonl`` / ``.json`` / ``.parquet`` files, a local HF ``datasets`` directory
   (``save_to_disk`` of a ``Dataset`` or ``DatasetDict``), a directory of such files, or a list of any of
   these. Each row comes back as ``(file, row_number, dict)``; numbers are 1-based (``.jsonl``: line numbers).
   The readers (and :class:`DataError`) live in :mod:`mmalign.data.row_files` and are re-exported here.
2. :func:`parse_rows` detects the format and turns each row into a :class:`PairRow`, :class:`UnpairedRow`,
   :class:`RankedRow` or :class:`SFTRow`. Columns it does not consume (``difficulty``, ``source``, ``margin``,
   ``weight``, ...) are kept in ``meta``.

Formats, detected from each row's keys (the most common format wins; rows of another format are errors):

=========  =================================  ================================================================
format     keys                               notes
=========  =================================  ================================================================
pairs      prompt, chosen, rejected           ``prompt`` may be left out when chosen/rejected are
                                              conversations sharing their first turns (TRL's implicit prompt)
unpaired   prompt, completion, label          ``label``: bool, 0/1, or "true"/"false"/"yes"/"no"/"1"/"0"
ranked     prompt, completions, ranking       ``ranking[i]`` is the rank of ``completions[i]``, 0 = best (a
                                              permutation of 0..K-1); or ``scores``, higher = better
sft        prompt, completion | text |        ``text``: the prompt is empty; ``messages``: split before the
           messages                           last assistant turn
=========  =================================  ================================================================

Text fields are plain strings or conversations: lists of ``{"role": str, "content": str}`` messages (TRL's
conversational format) with roles from :data:`ROLES`; a conversational completion ends with an assistant turn.
A row uses one kind for all of its text fields. ``margin``/``weight`` and ranking ``scores`` are finite numbers.

Bad rows raise one :class:`DataError` listing up to 10 of them (file, row, field, value, fix); with
``skip_bad_rows=True`` they are dropped and counted per reason instead, for the training logs. Rows whose
candidates are all identical are always dropped, counted (``identical_candidates``) and warned about: they are
well-formed but hold no preference (see :data:`ALWAYS_DROPPED`). What the file readers refuse (invalid JSON,
duplicate keys, lone surrogates, deep nesting, over-long numbers) is listed in :mod:`mmalign.data.row_files`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# The records live in `records`; step 1 (file reading) and the error types in row_files, which must not import
# this module (see its docstring). The names are re-exported so that `from mmalign.data.rows import ...` works.
from .records import (  # noqa: F401
    Message,
    Origin,
    PairRow,
    ParsedRows,
    RankedRow,
    Record,
    SFTRow,
    Text,
    UnpairedRow,
)
from .row_files import MAX_REPORTED, SKIP_HINT, DataError, RowProblem, load_hf_split, load_rows, short_repr  # noqa: F401

log = logging.getLogger(__name__)

FORMATS = ("pairs", "unpaired", "ranked", "sft")
NUMERIC_META = ("margin", "weight")  # the collator turns these columns into tensors, so they must be numbers
_TRUE, _FALSE = {"true", "yes", "1"}, {"false", "no", "0"}
# The roles chat templates know (OpenAI/TRL, plus developer, function and Llama 3's ipython). Any other role is a
# typo or a foreign schema: templates drop such turns or render them as plain text, so the row would train on
# something else than it says.
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
# Reasons for which a row is dropped (and counted, and warned about) even without skip_bad_rows. Identical
# candidates are not malformed, and TRL trains them, but they carry no preference: the DPO-family margin is 0
# for every weight, so the row adds no gradient and only dilutes the batch mean (and sft/nll terms would train
# on a "preferred" answer that is also the rejected one). Refusing the whole file for them would stop runs on
# sampled pairs where two samples coincide; mmalign.data.pairs drops such ties the same way (ties_identical).
ALWAYS_DROPPED = ("identical_candidates",)
# Keys that identify a format; a row holding keys of two formats takes the first match.
_SIGNATURES = {
    "pairs": ("chosen", "rejected"),
    "ranked": ("completions", "ranking"),
    "unpaired": ("label",),
    "sft": ("completion", "text", "messages"),
}
_CONSUMED = {
    "pairs": {"prompt", "chosen", "rejected"},
    "unpaired": {"prompt", "completion", "label"},
    "ranked": {"prompt", "completions", "ranking"},
    "sft": {"prompt", "completion", "text", "messages"},
}


class _Bad(Exception):
    """Raised by the row validators; :func:`parse_rows` adds the row's origin to make a RowProblem."""

    def __init__(self, reason: str, field: str, value: Any, message: str, fix: str):
        super().__init__(message)
        self.details = (reason, field, value, message, fix)


# --------------------------------------------------------------------------------------------------------
# Parsing and validation


def parse_rows(rows: Iterable[tuple[str, int, Mapping] | Mapping], *, format: str = "auto",
               skip_bad_rows: bool = False) -> ParsedRows:
    """Validate rows into typed records.

    Args:
        rows: ``(file, row_number, dict)`` triples from :func:`load_rows`, or bare dicts (named ``<rows>:i``).
        format: ``"auto"`` (detected from the keys; the most common format wins) or one of :data:`FORMATS`.
        skip_bad_rows: drop bad rows and count them per reason in ``ParsedRows.skipped`` instead of raising.

    Raises:
        DataError: listing the first 10 bad rows (file, row, field, value, fix) and how many there were.
    """
    if format not in ("auto", *FORMATS):
        raise ValueError(f"format={format!r} is not one of {['auto', *FORMATS]}")
    tagged = [r if isinstance(r, tuple) else ("<rows>", i, r) for i, r in enumerate(rows, start=1)]
    detected = [_detect(row) for _, _, row in tagged]
    fmt = format
    if fmt == "auto":
        counts = Counter(d for d in detected if d is not None)
        if not counts and tagged:
            file, row_no, row = tagged[0]
            raise DataError(f"{file}:{row_no}: cannot tell the data format from the keys {sorted(row)}; "
                            "fix: name the columns prompt/chosen/rejected (pairs), prompt/completion/label "
                            "(unpaired), prompt/completions/ranking (ranked) or prompt/completion, text or "
                            "messages (sft), or pass format= explicitly")
        fmt = counts.most_common(1)[0][0] if counts else format

    records: list[Record] = []
    skipped: Counter = Counter()
    dropped: Counter = Counter()  # ALWAYS_DROPPED reasons seen, to warn once per reason
    problems: list[RowProblem] = []
    for (file, row_no, row), det in zip(tagged, detected, strict=True):
        try:
            # sft keys are a subset of the unpaired ones: such a row is an unpaired row missing its label.
            if det is not None and det != fmt and not (det == "sft" and fmt == "unpaired"):
                key = next(k for k in _SIGNATURES[det] if row.get(k) is not None)
                raise _Bad("mixed_formats", key, sorted(row), f"makes this row {det!r} format, but the data "
                           f"is {fmt!r}", f"keep one format per dataset (keys {sorted(_CONSUMED[fmt])})")
            records.append(_PARSERS[fmt](row, (file, row_no)))
        except _Bad as bad:
            problem = RowProblem(file, row_no, *bad.details)
            if problem.reason in ALWAYS_DROPPED and not dropped[problem.reason]:
                log.warning("%s; the row is dropped and counted as skipped/%s (also every other such row)",
                            problem, problem.reason)
            if skip_bad_rows or problem.reason in ALWAYS_DROPPED:
                skipped[problem.reason] += 1
                dropped[problem.reason] += problem.reason in ALWAYS_DROPPED
            else:
                problems.append(problem)
    if problems:
        raise DataError.from_problems(problems)
    return ParsedRows(records, skipped, fmt, len(tagged))


def _detect(row: Mapping) -> str | None:
    # None counts as absent: HF datasets and parquet fill missing columns with None.
    return next((f for f, keys in _SIGNATURES.items() if any(row.get(k) is not None for k in keys)), None)


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def _is_finite(v: Any) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float (the collator would fail on it)
        return False


def _check_text(value: Any, key: str, *, completion: bool) -> Text:
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(_is_message(m) for m in value):
        # HF datasets fill absent struct fields with None; drop them so chat templates see clean messages.
        value = [{k: v for k, v in m.items() if v is not None} for m in value]
        bad_role = next((i for i, m in enumerate(value) if m["role"] not in ROLES), None)
        if bad_role is not None:
            raise _Bad("bad_role", f"{key}[{bad_role}].role", value[bad_role]["role"],
                       f"is not a chat role ({', '.join(ROLES)})", "use one of these roles (a typo?), or map "
                       "your dataset's roles to them")
        text = "".join(m["content"] for m in value)
    else:
        raise _Bad("bad_type", key, value, "must be a string or a list of {'role': str, 'content': str} "
                   "messages", "convert the value to text, or to messages with string 'role' and 'content'")
    if completion and not text.strip():
        raise _Bad("empty_completion", key, value, "is an empty completion",
                   "give the row a non-empty completion or remove the row")
    return value


def _field(row: Mapping, key: str, *, completion: bool) -> Text:
    if row.get(key) is None:
        raise _Bad("missing_field", key, row.get(key), "is missing",
                   f"add a {key!r} field (a string or a list of messages)")
    return _check_text(row[key], key, completion=completion)


def _same_kind(prompt: Text, candidates: Sequence[Text], keys: Sequence[str]) -> None:
    """Every format's last check of prompt and candidates: one kind of text, conversational completions that
    end with an assistant turn, and not all candidates alike (see ALWAYS_DROPPED). A ranked list with some
    repeated samples keeps its other comparisons; only one whose candidates are all the same is dropped."""
    if isinstance(prompt, list) and not prompt:  # also an implicit prompt: conversations with no shared first turn
        raise _Bad("empty_prompt", "prompt", prompt, "is an empty conversation (chat templates need a message to "
                   "render)", "start each conversation with a user (or system) turn; it becomes the prompt")
    for key, cand in zip(keys, candidates, strict=True):
        if isinstance(cand, list) != isinstance(prompt, list):
            kind, other = ("a conversation", "a string")
            if not isinstance(cand, list):
                kind, other = other, kind
            raise _Bad("bad_type", key, cand, f"is {kind} but 'prompt' is {other}",
                       "use plain strings or message lists for all text fields of a row, not both")
        if isinstance(cand, list) and (not cand or cand[-1]["role"] != "assistant"):
            # Otherwise the chat template renders no assistant turn, and the completion encodes to (almost)
            # nothing: both sides of a pair would score the same end-of-turn tokens.
            raise _Bad("no_assistant_turn", key, cand, "does not end with an assistant turn, so it holds no "
                       "response to train on", "end the completion with a {'role': 'assistant', 'content': ...} "
                       "message (earlier user turns belong in 'prompt')")
    if len(candidates) > 1 and all(c == candidates[0] for c in candidates[1:]):
        raise _Bad("identical_candidates", keys[-1], candidates[-1], f"is identical to {keys[0]!r}, so the row "
                   "holds no preference", "remove the row, or give it different completions")


def _last_assistant(conv: list[Message], key: str) -> int:
    turns = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    if not turns:
        raise _Bad("missing_field", key, conv, "has no assistant turn to train on",
                   "end the conversation with a {'role': 'assistant', 'content': ...} message")
    return turns[-1]


def _split_shared_prompt(convs: list[list[Message]], keys: Sequence[str]) -> tuple[list[Message], list]:
    """TRL-style implicit prompt: the longest shared message prefix, cut back so that every conversation keeps
    at least its last assistant turn as its completion."""
    n = min(len(c) for c in convs)
    n = next((i for i in range(n) if any(c[i] != convs[0][i] for c in convs[1:])), n)
    n = min([n] + [_last_assistant(c, k) for c, k in zip(convs, keys, strict=True)])
    return convs[0][:n], [c[n:] for c in convs]


def _prompt_or_implicit(row: Mapping, cands: list[Text], keys: Sequence[str]) -> tuple[Text, list[Text]]:
    if row.get("prompt") is not None:
        prompt = _field(row, "prompt", completion=False)
    elif all(isinstance(c, list) for c in cands):
        prompt, cands = _split_shared_prompt(cands, keys)  # type: ignore[arg-type]
    else:
        raise _Bad("missing_field", "prompt", None, "is missing (an implicit prompt is only taken from "
                   "conversational completions sharing their first turns)", "add a 'prompt' field")
    _same_kind(prompt, cands, keys)
    return prompt, cands


def _meta(row: Mapping, fmt: str) -> dict[str, Any]:
    # None means absent: HF datasets and parquet give every row every column, filling gaps with None.
    meta = {k: v for k, v in row.items() if k not in _CONSUMED[fmt] and v is not None}
    for key in NUMERIC_META:
        v = meta.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise _Bad("bad_type", key, v, "must be a number",
                       f"store {key!r} as a number or rename the column")
        if v is not None and not _is_finite(v):  # a NaN/inf weight or margin turns the loss into NaN/inf
            raise _Bad("not_finite", key, v, "is not a finite number",
                       f"give {key!r} a finite value, or leave it out (null) for rows without one")
    return meta


def _parse_pairs(row: Mapping, origin: Origin) -> PairRow:
    keys = ("chosen", "rejected")
    cands = [_field(row, k, completion=True) for k in keys]
    prompt, (chosen, rejected) = _prompt_or_implicit(row, cands, keys)
    return PairRow(prompt, chosen, rejected, _meta(row, "pairs"), origin)


def _parse_label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if value is None:
        raise _Bad("missing_field", "label", value, "is missing", "add a boolean 'label' (true = desirable)")
    raise _Bad("bad_label", "label", value, "is not boolean-like",
               "use true/false (also accepted: 1/0 and the strings 'true'/'false', 'yes'/'no', '1'/'0')")


def _parse_unpaired(row: Mapping, origin: Origin) -> UnpairedRow:
    completion = _field(row, "completion", completion=True)
    prompt = _field(row, "prompt", completion=False)
    _same_kind(prompt, [completion], ["completion"])
    return UnpairedRow(prompt, completion, _parse_label(row.get("label")), _meta(row, "unpaired"), origin)


def _is_int(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _parse_ranking(row: Mapping, k: int) -> list[int]:
    ranking, scores = row.get("ranking"), row.get("scores")
    if ranking is None and scores is not None:
        if not (isinstance(scores, list) and len(scores) == k
                and all(isinstance(s, (int, float)) and not isinstance(s, bool) and _is_finite(s) for s in scores)):
            raise _Bad("bad_ranking", "scores", scores, f"must be a list of {k} finite numbers, one per completion",
                       "give one score per completion (higher = better), or a 'ranking'")
        order = sorted(range(k), key=lambda i: -scores[i])  # stable: ties keep their listed order
        return [order.index(i) for i in range(k)]
    if ranking is None:
        raise _Bad("missing_field", "ranking", None, "is missing",
                   "add 'ranking' (the rank of each completion, 0 = best) or 'scores' (higher = better)")
    if not (isinstance(ranking, list) and all(_is_int(r) for r in ranking)
            and sorted(int(r) for r in ranking) == list(range(k))):
        raise _Bad("bad_ranking", "ranking", ranking, f"is not a permutation of 0..{k - 1} ({k} completions)",
                   "give the rank of each completion (0 = best), each rank exactly once")
    return [int(r) for r in ranking]


def _parse_ranked(row: Mapping, origin: Origin) -> RankedRow:
    comps = row.get("completions")
    if comps is None:
        raise _Bad("missing_field", "completions", None, "is missing", "add a list of completions")
    if not isinstance(comps, list) or len(comps) < 2:
        raise _Bad("bad_type", "completions", comps, "must be a list of at least 2 completions",
                   "give 2 or more completions (single completions belong in the unpaired or sft format)")
    keys = [f"completions[{i}]" for i in range(len(comps))]
    cands = [_check_text(c, key, completion=True) for c, key in zip(comps, keys, strict=True)]
    ranking = _parse_ranking(row, len(cands))
    prompt, cands = _prompt_or_implicit(row, cands, keys)
    return RankedRow(prompt, cands, ranking, _meta(row, "ranked"), origin)


def _parse_sft(row: Mapping, origin: Origin) -> SFTRow:
    key = next((k for k in ("completion", "messages", "text") if row.get(k) is not None), "completion")
    if key == "completion":
        completion = _field(row, "completion", completion=True)
        prompt = _field(row, "prompt", completion=False)
        _same_kind(prompt, [completion], ["completion"])
        return SFTRow(prompt, completion, _meta(row, "sft"), origin)
    value = _check_text(row[key], key, completion=True)
    if isinstance(value, str):
        return SFTRow("", value, _meta(row, "sft"), origin)
    cut = _last_assistant(value, key)
    _same_kind(value[:cut], [value[cut:]], [key])
    return SFTRow(value[:cut], value[cut:], _meta(row, "sft"), origin)


_PARSERS = {"pairs": _parse_pairs, "unpaired": _parse_unpaired, "ranked": _parse_ranked, "sft": _parse_sft}
