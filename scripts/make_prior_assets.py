"""Write the small synthetic image-caption data in ``assets/prior/`` that the tiny PRIOR configs train on.

Images are 16×16 PNGs of one coloured shape on a noisy dark background; captions read
``"<opener> a <colour> <shape> <closer>"`` where only the colour and shape words depend on the image
(:func:`mmalign.demos.prior.caption_rows`, fixed seeds, so the output is reproducible; ``--check`` regenerates
into a temporary directory and compares).

Files: ``captions.jsonl`` (64 rows, ``images/``), ``captions_eval.jsonl`` (16 rows, ``images_eval/``); each
row is ``{"image": "images/img_0000.png", "caption": ..., "colour": ..., "shape": ...}``.

Usage::

    python scripts/make_prior_assets.py            # (re)write assets/prior/
    python scripts/make_prior_assets.py --check    # exit 1 if the committed files are stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from mmalign.demos.prior import caption_rows, write_jsonl  # noqa: E402

DEFAULT_OUT = REPO / "assets" / "prior"


def build(out: Path) -> list[Path]:
    """Write every asset file into ``out``; returns the paths written (data files and images)."""
    write_jsonl(caption_rows(64, seed=11, image_dir=out / "images"), out / "captions.jsonl")
    write_jsonl(caption_rows(16, seed=12, image_dir=out / "images_eval", prefix="ev"), out / "captions_eval.jsonl")
    return sorted(p for p in out.rglob("*") if p.is_file())


def check(out: Path) -> list[str]:
    """Relative paths of files in ``out`` that differ from a fresh build (or are missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build(Path(tmp))
        bad = []
        for p in fresh:
            rel = p.relative_to(tmp)
            if not (out / rel).is_file() or not filecmp.cmp(p, out / rel, shallow=False):
                bad.append(str(rel))
        return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="compare with a fresh build instead of writing")
    args = parser.parse_args()
    if args.check:
        bad = check(args.out)
        if bad:
            print(f"stale assets in {args.out}: {bad}; run python scripts/make_prior_assets.py")
            sys.exit(1)
        print(f"{args.out}: up to date")
        return
    files = build(args.out)
    print(f"wrote {len(files)} files ({sum(p.stat().st_size for p in files) / 1024:.1f} KiB) to {args.out}")


if __name__ == "__main__":
    main()
