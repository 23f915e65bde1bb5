"""Lazy row sources behind :func:`mmalign.data.image.load_image_records`.

A source is a ``.jsonl``/``.json`` file (via :func:`mmalign.data.rows.load_rows`, read whole), a ``.parquet`` file
(memory-mapped, cells read on demand: Pick-a-Pic v2 is ~335 GB), a ``save_to_disk`` directory (lazy), a directory
of such files, or a glob pattern (``pickapic_v2/data/train-*.parquet``). Each opens as a :class:`_Table`.
"""

from __future__ import annotations

import glob
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .rows import DataError, load_hf_split, load_rows


class _Table:
    """Rows of one source, read lazily: ``column(key)`` for small columns, ``cell(row, key)`` for images."""

    def __init__(self, name: str, base_dir: Path, n: int, columns: set[str]):
        self.name, self.base_dir, self.n, self.columns = name, base_dir, n, columns

    def column(self, key: str) -> list:
        raise NotImplementedError

    def cell(self, row: int, key: str) -> Any:
        raise NotImplementedError


class _RowsTable(_Table):
    def __init__(self, name: str, base_dir: Path, rows: list[dict], numbers: list[int]):
        cols = set().union(*(r.keys() for r in rows)) if rows else set()
        super().__init__(name, base_dir, len(rows), cols)
        self.rows, self.numbers = rows, numbers

    def column(self, key: str) -> list:
        return [r.get(key) for r in self.rows]

    def cell(self, row: int, key: str) -> Any:
        return self.rows[row].get(key)


class _ArrowTable(_Table):
    def __init__(self, path: Path, limit: int | None):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, memory_map=True)
        except Exception as e:  # ArrowInvalid, OSError, ...
            raise DataError(f"{path}: cannot read parquet file: {e}; fix: re-export the file") from e
        if limit is not None:
            table = table.slice(0, limit)
        super().__init__(str(path), path.parent, table.num_rows, set(table.column_names))
        self.table = table

    def column(self, key: str) -> list:
        return self.table.column(key).to_pylist() if key in self.columns else [None] * self.n

    def cell(self, row: int, key: str) -> Any:
        return self.table.column(key)[row].as_py()


class _HFTable(_Table):
    def __init__(self, path: Path, split: str, limit: int | None):
        ds = load_hf_split(path, split, limit)
        super().__init__(str(path), path, len(ds), set(ds.column_names))
        self.ds, self._cols = ds, {}

    def column(self, key: str) -> list:
        return list(self.ds.select_columns([key])[key]) if key in self.columns else [None] * self.n

    def cell(self, row: int, key: str) -> Any:
        if key not in self._cols:
            self._cols[key] = self.ds.select_columns([key])
        return self._cols[key][row][key]


def _open_sources(sources: Sequence[str | Path], split: str, limit: int | None, skip: bool,
                  skipped: Counter) -> list[_Table]:
    tables: list[_Table] = []
    expanded: list[Path] = []
    for src in sources:  # shell-style patterns select shards, e.g. pickapic_v2/data/train-*.parquet
        if any(ch in str(src) for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(src)))
            if not matches:
                raise DataError(f"{src}: the pattern matches no file; fix: check the path (relative to {Path.cwd()})")
            expanded += matches
        else:
            expanded.append(Path(src))
    for path in expanded:
        if not path.exists():
            raise DataError(f"{path}: no such file or directory; fix: check the path (relative to {Path.cwd()})")
        if path.is_dir() and not ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jsonl", ".json", ".parquet"))
            if not files:
                raise DataError(f"{path}: directory holds no .jsonl/.json/.parquet files and is not a saved HF "
                                "dataset; fix: point to a data file or a directory written by save_to_disk")
        else:
            files = [path]
        for f in files:
            if f.is_dir():
                tables.append(_HFTable(f, split, limit))
            elif f.suffix.lower() == ".parquet":
                tables.append(_ArrowTable(f, limit))
            else:
                rows = load_rows(f, limit=limit, skip_bad_rows=skip, skipped=skipped)
                tables.append(_RowsTable(str(f), f.parent, [r for _, _, r in rows], [n for _, n, _ in rows]))
    return tables
