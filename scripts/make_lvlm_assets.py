"""Write the small synthetic vision preference data in ``assets/lvlm/`` (TRL's vision DPO / KTO rows).

Images are 16×16 PNGs of one colour (6 colours × 2 shades, light pixel noise from fixed seeds, so the files are
reproducible; ``--check`` regenerates into a temporary directory and compares). The preferred completion names
the image's colour, the dispreferred one another colour.

Files (image paths relative to the jsonl file):

- ``images/*.png`` (12 training images), ``images_eval/*.png`` (6 held-out images);
- ``prefs.jsonl``: 24 pairs ``{"images": [...], "prompt", "chosen", "rejected", "colour"}``; every other prompt
  carries an ``<image>`` marker, the others get the image right after BOS;
- ``prefs_eval.jsonl``: 6 pairs on the held-out images;
- ``kto.jsonl``: 24 unpaired rows ``{"images", "prompt", "completion", "label"}`` (12 desirable, 12 not);
- ``prefs_chat.jsonl``: 6 conversational pairs (``{"type": "image"}`` / ``{"type": "text"}`` content parts), for
  checkpoints with a chat template.

Usage::

    python scripts/make_lvlm_assets.py            # (re)write assets/lvlm/
    python scripts/make_lvlm_assets.py --check    # exit 1 if the committed files are stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import asset_script  # noqa: E402
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "assets" / "lvlm"
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (45, 80, 230), "yellow": (235, 215, 40),
           "purple": (150, 55, 200), "orange": (245, 140, 30)}
PROMPTS = ("<image>\nWhat colour is this picture?", "What colour is the picture?")


def _image(path: Path, colour: str, shade: float, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    rgb = np.array(COLOURS[colour], dtype=np.float32) * shade
    img = rgb + rng.normal(0, 6, (16, 16, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(path, optimize=True)


def _images(out: Path, folder: str, shades: tuple[float, ...], seed: int) -> list[tuple[str, str]]:
    """(relative path, colour) of one image per colour × shade."""
    made = []
    for s, shade in enumerate(shades):
        for c, colour in enumerate(COLOURS):
            rel = f"{folder}/{colour}_{s}.png"
            _image(out / rel, colour, shade, seed + 10 * s + c)
            made.append((rel, colour))
    return made


def _wrong(colour: str, k: int) -> str:
    names = list(COLOURS)
    return names[(names.index(colour) + 1 + k % (len(names) - 1)) % len(names)]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build(out: Path) -> list[Path]:
    """Write every asset file into ``out``; returns the paths written."""
    train = _images(out, "images", (1.0, 0.7), seed=0)
    held_out = _images(out, "images_eval", (0.85,), seed=100)
    pairs, kto = [], []
    for i, (rel, colour) in enumerate(train):
        for j, prompt in enumerate(PROMPTS):
            pairs.append({"images": [rel], "prompt": prompt, "chosen": f"It is {colour}.",
                          "rejected": f"It is {_wrong(colour, i + j)}.", "colour": colour})
        kto.append({"images": [rel], "prompt": PROMPTS[i % 2], "completion": f"It is {colour}.", "label": True})
        kto.append({"images": [rel], "prompt": PROMPTS[(i + 1) % 2], "completion": f"It is {_wrong(colour, i)}.",
                    "label": False})
    evals = [{"images": [rel], "prompt": PROMPTS[i % 2], "chosen": f"It is {colour}.",
              "rejected": f"It is {_wrong(colour, i)}.", "colour": colour} for i, (rel, colour) in enumerate(held_out)]
    chat = [{"images": [rel],
             "prompt": [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": "What colour is this picture?"}]}],
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"It is {colour}."}]}],
             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"It is {_wrong(colour, i)}."}]}]}
            for i, (rel, colour) in enumerate(train[:6])]
    _write(out / "prefs.jsonl", pairs)
    _write(out / "prefs_eval.jsonl", evals)
    _write(out / "kto.jsonl", kto)
    _write(out / "prefs_chat.jsonl", chat)
    return sorted(p for p in out.rglob("*") if p.is_file())


def check(out: Path) -> list[str]:
    """Relative paths of files in ``out`` that differ from a fresh build (or are missing)."""
    return asset_script.check(build, out)


def main() -> None:
    asset_script.main(build, DEFAULT_OUT, __doc__, "make_lvlm_assets.py")


if __name__ == "__main__":
    main()
