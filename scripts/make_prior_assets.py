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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import asset_script  # noqa: E402

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
    return asset_script.check(build, out)


def main() -> None:
    asset_script.main(build, DEFAULT_OUT, __doc__, "make_prior_assets.py")


if __name__ == "__main__":
    main()
