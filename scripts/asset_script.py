"""The ``--check`` / write command line shared by the asset generators (``make_*_assets.py``): each generator
defines ``build(out) -> list[Path]`` (deterministic) and calls :func:`main`."""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

Build = Callable[[Path], list[Path]]


def check(build: Build, out: Path) -> list[str]:
    """Relative paths of files in ``out`` that differ from a fresh build (or are missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        bad = []
        for p in build(Path(tmp)):
            rel = p.relative_to(tmp)
            if not (out / rel).is_file() or not filecmp.cmp(p, out / rel, shallow=False):
                bad.append(str(rel))
        return bad


def main(build: Build, default_out: Path, doc: str, script: str) -> None:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--check", action="store_true", help="compare with a fresh build instead of writing")
    args = parser.parse_args()
    if args.check:
        bad = check(build, args.out)
        if bad:
            print(f"stale assets in {args.out}: {bad}; run python scripts/{script}")
            sys.exit(1)
        print(f"{args.out}: up to date")
        return
    files = build(args.out)
    print(f"wrote {len(files)} files ({sum(p.stat().st_size for p in files) / 1024:.1f} KiB) to {args.out}")
