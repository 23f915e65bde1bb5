"""``mmalign demo temple``: TEMPLE (Li et al., arXiv 2503.16929) end to end on a tiny video LLM, on pixels.

1. **Videos** (:func:`mmalign.data.synthetic_video.moving_shape_video`): a coloured shape makes three straight
   moves ("the red square moves left, then up, then right"), so a correct description, and the answer to "what did
   the shape do first / last / after moving X?", depends on the order of the frames.
2. **Base** (``before``): a random tiny Qwen2-VL (the real class; vision tower trained too) SFT-trained through
   ``mmalign.train`` to describe the videos and answer the order questions, for a budget that leaves it imperfect.
3. **Pairs** (:mod:`mmalign.methods.temple_pixels`): the base model describes each training video clean (chosen)
   and with its frame list dropped / shuffled / reversed at magnitudes 16, 8, 4, 2 (rejected); the released code's
   filters apply; one pair file per magnitude.
4. **Arms**, all from the base, each one run of ``mmalign.train`` with stages (``configs/vlm/tiny_temple.yaml``'s
   layout: LoRA, merged and re-anchored at every stage boundary), with the same DPO steps and the same final SFT:
   ``temple`` = DPO curriculum r16 → r8 → r4 → r2 then SFT ("Pre-SFT alignment", the paper's order);
   ``mix`` = the same DPO steps on all magnitudes shuffled together then SFT (no curriculum);
   ``post_sft`` = SFT first, then the DPO curriculum (the opposite order); ``sft_only`` = the SFT stage alone (the
   control: is DPO worth anything beyond the extra SFT steps?).
5. **Metric**: accuracy of the order answers (the first direction word of a greedy answer) on held-out videos;
   ``before`` = base, ``after`` = ``temple``; the other arms and the caption order accuracy are in the report.

Toy-scale reading: the pairs come from the model itself, so their quality is bounded by the base's; whether
TEMPLE helps here is measured, not assumed (the README quotes the measured table, including a null result).
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import numpy as np

from .seeds import SeedSpec

SEEDS = SeedSpec(
    fast={"n_train": 24, "n_eval": 16, "base_steps": 40, "dpo_steps": 2, "sft_steps": 4, "max_new_tokens": 12},
    metrics={"mix": "arms.mix.qa", "post_sft": "arms.post_sft.qa", "sft_only": "arms.sft_only.qa",
             "temple_minus_sft_only": "temple_minus_sft_only", "caption_before": "caption_order.base",
             "caption_after": "caption_order.temple"})

DESCRIBE = "Describe what happens in the video, in the order it happens."
QUESTIONS = {"first": "What did the shape do first?", "last": "What did the shape do last?"}
AFTER = "What did the shape do after moving {}?"
DIRS = ("left", "right", "up", "down")
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128,
        "vision_hidden_size": 32, "vision_layers": 1, "vision_heads": 2, "image_size": 16, "patch_size": 4}
FRAMES, SIZE, MOVES, SHAPE = 16, 24, 2, 12


def _videos(folder: Path, seeds: list[int]) -> list[tuple[Path, object]]:
    from ..data.synthetic_video import moving_shape_video, write_video

    out = []
    for s in seeds:
        v = moving_shape_video(FRAMES, SIZE, seed=s, n_segments=MOVES, shape="square", shape_size=SHAPE)
        path = folder / f"v{s}.mp4"
        if not path.is_file():
            write_video(path, v.frames, fps=8)
        out.append((path, v))
    return out


def _questions(v) -> list[tuple[str, str]]:
    """(question, answer direction) pairs of one video: first, last, and after each move but the last."""
    d = v.directions
    qs = [(QUESTIONS["first"], d[0]), (QUESTIONS["last"], d[-1])]
    return qs + [(AFTER.format(d[k]), d[k + 1]) for k in range(len(d) - 1)]


def _row(path: Path, question: str, answer: str) -> dict:
    return {"prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}],
            "completion": [{"role": "assistant", "content": answer}], "videos": [str(path)]}


def _sft_rows(videos) -> list[dict]:
    rows = []
    for path, v in videos:
        rows.append(_row(path, DESCRIBE, v.caption))
        rows += [_row(path, q, f"it moves {a}") for q, a in _questions(v)]
    return rows


def _write(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _base_args(seed: int) -> list[str]:
    return ["modality=vlm", "model.name_or_path=tiny", f"model.tiny={json.dumps(TINY)}", "vlm.arch=qwen2_vl",
            "vlm.fps=null", f"vlm.max_frames={FRAMES}", "data.max_length=256", f"run.seed={seed}",
            "run.save_every=0"]


def _train(out: Path, name: str, args: list[str], stages: list[dict] | None = None) -> Path:
    """Train (or reuse a finished run with identical settings) and return ``out/name/final``."""
    from ..api import train

    run_dir = out / name
    args = [f"run.output_dir={run_dir}", "run.resume=never", "run.report_to=[jsonl]", "run.progress=false",
            "run.overwrite=true", *args]
    key = json.dumps({"args": args, "stages": stages}, sort_keys=True)
    marker = run_dir / "demo_args.json"
    if marker.is_file() and marker.read_text() == key and (run_dir / "final" / "config.json").is_file():
        return run_dir / "final"
    train(None, args, **({"stages": stages} if stages else {}))
    marker.write_text(key)
    return run_dir / "final"


def _first_direction(text: str) -> str | None:
    m = re.search(r"\b(" + "|".join(DIRS) + r")\b", text.lower())
    return m.group(1) if m else None


def _directions(text: str) -> list[str]:
    return re.findall(r"\b(" + "|".join(DIRS) + r")\b", text.lower())


def _evaluate(model_dir: Path, videos, frames: list[np.ndarray], *, max_new_tokens: int) -> dict:
    """QA accuracy (first direction word of the greedy answer = the truth) and caption order accuracy (the
    direction words of the greedy description = the true sequence) on ``videos``."""
    from ..methods.temple_pixels import batched_generate
    from ..models.vlm import load_vlm

    model, inputs = load_vlm(model_dir)
    qs = [(i, q, a) for i, (_, v) in enumerate(videos) for q, a in _questions(v)]
    answers = batched_generate(model, inputs, [frames[i] for i, _, _ in qs], [8.0] * len(qs),
                               [q for _, q, _ in qs], max_new_tokens=max_new_tokens, batch_size=32)
    captions = batched_generate(model, inputs, frames, [8.0] * len(frames), [DESCRIBE] * len(frames),
                                max_new_tokens=max_new_tokens + 8, batch_size=32)
    qa = sum(_first_direction(t) == a for t, (_, _, a) in zip(answers, qs, strict=True)) / len(qs)
    cap = sum(_directions(c) == list(v.directions) for c, (_, v) in zip(captions, videos, strict=True)) / len(videos)
    return {"qa": round(qa, 4), "caption_order": round(cap, 4), "examples": [
        {"question": q, "truth": a, "answer": t} for (_, q, a), t in list(zip(qs, answers, strict=True))[:6]]}
