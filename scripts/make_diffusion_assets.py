"""Write the small synthetic image preference data in ``assets/diffusion/`` that the tiny diffusion configs use.

Images are 32×32 PNGs of a coloured shape on a plain background ("a red circle"). The preferred image
matches its caption and is clean; the dispreferred one has the wrong colour or heavy pixel noise. Everything
is drawn with PIL from fixed seeds, so the files are reproducible (``--check`` compares a fresh build with the
committed files). Total size stays well under 300 KB.

Files:

- ``images/*.png``: the image pool;
- ``pairs.jsonl`` / ``pairs_eval.jsonl``: ``caption, chosen, rejected`` (paths relative to the file);
- ``unpaired.jsonl``: ``caption, image, label`` (Diffusion-KTO);
- ``ranked.jsonl``: ``caption, images, ranking`` with 3 images: clean, light noise, heavy noise;
- ``sft.jsonl``: ``caption, image``;
- ``pickapic.parquet``: Pick-a-Pic columns ``jpg_0, jpg_1`` (PNG bytes), ``label_0`` ∈ {0, 0.5, 1}, ``caption``
  (every 6th row a tie).

Usage::

    python scripts/make_diffusion_assets.py            # (re)write assets/diffusion/
    python scripts/make_diffusion_assets.py --check    # exit 1 if the committed files are stale
"""

from __future__ import annotations

import argparse
import filecmp
import io
import json
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "assets" / "diffusion"
SIZE = 32
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (235, 235, 235)


def draw(color: str, shape: str, noise: float = 0.0, seed: int = 0):
    """One image; ``noise`` ∈ [0, 1] is the fraction of pixels replaced by random colours."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    d = ImageDraw.Draw(img)
    box = (7, 7, SIZE - 8, SIZE - 8)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[color])
    else:
        d.polygon([(SIZE // 2, 6), (SIZE - 7, SIZE - 8), (6, SIZE - 8)], fill=COLORS[color])
    if noise:
        rng = random.Random(seed)
        px = img.load()
        for y in range(SIZE):
            for x in range(SIZE):
                if rng.random() < noise:
                    px[x, y] = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    return img


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def build(out: Path) -> list[Path]:
    """Write every asset into ``out``; returns the paths written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "images").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    cache: dict[str, bytes] = {}

    def image(color: str, shape: str, noise: float = 0.0, seed: int = 0) -> str:
        name = f"{color}_{shape}" + (f"_n{int(noise * 100)}_{seed}" if noise else "") + ".png"
        if name not in cache:
            cache[name] = _png(draw(color, shape, noise, seed))
            (out / "images" / name).write_bytes(cache[name])
            written.append(out / "images" / name)
        return f"images/{name}"

    rng = random.Random(0)
    combos = [(c, s) for c in COLORS for s in SHAPES]
    pairs, unpaired, ranked, sft, pick = [], [], [], [], []
    for i, (color, shape) in enumerate(combos):
        caption = f"a {color} {shape}"
        good = image(color, shape)
        wrong = rng.choice([c for c in COLORS if c != color])
        bad = image(wrong, shape) if i % 2 == 0 else image(color, shape, 0.5, i)
        pairs.append({"caption": caption, "chosen": good, "rejected": bad})
        unpaired += [{"caption": caption, "image": good, "label": True},
                     {"caption": caption, "image": bad, "label": False}]
        ranked.append({"caption": caption, "images": [image(color, shape, 0.6, i), good, image(color, shape, 0.2, i)],
                       "ranking": [2, 0, 1]})
        sft.append({"caption": caption, "image": good})
        first_good = i % 2 == 0
        label = 0.5 if i % 6 == 5 else (1.0 if first_good else 0.0)
        a, b = (good, bad) if first_good else (bad, good)
        pick.append({"caption": caption, "jpg_0": cache[Path(a).name], "jpg_1": cache[Path(b).name], "label_0": label})
    eval_pairs = [{"caption": f"a {c} {s}", "chosen": image(c, s), "rejected": image(c, s, 0.5, 100 + j)}
                  for j, (c, s) in enumerate(combos[::3])]
    for name, rows in [("pairs.jsonl", pairs), ("pairs_eval.jsonl", eval_pairs), ("unpaired.jsonl", unpaired),
                       ("ranked.jsonl", ranked), ("sft.jsonl", sft)]:
        path = out / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        written.append(path)
    table = pa.table({k: [r[k] for r in pick] for k in ("caption", "jpg_0", "jpg_1", "label_0")})
    pq.write_table(table, out / "pickapic.parquet", compression="zstd")
    written.append(out / "pickapic.parquet")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="compare a fresh build with the files in --out")
    args = ap.parse_args(argv)
    if not args.check:
        files = build(args.out)
        print(f"wrote {len(files)} files, {sum(f.stat().st_size for f in files)} bytes, to {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        # parquet files embed the writer's version string, so only their presence is checked
        stale = [f.relative_to(tmp) for f in build(Path(tmp))
                 if not (args.out / f.relative_to(tmp)).is_file()
                 or (f.suffix != ".parquet" and not filecmp.cmp(f, args.out / f.relative_to(tmp), shallow=False))]
    if stale:
        print(f"stale: {stale}; run python scripts/make_diffusion_assets.py")
        return 1
    print("assets/diffusion is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
