"""Image/video-conditioned preference rows for vision-language LMs → :class:`VLMExample` (decoded media, chat prompt).

Formats, detected per row (first match) or restricted with ``formats=``:

======  ===============================================  =========================================================
format  keys                                             notes
======  ===============================================  =========================================================
swift   messages (+ rejected_response | label),          ms-swift's DPO/KTO/SFT JSON: system/user/assistant turns,
        images / videos                                  ``<image>`` / ``<video>`` in the text, the last turn the
                                                         (chosen) response. ``rejected_messages`` / ``_images`` /
                                                         ``_videos`` are refused (candidates share the media here)
temple  prompt, chosen, rejected, videos, perturbation   :func:`mmalign.data.temple.build_temple_pairs` rows
        / magnitude                                      (``mmalign temple-pairs``); read as ``trl`` rows
trl     prompt + chosen/rejected | completion(+label)    TRL's rows (:mod:`mmalign.data.rows`) with ``images`` and/or
        | completions+ranking, images / videos           ``videos``: parts ``{"type": "image"|"video"}`` or
                                                         ``<image>`` / ``<video>`` in string text
======  ===============================================  =========================================================

Media columns hold a path or a list of paths (``image`` / ``video`` also read); relative paths start from
``root``, else the data file's folder (``mmalign temple-pairs`` writes paths relative to its ``--videos`` file:
pass that folder as ``root``). Placeholders: a prompt with no placeholder of a kind gets one per listed medium at
the start of its first user turn (TRL's ``prepare_multimodal_messages`` does so for images [from memory,
unverified]; TEMPLE's rows carry no ``<video>`` by default); otherwise the prompt's placeholders must match the
media count one to one. Completions hold no media; audio columns are refused. All rows of one call are of one
kind (pairs, unpaired, ranked or sft; the most common wins), as in :func:`~mmalign.data.rows.parse_rows`.

Text validation (types, roles, empty or identical candidates, labels, rankings) is :func:`mmalign.data.rows.
parse_rows`'s, on the row with its content parts written as markers; ms-swift rows are first rewritten as
TRL rows, and problems name ms-swift's fields. Media are decoded, sampled and resized by
:class:`~mmalign.data.vlm_media.MediaSpec` (:mod:`mmalign.data.vlm_media`). Every bad row is one
:class:`~mmalign.data.rows.DataError` naming file, row, field, value and fix, or with ``skip_bad_rows`` a skip
counted by reason in :class:`RowCounts`. Sequence length is the model family's concern, not checked here.
"""

from __future__ import annotations

import bisect
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .rows import ALWAYS_DROPPED, MAX_REPORTED, DataError, RowProblem, load_rows, parse_rows
from .vlm_media import MARKER, BadRow, MediaLoader, MediaSpec, flatten_text, parts_to_text, to_parts

VLM_FORMATS = ("swift", "temple", "trl")
MEDIA_KEYS = {"image": ("images", "image"), "video": ("videos", "video")}
_TEXT_KEYS = ("prompt", "chosen", "rejected", "completion", "completions")
_TEMPLE_KEYS = ("perturbation", "magnitude")
_SWIFT_UNSUPPORTED = ("rejected_messages", "rejected_images", "rejected_videos")


@dataclass
class VLMExample:
    """One row with decoded media. ``candidates``: [chosen, rejected] for pairs, best first for ranked lists, one
    completion for unpaired (``label``: desirable or not) and SFT rows. ``prompt``: chat messages whose ``content``
    is a list of parts ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` / ``{"type": "video"}``, one
    media part per entry of ``images`` / ``videos`` in order. ``videos[i]``: uint8 ``[T, H, W, 3]`` sampled at
    ``video_fps[i]`` (shared between rows naming the same file: do not modify in place)."""

    prompt: list[dict]
    candidates: list[str]
    label: bool | None = None
    images: list = field(default_factory=list)  # RGB PIL images
    videos: list[np.ndarray] = field(default_factory=list)
    video_fps: list[float] = field(default_factory=list)
    source: str = "<memory>"
    row: int = 0
    format: str = ""  # one of VLM_FORMATS
    kind: str = ""  # pairs | unpaired | ranked | sft
    meta: dict[str, Any] = field(default_factory=dict)  # the row's other columns (TEMPLE: perturbation, magnitude)
    image_paths: list[str] = field(default_factory=list)  # resolved files, for writing the rows back
    video_paths: list[str] = field(default_factory=list)


@dataclass
class RowCounts:
    """Rows read, used, and skipped per reason (reasons of :mod:`mmalign.data.rows` and ``vlm_media``)."""

    read: int = 0
    good: int = 0
    skipped: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)  # good rows per format

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, int]:
        """Flat stats in the project's log names: rows_read / rows_used / rows_skipped / skipped/<reason>."""
        out = {"rows_read": self.read, "rows_used": self.good, "rows_skipped": self.total_skipped}
        out.update({f"skipped/{k}": v for k, v in sorted(self.skipped.items())})
        out.update({f"format/{k}": v for k, v in sorted(self.formats.items())})
        return out


def detect_format(row: dict) -> str | None:
    """The row's format (see the module docstring), or None when its keys match none."""
    if row.get("messages") is not None:
        return "swift"
    if any(row.get(k) is not None for k in _TEMPLE_KEYS) and row.get("chosen") is not None:
        return "temple"
    if any(row.get(k) is not None for k in ("chosen", "rejected", "completion", "completions", "label")):
        return "trl"
    return None


def _media_list(row: dict, kind: str) -> tuple[str, list]:
    keys = [k for k in MEDIA_KEYS[kind] if row.get(k) is not None]
    if len(keys) > 1:
        raise BadRow("bad_type", keys[1], row[keys[1]], f"and {keys[0]!r} both list {kind}s",
                     f"keep one column ({MEDIA_KEYS[kind][0]!r}) holding every {kind} of the row")
    if not keys:
        return MEDIA_KEYS[kind][0], []
    value = row[keys[0]]
    return keys[0], value if isinstance(value, list) else [value]


# ------------------------------------------------------------------------------------------------ ms-swift rows


def swift_to_trl(row: dict) -> dict:
    """An ms-swift row (``messages`` + ``rejected_response`` | ``label``) as the equivalent TRL row."""
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise BadRow("bad_type", "messages", msgs, "must be a non-empty list of {'role', 'content'} messages",
                     "write the conversation as messages ending with the assistant's (chosen) response")
    last = msgs[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise BadRow("no_assistant_turn", "messages[-1]", last, "is not an assistant turn, so the row holds no "
                     "response to train on", "end 'messages' with {'role': 'assistant', 'content': <chosen>}")
    out = {k: v for k, v in row.items() if k not in ("messages", "rejected_response")}
    out["prompt"] = msgs[:-1]
    rejected = row.get("rejected_response")
    if rejected is not None:
        if not isinstance(rejected, str):
            raise BadRow("bad_type", "rejected_response", rejected, "must be a string",
                         "give the rejected answer as plain text")
        out["chosen"], out["rejected"] = [last], [{"role": "assistant", "content": rejected}]
    else:
        out["completion"] = [last]  # with 'label': an unpaired (KTO) row; without: SFT
    return out


def _text_row(row: dict, fmt: str) -> dict:
    """The row as a text-only TRL row: media keys dropped, content parts written as markers."""
    if fmt == "swift":
        row = swift_to_trl(row)
    out = {k: v for k, v in row.items() if k not in MEDIA_KEYS["image"] + MEDIA_KEYS["video"]}
    for key in _TEXT_KEYS:
        if isinstance(out.get(key), list):
            if key == "completions":
                out[key] = [flatten_text(c, f"{key}[{i}]") for i, c in enumerate(out[key])]
            else:
                out[key] = flatten_text(out[key], key)
    return out


def _completion_text(cand: Any, key: str) -> str:
    if isinstance(cand, str):
        return cand
    if len(cand) != 1:  # after the implicit-prompt split, earlier turns would be lost from a plain string
        raise BadRow("multi_turn_completion", key, cand, f"holds {len(cand)} messages; a candidate is one "
                     "assistant response", "move the earlier turns into 'prompt' and keep the last assistant turn")
    return cand[0]["content"]


def _count_markers(value: Any) -> Counter:
    texts = [value] if isinstance(value, str) else [m["content"] for m in value]
    return Counter({k: sum(t.count(f"<{k}>") for t in texts) for k in MEDIA_KEYS})


_SWIFT_FIELDS = {"prompt": "messages", "chosen": "messages[-1]", "rejected": "rejected_response",
                 "completion": "messages[-1]"}


def _parse_text(file: str, row_no: int, text_row: dict, fmt: str):
    """The one :mod:`mmalign.data.rows` record of a text row, or BadRow (fields renamed for ms-swift rows)."""
    try:
        parsed = parse_rows([(file, row_no, text_row)], format="auto")
    except DataError as e:
        if not e.problems:  # no format signature: parse_rows' whole-file message
            raise BadRow("unknown_format", "<row>", sorted(text_row), "has no keys of a known format",
                         "use TRL keys (prompt/chosen/rejected, prompt/completion/label), or ms-swift's "
                         "messages (+ rejected_response)") from None
        p = e.problems[0]
        where = p.field
        if fmt == "swift":
            where = next((v + where[len(k):] for k, v in _SWIFT_FIELDS.items() if where.startswith(k)), where)
        raise BadRow(p.reason, where, p.value, p.message, p.fix) from None
    if not parsed.records:  # an ALWAYS_DROPPED row (identical candidates)
        key = "completions" if text_row.get("completions") is not None else \
            "rejected_response" if fmt == "swift" else "rejected"
        raise BadRow(next(iter(parsed.skipped)), key, text_row.get(key.replace("_response", "")), "repeats the "
                     "chosen response, so the row holds no preference", "remove the row, or give it different "
                     "completions")
    return parsed.format, parsed.records[0]


def _parse_row(file: str, row_no: int, row: dict, allowed: Sequence[str]) -> tuple[VLMExample, dict]:
    """The row's example without media, and its media columns ``{kind: (key, values)}``; BadRow if malformed."""
    fmt = detect_format(row)
    if fmt is None:
        raise BadRow("unknown_format", "<row>", sorted(row), "has no keys of a known VLM row format",
                     "use TRL keys (prompt/chosen/rejected, prompt/completion/label) with images/videos, or "
                     "ms-swift's messages + rejected_response")
    if fmt not in allowed:
        raise BadRow("format_not_allowed", "<row>", sorted(row), f"is a {fmt!r} row, but formats={list(allowed)}",
                     f"add {fmt!r} to formats, or remove the row")
    for key in _SWIFT_UNSUPPORTED:  # ms-swift's, but refused in any row: as meta they would be silently ignored
        if row.get(key) is not None:
            raise BadRow("unsupported_field", key, row[key], "gives the rejected response its own context; here "
                         "both candidates share the prompt and its media", f"drop {key!r} (write the rejected "
                         "answer as 'rejected' / 'rejected_response'), or remove the row")
    audio = next((k for k in ("audios", "audio") if row.get(k) is not None), None)
    if audio:  # its <audio> markers would reach the model as plain text, the sound silently dropped
        raise BadRow("unsupported_field", audio, row[audio], "holds audio, which VLM rows do not take",
                     f"remove {audio!r} (and any <audio> marker), or remove the row")
    media = {kind: _media_list(row, kind) for kind in MEDIA_KEYS}
    kind, record = _parse_text(file, row_no, _text_row(row, fmt), fmt)
    keys = [f"completions[{i}]" for i in range(len(record.candidates))] if kind == "ranked" else \
        ["chosen", "rejected"] if kind == "pairs" else ["completion"]
    cands = [_completion_text(c, k) for c, k in zip(record.candidates, keys, strict=True)]
    for c, k in zip(cands, keys, strict=True):
        if MARKER.search(c):
            raise BadRow("media_in_completion", k, c, "holds an <image>/<video> placeholder",
                         "media belong in the prompt; remove the placeholder from the completion")
    if kind == "ranked":
        cands = [cands[i] for i in sorted(range(len(cands)), key=lambda i: record.ranking[i])]
    markers = _count_markers(record.prompt)
    for m, (key, values) in media.items():
        if markers[m] and markers[m] != len(values):
            raise BadRow("media_count_mismatch", key, values, f"lists {len(values)} {m}(s) but the prompt holds "
                         f"{markers[m]} <{m}> placeholder(s)", f"give one {m} per placeholder (or no placeholder: "
                         f"then the {m}s go at the start of the first user turn)")
    prompt = to_parts(record.prompt, {m: len(v) for m, (_, v) in media.items() if not markers[m]})
    label = record.label if kind == "unpaired" else None
    return VLMExample(prompt, cands, label, source=file, row=row_no, format=fmt, kind=kind,
                      meta=dict(record.meta)), media


def _attach_media(ex: VLMExample, media: dict, loader: MediaLoader, decode: bool) -> None:
    """Resolve and check (with ``decode``: read, sample and resize) the row's media into ``ex``; BadRow if bad."""
    key, values = media["image"]
    for i, v in enumerate(values):
        where = f"{key}[{i}]"
        img, path = loader.load_image(v, ex.source, where) if decode else \
            (None, loader.check(v, ex.source, where, "image"))
        ex.images.append(img)
        ex.image_paths.append(str(path))
    key, values = media["video"]
    for i, v in enumerate(values):
        where = f"{key}[{i}]"
        if decode:
            frames, fps, path = loader.load_video(v, ex.source, where)
            ex.videos.append(frames)
            ex.video_fps.append(fps)
        else:
            path = loader.check(v, ex.source, where, "video")
        ex.video_paths.append(str(path))


def _check_kind(ex: VLMExample, kind: str) -> None:
    """Rows of one call share one kind (the most common wins), as :func:`mmalign.data.rows.parse_rows` has it:
    else a pairs file with one row missing its rejected answer would quietly train that row as SFT."""
    if ex.kind == kind:
        return
    if kind in ("pairs", "unpaired") and ex.kind == "sft":  # the one key that makes a row of the data's kind
        where = "label" if kind == "unpaired" else "rejected_response" if ex.format == "swift" else "rejected"
        raise BadRow("missing_field", where, None, f"is missing (the other rows are {kind} rows)",
                     f"add {where!r}, or remove the row")
    raise BadRow("mixed_kinds", "<row>", ex.kind, f"makes this a {ex.kind!r} row, but the data are {kind!r} rows",
                 "keep one kind of row per dataset (pairs, unpaired, ranked or sft)")


def read_vlm_rows(paths: str | Path | Sequence[str | Path], *, media: MediaSpec, root: str | Path | None = None,
                  skip_bad_rows: bool = False, formats: Sequence[str] | None = None,
                  limit: int | None = None) -> tuple[list[VLMExample], RowCounts]:
    """Read, validate and decode VLM preference rows from ``.jsonl`` / ``.json`` (/ parquet, HF dirs) files.

    Args:
        paths: a file, directory, or list of them (:func:`mmalign.data.rows.load_rows`).
        media: frame sampling and resizing.
        root: folder relative media paths start from (default: each data file's folder).
        skip_bad_rows: drop bad rows and count them per reason instead of raising.
        formats: the formats allowed (subset of :data:`VLM_FORMATS`); rows of others are bad rows.

    Raises:
        DataError: naming file, row, field, value and fix of each bad row (the first 10 shown).
    """
    allowed = tuple(formats) if formats is not None else VLM_FORMATS
    unknown = sorted(set(allowed) - set(VLM_FORMATS))
    if unknown or not allowed:
        raise ValueError(f"formats={list(allowed)!r}: {unknown or 'empty'}; choose from {list(VLM_FORMATS)}")
    counts = RowCounts()
    rows = load_rows(paths, limit=limit, skip_bad_rows=skip_bad_rows, skipped=counts.skipped)
    counts.read = len(rows) + counts.total_skipped
    problems: list[tuple[int, RowProblem]] = []  # (position in reading order, problem)

    def bad(pos: int, file: str, row_no: int, err: BadRow) -> None:
        if skip_bad_rows or err.reason in ALWAYS_DROPPED:
            counts.skipped[err.reason] += 1
        else:
            problems.append((pos, RowProblem(file, row_no, *err.details)))

    parsed = []  # pass 1, text only: cheap, and decides the kind before any media is decoded
    for pos, (file, row_no, row) in enumerate(rows):
        try:
            parsed.append((pos, *_parse_row(file, row_no, row, allowed)))
        except BadRow as err:
            bad(pos, file, row_no, err)
    text_bad = [pos for pos, _ in problems]
    kind = Counter(ex.kind for _, ex, _ in parsed).most_common(1)[0][0] if parsed else ""
    loader = MediaLoader(media, root)
    examples: list[VLMExample] = []
    undecoded = None  # the first row whose media were only checked for existence
    for pos, ex, media_cols in parsed:
        # Once 10 earlier rows are bad (the report is full), media are only checked, not decoded: the run stops.
        decode = bisect.bisect_left(text_bad, pos) + len(problems) - len(text_bad) < MAX_REPORTED
        undecoded = undecoded or (None if decode else f"{ex.source}:{ex.row}")
        try:
            _check_kind(ex, kind)
            _attach_media(ex, media_cols, loader, decode=decode)
        except BadRow as err:
            bad(pos, ex.source, ex.row, err)
            continue
        examples.append(ex)
        counts.formats[ex.format] += 1
    if problems:
        err = DataError.from_problems([p for _, p in sorted(problems, key=lambda x: x[0])])
        if undecoded:
            err = DataError(f"{err}\n(from {undecoded} on, media files were checked to exist but not decoded: "
                            "more rows may be bad)", err.problems)
        raise err
    counts.good = len(examples)
    if not examples:
        raise DataError(f"{paths}: no usable VLM rows ({counts.read} read, skipped: {dict(counts.skipped)}); fix: "
                        "rows need images/videos plus prompt/chosen/rejected (TRL) or messages + rejected_response "
                        "(ms-swift)")
    return examples, counts


# ------------------------------------------------------------------------------------------------ writing


def _written_path(path: str, out_dir: Path) -> str:
    # Relative to the written file when the media lie under its folder (the pair moves as one), else absolute.
    p = Path(os.path.abspath(path))
    try:
        return p.relative_to(out_dir).as_posix()
    except ValueError:
        return str(p)


def to_swift_row(ex: VLMExample, out_dir: Path | None = None) -> dict:
    """One example as an ms-swift row: ``messages`` (the prompt + the first candidate as the assistant turn),
    ``rejected_response`` (pairs) or ``label`` (unpaired), ``images`` / ``videos`` paths, and its meta columns."""
    kind = ex.kind or ("unpaired" if ex.label is not None else "pairs" if len(ex.candidates) == 2 else "sft")
    if len(ex.candidates) > 2 or not ex.candidates:
        raise ValueError(f"{ex.source}:{ex.row}: {len(ex.candidates)} candidates; an ms-swift row holds one pair "
                         "(or one response); fix: split ranked lists into pairs (e.g. best vs worst) first")
    messages = [{"role": m["role"], "content": parts_to_text(m["content"])} for m in ex.prompt]
    row: dict[str, Any] = {"messages": messages + [{"role": "assistant", "content": ex.candidates[0]}]}
    if len(ex.candidates) == 2:
        row["rejected_response"] = ex.candidates[1]
    elif kind == "unpaired":
        row["label"] = bool(ex.label)
    for key, paths in (("images", ex.image_paths), ("videos", ex.video_paths)):
        if paths:
            row[key] = [_written_path(p, out_dir) if out_dir is not None else p for p in paths]
    row.update({k: v for k, v in ex.meta.items() if k not in row})
    return row


def write_swift_video_dpo(items: Sequence[VLMExample | dict], path: str | Path, *,
                          root: str | Path | None = None) -> Path:
    """Write examples (or raw rows of any :data:`VLM_FORMATS`) as ms-swift DPO rows; ``.json``: one list (as
    TEMPLE's ``convert_to_swift.py`` writes), ``.jsonl``: one row per line. Raw rows are validated (media paths
    checked, not decoded; relative ones start from ``root``, else the cwd). Media paths are written relative to
    the output's folder when under it, else absolute, so :func:`read_vlm_rows` on the file reads the same rows.

    Raises:
        DataError: a bad raw row. ValueError: an example with more than two candidates.
    """
    out = Path(path)
    if out.suffix.lower() not in (".json", ".jsonl"):
        raise ValueError(f"{out}: write to a .json (one list, as TEMPLE/ms-swift) or .jsonl file")
    out.parent.mkdir(parents=True, exist_ok=True)
    out_dir = Path(os.path.abspath(out.parent))
    loader = MediaLoader(MediaSpec(), root if root is not None else Path.cwd())
    rows, problems = [], []
    for i, item in enumerate(items, start=1):
        if isinstance(item, dict):
            try:
                item, media = _parse_row("<rows>", i, item, VLM_FORMATS)
                _attach_media(item, media, loader, decode=False)
            except BadRow as bad:
                problems.append(RowProblem("<rows>", i, *bad.details))
                continue
        rows.append(to_swift_row(item, out_dir))
    if problems:
        raise DataError("\n".join([f"{len(problems)} bad row(s) not written; fix them:"]
                                  + [f"  - {p}" for p in problems[:MAX_REPORTED]]), problems[:MAX_REPORTED])
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    else:
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return out
