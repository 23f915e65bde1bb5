"""Reading preference-row files, and the errors that row reading and row parsing report.

:func:`load_rows` is step 1 of :mod:`mmalign.data.rows`: it reads ``.jsonl`` / ``.json`` / ``.parquet`` files, a
local HF ``datasets`` directory (``save_to_disk`` of a ``Dataset`` or ``DatasetDict``), a directory of such
files, or a list of any of these, and returns each row as ``(file, row_number, dict)`` (1-based; ``.jsonl``:
line numbers). :func:`load_hf_split` opens one split of a saved dataset (also used by the image sources).
A source that is not a local path but reads as a hub dataset id (``trl-lib/ultrafeedback_binarized``) goes to
``datasets.load_dataset`` with :class:`HubOptions` (split, subset, streaming); offline or unknown, the error says
the hub could not be reached or has no such dataset — not "no such file".

:class:`DataError` and :class:`RowProblem` live here, not in ``rows``, to keep the imports acyclic: ``rows``
imports this module (its parser raises these errors, and it re-exports the public names here so that
``from mmalign.data.rows import DataError, load_rows`` keeps working), so this module must not import ``rows``.

What the readers refuse, each an error naming file, row and field (or, with ``skip_bad_rows``, a skip counted
under the reason in brackets): a line that is not JSON [``invalid_json``]; a number too long for Python's int
parser, 4300+ digits [``number_too_long``]; nesting deeper than :data:`MAX_DEPTH` [``nested_too_deep``]; a
string or key holding a lone UTF-16 surrogate such as ``"\\ud800"``, which is not text and breaks tokenizers
[``bad_unicode``]; an object that repeats a key, where JSON parsers silently keep the last value
[``duplicate_key``]; a row that is not an object [``not_an_object``]. A UTF-8 byte-order mark is read over.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_REPORTED = 10
# owner/name or name (letters, digits, - _ .), optionally a revision after '@': what the hub accepts as a repo id
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
SKIP_HINT = ("or set data.skip_bad_rows=true (skip_bad_rows=True in Python) to skip bad rows and count them in "
             "the logs")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# Preference rows are records of text fields, message lists and content parts: 4 or 5 levels. Anything much
# deeper is not a row, and recursive code downstream (repr, the tokenizer corpus, collators) would overflow.
MAX_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


def short_repr(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # absurd nesting, or an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class RowProblem:
    """Why one row was rejected; ``reason`` is the counter key used when bad rows are skipped."""

    file: str
    row: int
    reason: str
    field: str
    value: Any
    message: str
    fix: str

    def __str__(self) -> str:
        return (f"{self.file}:{self.row}: field {self.field!r} {self.message} "
                f"(value: {short_repr(self.value)}); fix: {self.fix}")


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file, the row and the fix.

    ``problems`` holds the reported :class:`RowProblem` s (empty for whole-file errors).
    """

    def __init__(self, message: str, problems: Sequence[RowProblem] = ()):
        super().__init__(message)
        self.problems = list(problems)

    @classmethod
    def from_problems(cls, problems: Sequence[RowProblem]) -> DataError:
        shown = list(problems[:MAX_REPORTED])
        head = f"{len(problems)} bad row{'s' if len(problems) != 1 else ''}"
        if len(problems) > len(shown):
            head += f" (the first {len(shown)} shown)"
        return cls("\n".join([f"{head}; fix them, {SKIP_HINT}:"] + [f"  - {p}" for p in shown]), shown)


# --------------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class HubOptions:
    """How a hub dataset id is read (``data.hub_split``, ``data.hub_subset``, ``data.hub_streaming``)."""

    split: str = "train"
    subset: str | None = None  # the dataset's configuration name (``load_dataset(name, subset)``)
    streaming: bool = False  # iterate without downloading the whole set (with ``limit``, reads only that many)

    @classmethod
    def of(cls, data_config) -> HubOptions:
        """From a run's ``data:`` section (``hub_split``, ``hub_subset``, ``hub_streaming``)."""
        return cls(data_config.hub_split, data_config.hub_subset, data_config.hub_streaming)


def looks_like_hub_id(source: str | Path) -> bool:
    """Not a local path, and shaped like a hub repo id (``owner/name`` or ``name``) without a data-file suffix."""
    text = str(source)
    return (not Path(text).exists() and bool(_HUB_ID.match(text))
            and not text.lower().endswith((*_DATA_SUFFIXES, ".ndjson")))


def load_rows(source: str | Path | Sequence[str | Path], *, split: str = "train", limit: int | None = None,
              skip_bad_rows: bool = False, skipped: Counter | None = None,
              hub: HubOptions | None = None) -> list[tuple[str, int, dict]]:
    """Read rows from files, HF dataset directories or hub dataset ids, each as ``(file, row_number, dict)``.

    Args:
        source: a path or a list of paths: ``.jsonl`` (``.ndjson``), ``.json`` (a list of objects or
            ``{"data": [...]}``), ``.parquet``, a ``save_to_disk`` directory, or a directory of data files.
        split: the split to read from a saved ``DatasetDict``.
        limit: stop after this many rows in total.
        skip_bad_rows: skip unparsable ``.jsonl`` lines and non-object rows, counting them in ``skipped``
            (``invalid_json`` / ``not_an_object``). A missing or unreadable file always raises.
        hub: how a hub dataset id among the sources is read (default: split ``split``, no subset).

    Raises:
        DataError: naming the file (and line) and the fix.
    """
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    if not sources:
        raise DataError("no data sources given; fix: pass a file or directory path (or a list of them)")
    skipped = Counter() if skipped is None else skipped
    out: list[tuple[str, int, dict]] = []
    for src in sources:
        if looks_like_hub_id(src):
            left = None if limit is None else limit - len(out)
            out.extend(_read_hub(str(src), hub or HubOptions(split=split), left))
            if limit is not None and len(out) >= limit:
                return out
            continue
        for path in _expand(Path(src)):
            left = None if limit is None else limit - len(out)
            out.extend(_read_one(path, split, skip_bad_rows, skipped, left))
            if limit is not None and len(out) >= limit:
                return out
    return out


def _expand(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; fix: check the path (relative to {Path.cwd()})")
    if path.is_file() or _is_hf_dir(path):
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and _suffix(p) in _DATA_SUFFIXES)
    if not files:
        raise DataError(f"{path}: directory holds no .jsonl/.json/.parquet files and is not a saved HF "
                        "dataset; fix: point to a data file or a directory written by Dataset.save_to_disk")
    return files


def _suffix(path: Path) -> str:
    return ".jsonl" if path.suffix.lower() == ".ndjson" else path.suffix.lower()


def _is_hf_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _read_one(path: Path, split: str, skip: bool, skipped: Counter, limit: int | None) -> list:
    if path.is_dir():
        return _read_hf_dir(path, split, limit)
    suffix = _suffix(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, skip, skipped, limit)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_object)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits
            where = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            hint = " (one JSON object per line? then name the file .jsonl)" if "Extra data" in str(e) else ""
            raise DataError(f"{path}{where}: invalid JSON: {e}; fix: repair the file{hint}") from e
        if isinstance(data, _DuplicateKeys):  # the wrapping object; rows are checked one by one below
            raise DataError(f"{path}: the top-level object repeats the key {data.duplicates[0]!r} (JSON keeps only "
                            "the last value); fix: remove or rename one of them")
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of row objects or {{\"data\": [...]}}, got a "
                            f"{type(data).__name__}; fix: put the rows in a JSON list")
        rows = data
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... on corrupt files
            raise DataError(f"{path}: cannot read parquet file: {e}; fix: re-export the file") from e
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; fix: use .jsonl, .json, .parquet "
                        "or a directory written by Dataset.save_to_disk")
    out = []
    for i, row in enumerate(rows, start=1):
        if limit is not None and len(out) >= limit:
            break
        if _keep_object(row, str(path), i, f"row {i}", skip, skipped):
            out.append((str(path), i, row))
    return out


def _keep_object(row: Any, file: str, number: int, what: str, skip: bool, skipped: Counter) -> bool:
    """Whether to keep a decoded row: an object that passes :func:`row_problem`; else skip+count or raise."""
    if not isinstance(row, dict):
        if skip:
            skipped["not_an_object"] += 1
            return False
        raise DataError(f"{file}:{number}: {what} is a {type(row).__name__} ({short_repr(row)}), not an object; "
                        f"fix: make every row a JSON object with named fields, {SKIP_HINT}")
    problem = row_problem(row, file, number)
    if problem is None:
        return True
    if skip:
        skipped[problem.reason] += 1
        return False
    raise DataError.from_problems([problem])


class _DuplicateKeys(dict):
    """A decoded JSON object that repeated a key (the last value kept, as ``json`` does); see :func:`_object`."""

    duplicates: list[str]


def _object(pairs: list[tuple[str, Any]]) -> dict:
    # json's object_pairs_hook: objects decode as usual, but one with a repeated key is flagged, so that the row
    # is reported with the key's place instead of silently losing the earlier value.
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    flagged = _DuplicateKeys(obj)
    seen: set[str] = set()
    flagged.duplicates = [k for k, _ in pairs if k in seen or seen.add(k)]
    return flagged


def row_problem(row: dict, file: str, number: int) -> RowProblem | None:
    """The first thing in a decoded row that no row may hold (see the module docstring), or None.

    Walks the row without recursion, so that no nesting can overflow the stack here."""
    stack: list[tuple[Any, str, int]] = [(row, "", 1)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            return RowProblem(file, number, "nested_too_deep", where, value, f"is nested more than {MAX_DEPTH} "
                              "levels deep", "flatten the row: text fields are strings or lists of messages")
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return RowProblem(file, number, "bad_unicode", where or "<key>", value, "holds a lone UTF-16 "
                                  "surrogate (\\ud800-\\udfff), which is not text", "re-encode the text as "
                                  "UTF-8 (an escaped character outside the BMP needs both surrogate halves)")
        elif isinstance(value, dict):
            if isinstance(value, _DuplicateKeys):
                key = value.duplicates[0]
                return RowProblem(file, number, "duplicate_key", _join(where, key), value[key], "appears twice in "
                                  "one object (JSON keeps only the last value)", "remove or rename one of them")
            for key, item in reversed(value.items()):
                stack.append((item, _join(where, key), depth + 1))
                if isinstance(key, str) and _SURROGATE.search(key):
                    stack.append((key, _join(where, key), depth))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in reversed(list(enumerate(value))))
    return None


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _read_jsonl(path: Path, skip: bool, skipped: Counter, limit: int | None) -> list:
    out = []
    with path.open("rb") as f:  # bytes, so that a bad encoding is reported with its line number too
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            if not raw.strip():
                continue
            try:
                # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first row.
                row = json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_object)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits
                reason, what, fix = _decode_failure(e)
                if skip:
                    skipped[reason] += 1
                    continue
                raise DataError(f"{path}:{lineno}: invalid JSON on line {lineno}: {what} "
                                f"(line: {short_repr(raw)}); fix: {fix}, {SKIP_HINT}") from e
            if _keep_object(row, str(path), lineno, f"line {lineno}", skip, skipped):
                out.append((str(path), lineno, row))
    return out


def _decode_failure(e: Exception) -> tuple[str, str, str]:
    """(skip reason, what is wrong, fix) for an exception of json.loads."""
    if isinstance(e, RecursionError):
        return "nested_too_deep", "nested too deep to decode", "flatten the row (text fields are strings or lists " \
            "of messages)"
    if not isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):  # int() refusing 4300+ digits
        return "number_too_long", "a number has more digits than Python reads (4300)", "store such numbers as " \
            "strings, or remove them"
    return "invalid_json", str(e)[:200], "make each line one JSON object"


def load_hf_split(path: Path, split: str, limit: int | None = None):
    """One split of a ``save_to_disk`` directory (a ``Dataset``, or a split of a ``DatasetDict``), at most
    ``limit`` rows; a clear error naming the directory when it cannot be read or lacks the split."""
    import datasets  # heavy; imported only when a dataset directory is read

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot load the saved HF dataset: {e}; "
                        "fix: save it again with save_to_disk") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} in this DatasetDict; "
                            f"fix: pass split= one of {sorted(ds)}")
        ds = ds[split]
    return ds if limit is None else ds.select(range(min(limit, len(ds))))


def _read_hf_dir(path: Path, split: str, limit: int | None) -> list:
    # Arrow holds valid UTF-8 and bounded nesting, and has no duplicate keys: nothing for row_problem to find.
    return [(str(path), i + 1, row) for i, row in enumerate(load_hf_split(path, split, limit))]


def _read_hub(name: str, opts: HubOptions, limit: int | None) -> list:
    """Rows of a hub dataset (``datasets.load_dataset``), named ``hub:<id>`` in messages; a clear error when the
    hub cannot be reached (offline) or has no such dataset, split or subset."""
    import datasets  # heavy; imported only when a hub dataset is read

    where = f"hub:{name}" + (f" ({opts.subset})" if opts.subset else "") + f" split {opts.split!r}"
    try:
        ds = datasets.load_dataset(name, opts.subset, split=opts.split, streaming=opts.streaming)
    except (ConnectionError, OSError) as e:  # OfflineModeIsEnabled, DNS, proxy: ConnectionError is an OSError
        offline = "offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)" if "Offline" in str(e) else str(e)
        raise DataError(f"{name}: not a local file or directory, and the Hugging Face hub could not be reached "
                        f"to load it as a dataset: {offline}; fix: fix the path if it is a file, or download the "
                        "dataset where the hub is reachable (datasets.load_dataset(...).save_to_disk(DIR)) and "
                        "pass DIR") from None
    except ValueError as e:  # unknown split / config name
        raise DataError(f"{where}: {e}; fix: set data.hub_split / data.hub_subset to one the dataset has") from None
    except Exception as e:  # DatasetNotFoundError and friends
        raise DataError(f"{name}: not a local path, and loading it from the hub failed ({type(e).__name__}: "
                        f"{e}); fix: check the dataset id and data.hub_subset / data.hub_split") from None
    out = []
    for i, row in enumerate(ds, start=1):
        if limit is not None and len(out) >= limit:
            break
        out.append((f"hub:{name}", i, dict(row)))
    return out
