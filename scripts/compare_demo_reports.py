"""Compare two sets of demo reports (``<dir>/<demo>/report.json`` or ``<dir>/<demo>.json``): every number equal,
ignoring wall-clock fields. Used to show that a refactor leaves the demos' printed figures unchanged.

    python scripts/compare_demo_reports.py BEFORE_DIR AFTER_DIR [--tol 0]

Prints one line per demo (``same`` or the differing keys with both values) and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

IGNORED = {"seconds", "train_seconds", "runtime", "wall_seconds"}


def _report(root: Path, name: str) -> dict | None:
    for p in (root / name / "report.json", root / f"{name}.json"):
        if p.is_file():
            return json.loads(p.read_text())
    return None


def _names(root: Path) -> set[str]:
    return {p.parent.name for p in root.glob("*/report.json")} | {p.stem for p in root.glob("*.json")}


def diff(a, b, tol: float, path: str = "") -> list[str]:
    """Paths where ``a`` and ``b`` differ (numbers beyond ``tol``, other values unequal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in IGNORED:
                continue
            if k not in a or k not in b:
                out.append(f"{path}{k}: only in {'after' if k not in a else 'before'}")
                continue
            out += diff(a[k], b[k], tol, f"{path}{k}.")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path[:-1]}: lengths {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff(x, y, tol, f"{path}{i}.")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        same = (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol
        return [] if same else [f"{path[:-1]}: {a} vs {b}"]
    return [] if a == b else [f"{path[:-1]}: {a!r} vs {b!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--tol", type=float, default=0.0, help="absolute tolerance for numbers (default: exact)")
    args = parser.parse_args()
    bad = False
    for name in sorted(_names(args.before) | _names(args.after)):
        a, b = _report(args.before, name), _report(args.after, name)
        if a is None or b is None:
            print(f"{name}: missing in {'before' if a is None else 'after'}")
            bad = True
            continue
        d = diff(a, b, args.tol)
        print(f"{name}: " + ("same" if not d else f"{len(d)} differences: " + "; ".join(d[:8])))
        bad |= bool(d)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
