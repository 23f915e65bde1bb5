"""Pairing a zero-shot set's class names with its class folders without trusting an implied order.

A ``classnames.txt`` read line by line against the *sorted* folder order scores a model against the wrong names
when the file lists them in another order (``zero, one, …, nine`` for folders that sort ``eight, five, …``):
issue 18 item 10, a CLIP at 86 % top-1 reported at 13 %. :func:`pair_classnames` therefore

1. takes an explicit map when every line reads ``folder: name`` (the folder names exactly, each once);
2. matches by name when the names are the folder names in any order (compared case-insensitively, with
   ``_``/``-`` read as spaces, so ``red_circle`` ↔ ``red circle``);
3. otherwise pairs line *i* with sorted folder *i* only when that order is not ambiguous, and refuses with the fix
   when it is: some names are folder names and some are not, a folder name appears in another folder's line, or
   numbered folders (``1 … 10``) sort differently as text and as numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .rows import MAX_REPORTED, DataError

MAP_HELP = ("write classnames.txt as one `folder: name` line per class folder (e.g. `n01440764: tench`), or "
            "name each line exactly as its folder")


def _norm(name: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", name).lower().split())


def _parse_map(lines: Sequence[str], folders: Sequence[str]) -> dict[str, str] | None:
    """``{folder: name}`` when every line is ``folder: name`` with a known folder on the left, else ``None``."""
    known = set(folders)
    pairs = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
    if not lines or not all(":" in line and k in known and v for line, (k, v) in zip(lines, pairs, strict=True)):
        return None
    out: dict[str, str] = {}
    for k, v in pairs:
        if k in out:
            raise DataError(f"classnames map: folder {k!r} is named twice ({out[k]!r}, {v!r}); fix: one "
                            "`folder: name` line per folder")
        out[k] = v
    return out


def pair_classnames(where: str, folders: Sequence[str], names: Sequence[str] | Mapping[str, str] | None
                    ) -> tuple[list[str], str]:
    """``(name per folder, how)`` for ``folders`` in label (sorted) order; ``how`` is ``"folders"`` (no names
    given), ``"map"``, ``"by name"`` or ``"sorted order"``. ``where`` names the source in errors."""
    if names is None:
        return [f.replace("_", " ") for f in folders], "folders"
    if isinstance(names, Mapping):
        mapping: dict[str, str] | None = {str(k): str(v) for k, v in names.items()}
    else:
        names = [str(n).strip() for n in names if str(n).strip()]
        mapping = _parse_map(names, folders)
    if mapping is not None:
        missing = [f for f in folders if f not in mapping]
        unknown = [k for k in mapping if k not in set(folders)]
        if missing or unknown:
            raise DataError(f"{where}: the `folder: name` map misses folders {missing[:MAX_REPORTED]} and names "
                            f"unknown folders {unknown[:MAX_REPORTED]}; fix: one line per class folder")
        return [mapping[f] for f in folders], "map"
    if len(names) != len(folders):
        raise DataError(f"{where}: {len(names)} class names for {len(folders)} class folders; fix: one name per "
                        f"folder; {MAP_HELP}")
    by_norm = {_norm(n): n for n in names}
    folder_norm = [_norm(f) for f in folders]
    if len(by_norm) == len(names) and set(by_norm) == set(folder_norm):
        return [by_norm[f] for f in folder_norm], "by name"
    reasons = []
    shared = sorted(set(by_norm) & set(folder_norm))
    if shared:
        others = [n for n in names if _norm(n) not in set(folder_norm)]
        reasons.append(f"names {shared[:MAX_REPORTED]} are folder names but {others[:MAX_REPORTED]} are not")
    if all(f.isdigit() for f in folders) and [int(f) for f in folders] != sorted(int(f) for f in folders):
        reasons.append(f"the numbered folders sort as text ({', '.join(folders[:4])}, …), not as numbers")
    for i, f in enumerate(folder_norm):
        hits = [j for j, n in enumerate(names) if j != i and re.search(rf"\b{re.escape(f)}\b", _norm(n))]
        if hits and not re.search(rf"\b{re.escape(f)}\b", _norm(names[i])):
            reasons.append(f"folder {folders[i]!r} (sorted position {i + 1}) is named in line {hits[0] + 1} "
                           f"({names[hits[0]]!r}), not in line {i + 1} ({names[i]!r})")
            break
    if reasons:
        raise DataError(f"{where}: the class names are not the folder names, so they would be paired with the "
                        f"sorted folder order ({', '.join(folders[:4])}, …), and that order is ambiguous: "
                        f"{'; '.join(reasons)}; fix: {MAP_HELP}")
    return list(names), "sorted order"
