"""Regenerate ``assets/clip/``: the synthetic image–caption data of the tiny CLIP configs and tests.

    python scripts/make_clip_assets.py [--out assets/clip]

Deterministic (fixed seeds, :mod:`mmalign.data.synthetic_images`): shapes × colours × positions on 32×32 images.
Writes the same kind of data in every supported format so that configs and tests can use each:

- ``train.jsonl`` (+ ``images/``): 128 images with 4 captions each; ``eval.jsonl``: 32 held-out images;
- ``train_coco.json``: the first 32 training images as a COCO-captions file; ``train.csv``: the same as
  open_clip-style ``filepath,caption`` rows (one row per caption);
- ``zeroshot/``: 16 colour–shape classes × 3 images, ``classnames.txt``, ``templates.txt``;
- ``ref_images/`` (32 images) and ``ref_texts.txt`` (ZSCL's reference set).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

from mmalign.data.synthetic_images import make_samples, render, write_pairs, write_zeroshot


def main(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    train = write_pairs(out, 128, seed=0, name="train")
    write_pairs(out, 32, seed=1, name="eval")
    rows = [json.loads(line) for line in train.read_text().splitlines()][:32]
    images = [{"id": i, "file_name": r["image"]} for i, r in enumerate(rows)]
    anns = [{"id": 10 * i + k, "image_id": i, "caption": c}
            for i, r in enumerate(rows) for k, c in enumerate(r["caption"])]
    (out / "train_coco.json").write_text(json.dumps({"images": images, "annotations": anns}))
    with (out / "train.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        w.writerows([r["image"], c] for r in rows for c in r["caption"])
    write_zeroshot(out / "zeroshot", 3, seed=2)
    ref = out / "ref_images"
    ref.mkdir()
    for i, s in enumerate(make_samples(32, seed=3)):
        render(s).save(ref / f"{i:03d}.png", optimize=True)
    texts = sorted({c for s in make_samples(64, seed=4) for c in s.captions()[:1]})
    (out / "ref_texts.txt").write_text("\n".join(texts) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1024:.0f} KB)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "clip")
    main(ap.parse_args().out)
