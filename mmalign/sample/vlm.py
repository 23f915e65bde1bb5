"""Answers of a vision-language model (:mod:`mmalign.models.vlm`) for images and videos, and the pages that show
them: a markdown table beside a reference model's answers, the same as JSON, and one PNG strip of the frames each
answer saw (``mmalign sample vlm``).

Generation is the model's own ``generate`` on the processor's inputs for the chat prompt (so Qwen's M-RoPE index
and LLaVA's anyres packing are the model's); greedy at ``temperature`` 0, else sampling with a fixed seed per
example, so two models see the same randomness.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..adapters.vlm_data import processor_call
from ..models.vlm import QWEN, VLMInputs

__all__ = ["frame_strip", "generate_answers", "write_report"]


@torch.no_grad()
def generate_answers(model: nn.Module, inputs: VLMInputs, examples: Sequence, *, max_new_tokens: int = 64,
                     temperature: float = 0.0, seed: int = 0) -> list[str]:
    """One answer per :class:`~mmalign.data.vlm_rows.VLMExample` (its prompt and media; candidates unused)."""
    model.eval()
    device = next(model.parameters()).device
    tok = inputs.tokenizer
    answers = []
    for i, ex in enumerate(examples):
        text = inputs.processor.apply_chat_template(list(ex.prompt), add_generation_prompt=True, tokenize=False)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in processor_call(inputs, text, ex).items()}
        if inputs.arch not in QWEN:
            batch.pop("mm_token_type_ids", None)
        torch.manual_seed(seed + i)
        kwargs = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kwargs)
        answers.append(tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def frame_strip(frames: Sequence[np.ndarray], path: str | Path, *, height: int = 96, max_frames: int = 8) -> Path:
    """A PNG of up to ``max_frames`` evenly spaced frames (uint8 ``[H, W, 3]`` each) side by side, each scaled to
    ``height`` px."""
    from PIL import Image

    if not len(frames):
        raise ValueError("frame_strip: no frames")
    idx = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    tiles = []
    for k in idx:
        im = Image.fromarray(np.asarray(frames[k], dtype=np.uint8)).convert("RGB")
        tiles.append(im.resize((max(1, round(im.width * height / im.height)), height)))
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 2 * (len(tiles) - 1), height), "white")
    x = 0
    for t in tiles:
        strip.paste(t, (x, 0))
        x += t.width + 2
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path


def _question(ex) -> str:
    parts = []
    for m in ex.prompt:
        content = m["content"]
        if isinstance(content, str):
            parts.append(content)
            continue
        parts += [c.get("text", "") if c.get("type") == "text" else f"<{c.get('type')}>" for c in content]
    return " ".join(p for p in parts if p).strip()


def write_report(out_dir: str | Path, examples: Sequence, columns: dict[str, list[str]]) -> dict[str, Path]:
    """``samples.md`` (one row per example: frames, question, one column per model), ``samples.json`` and
    ``frames/NNN.png`` under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, strips = [], []
    for i, ex in enumerate(examples):
        frames = [np.asarray(im.convert("RGB")) for im in ex.images] + [f for v in ex.videos for f in v]
        strip = frame_strip(frames, out / "frames" / f"{i:03d}.png") if frames else None
        strips.append(strip)
        rows.append({"index": i, "source": ex.source, "row": ex.row, "question": _question(ex),
                     "images": list(ex.image_paths), "videos": list(ex.video_paths),
                     "frames": None if strip is None else str(strip.relative_to(out)),
                     **{name: answers[i] for name, answers in columns.items()}})
    (out / "samples.json").write_text(json.dumps(rows, indent=1))

    def cell(text: str) -> str:  # a table cell: no newlines, no column breaks
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| # | frames | question | " + " | ".join(columns) + " |", "|---" * (3 + len(columns)) + "|"]
    for r in rows:
        img = f"![{r['index']}]({r['frames']})" if r["frames"] else "—"
        lines.append(f"| {r['index']} | {img} | {cell(r['question'])} | "
                     + " | ".join(cell(r[name]) for name in columns) + " |")
    (out / "samples.md").write_text("\n".join(lines) + "\n")
    return {"markdown": out / "samples.md", "json": out / "samples.json", "frames": out / "frames"}
