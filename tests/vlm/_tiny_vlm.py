"""Shared pieces of the VLM family tests: a tiny size, tokenizers, in-memory examples and on-disk rows with media."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
from PIL import Image

from mmalign.data.vlm_rows import VLMExample
from mmalign.models.vlm import ARCHS, build_tiny_vlm, build_vlm_tokenizer

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
        "vision_hidden_size": 32, "vision_layers": 2, "vision_heads": 2, "image_size": 16, "patch_size": 4}
TEXTS = ["what happens in the video", "a red square moves left", "a blue dot moves right", "the cat sits down",
         "nothing happens", "which colour is the image", "red", "green", "describe the video in detail"] * 3
QUESTION = {"type": "text", "text": "what happens"}
IMAGE, VIDEO = {"type": "image"}, {"type": "video"}


@functools.cache
def _tokenizer(arch: str):
    return build_vlm_tokenizer(arch, TEXTS, vocab_size=320)


def tiny(arch: str, seed: int = 0):
    """A fresh tiny model of ``arch`` and its VLMInputs (the tokenizer copied, so tests cannot leak into it)."""
    return build_tiny_vlm(arch, copy.deepcopy(_tokenizer(arch)), seed=seed, **TINY)


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def examples(media: str = "both", seed: int = 0) -> list[VLMExample]:
    """Pairs with images (``image``), videos (``video``) or both kinds plus a text-only prompt (``both``); sizes and
    frame counts differ between examples, so prompts have several lengths (left padding is exercised)."""
    rng = np.random.default_rng(seed)

    def img(h, w):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    def vid(t, h, w):
        return rng.integers(0, 255, (t, h, w, 3), dtype=np.uint8)

    with_images = [VLMExample(_user(IMAGE, QUESTION), ["a red square", "a blue dot moves right"], images=[img(16, 16)],
                              kind="pairs"),
                   VLMExample(_user(IMAGE, IMAGE, QUESTION), ["red", "green and red"],
                              images=[img(24, 32), img(16, 16)], kind="pairs")]
    with_videos = [VLMExample(_user(VIDEO, QUESTION), ["the cat sits down", "nothing"], videos=[vid(4, 16, 16)],
                              video_fps=[1.0], kind="pairs"),
                   VLMExample(_user(VIDEO, QUESTION), ["a blue dot", "a red square moves left"],
                              videos=[vid(6, 16, 24)], video_fps=[2.0], kind="pairs")]
    if media == "image":
        return with_images
    if media == "video":
        return with_videos
    both = VLMExample(_user(IMAGE, VIDEO, {"type": "text", "text": "both?"}), ["red", "nothing happens"],
                      images=[img(16, 24)], videos=[vid(2, 16, 16)], video_fps=[1.0], kind="pairs")
    text_only = VLMExample(_user(QUESTION), ["nothing happens", "the cat"], kind="pairs")
    return [*with_images, *with_videos, both, text_only]


def write_rows(d: Path, kind: str = "pairs", n: int = 6) -> Path:
    """``d/<kind>.jsonl``: TRL rows (``prompt`` with content parts, ``images`` / ``videos`` paths) over PNGs and
    MP4s written to ``d``; the chosen answer names the colour of the medium. ``kind``: pairs | unpaired | sft."""
    from mmalign.data.synthetic_video import write_moving_shape_video

    colours = {"red": (200, 20, 20), "green": (20, 200, 20)}
    rows = []
    for i in range(n):
        name, other = ("red", "green") if i % 2 == 0 else ("green", "red")
        if i % 3 == 2:  # every third row is a video
            path = d / f"v{i}.mp4"
            if not path.exists():
                write_moving_shape_video(path, 4, 16, seed=i, fps=4)
            media, part = {"videos": [path.name]}, VIDEO
        else:
            path = d / f"{name}{i}.png"
            Image.new("RGB", (16, 16), colours[name]).save(path)
            media, part = {"images": [path.name]}, IMAGE
        prompt = _user(part, {"type": "text", "text": "which colour is the image"})
        if kind == "pairs":
            row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": name}],
                   "rejected": [{"role": "assistant", "content": other}]}
        elif kind == "unpaired":
            row = {"prompt": prompt, "completion": [{"role": "assistant", "content": name if i % 4 < 2 else other}],
                   "label": i % 4 < 2}
        else:
            row = {"prompt": prompt, "completion": [{"role": "assistant", "content": name}]}
        rows.append({**row, **media})
    out = d / f"{kind}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


__all__ = ["ARCHS", "IMAGE", "QUESTION", "TINY", "VIDEO", "examples", "tiny", "write_rows"]
