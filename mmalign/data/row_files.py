"""Reading preference-row files, and the errors that row reading and row parsing report.

:func:`load_rows` is step 1 of :mod:`mmalign.data.rows`: it reads ``.jsonl`` / ``.json`` / ``.parquet`` files, a
local HF ``datasets`` directory (``save_to_disk`` of a ``Dataset`` or ``DatasetDict``), a directory of such
files, or a list of any of these, and returns each row as ``(file, row_number, dict)`` (1-based; ``.jsonl``:
line numbers). :func:`load_hf_split` opens one split of a saved dataset (also used by the image sources).

:class:`DataError` and :class:`RowProblem` live here, not in ``rows``, to keep the imports acyclic: ``rows``
imports this module (its parser raises these errors, and it re-exports the public names here so that
``from mmalign.data.rows import DataError, load_rows`` keeps working), so this module must not import ``rows``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_REPORTED = 10
SKIP_HINT = ("or set data.skip_bad_rows=true (skip_bad_rows=True in Python) to skip bad rows and count them in "
             "the logs")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
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


def load_rows(source: str | Path | Sequence[str | Path], *, split: str = "train", limit: int | None = None,
              skip_bad_rows: bool = False, skipped: Counter | None = None) -> list[tuple[str, int, dict]]:
    """Read rows from files or HF dataset directories, each as ``(file, row_number, dict)``.

    Args:
        source: a path or a list of paths: ``.jsonl`` (``.ndjson``), ``.json`` (a list of objects or
            ``{"data": [...]}``), ``.parquet``, a ``save_to_disk`` directory, or a directory of data files.
        split: the split to read from a saved ``DatasetDict``.
        limit: stop after this many rows in total.
        skip_bad_rows: skip unparsable ``.jsonl`` lines and non-object rows, counting them in ``skipped``
            (``invalid_json`` / ``not_an_object``). A missing or unreadable file always raises.

    Raises:
        DataError: naming the file (and line) and the fix.
    """
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    if not sources:
        raise DataError("no data sources given; fix: pass a file or directory path (or a list of them)")
    skipped = Counter() if skipped is None else skipped
    out: list[tuple[str, int, dict]] = []
    for src in sources:
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
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            hint = " (one JSON object per line? then name the file .jsonl)" if "Extra data" in str(e) else ""
            raise DataError(f"{path}{where}: invalid JSON: {e}; fix: repair the file{hint}") from e
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
        if _keep_object(row, f"{path}:{i}: row {i}", skip, skipped):
            out.append((str(path), i, row))
    return out


def _keep_object(row: Any, where: str, skip: bool, skipped: Counter) -> bool:
    if isinstance(row, dict):
        return True
    if skip:
        skipped["not_an_object"] += 1
        return False
    raise DataError(f"{where} is a {type(row).__name__} ({short_repr(row)}), not an object; fix: make every "
                    f"row a JSON object with named fields, {SKIP_HINT}")


def _read_jsonl(path: Path, skip: bool, skipped: Counter, limit: int | None) -> list:
    out = []
    with path.open("rb") as f:  # bytes, so that a bad encoding is reported with its line number too
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                if skip:
                    skipped["invalid_json"] += 1
                    continue
                raise DataError(f"{path}:{lineno}: invalid JSON on line {lineno}: {e} "
                                f"(line: {short_repr(raw)}); fix: make each line one JSON object, "
                                f"{SKIP_HINT}") from e
            if _keep_object(row, f"{path}:{lineno}: line {lineno}", skip, skipped):
                out.append((str(path), lineno, row))
    return out


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
    return [(str(path), i + 1, row) for i, row in enumerate(load_hf_split(path, split, limit))]

