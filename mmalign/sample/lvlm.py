"""Answers of a PRIOR-family LVLM (arXiv 2505.08971; :mod:`mmalign.models.lvlm`: LLaVA-hf or the encoder-free
PatchLVLM) for images, and the pages that show them beside a reference's (``mmalign sample prior``).

Prompts are tokenised as the LVLM family tokenises training prompts (:mod:`mmalign.data.vision_rows`: plain
text with special tokens, the one ``<image>`` marker expanded to ``num_image_tokens`` placeholders, or the
placeholders right after BOS when the prompt has no marker), so a model answers in the layout it was trained on.

Generation is one batched, left-padded, KV-cached loop over the model's own ``forward`` for both kinds:
:class:`~mmalign.models.lvlm.PatchLVLM` is a plain ``nn.Module`` without ``generate``, and running LLaVA through
the same loop gives both the same decoding rule. The first step fills the cache from the prompt and the image
(LLaVA's ``masked_scatter`` of image features / PatchLVLM's patch embedding); each later step feeds one token.
Position ids are ``cumsum(mask) - 1`` so a left-padded row sees the positions it would see alone. ``temperature``
0 is greedy; > 0 samples from ``softmax(logits / T)`` with one ``torch.Generator`` per example seeded ``seed + i``
(example ``i`` of the list), so the answer of an example does not depend on the batch it lands in, and a model
and its reference see the same random numbers. No top-k / top-p and no chat template (unverified for real
LLaVA-hf checkpoints, which expect ``USER: <image>\\n... ASSISTANT:``: write that into ``--prompt``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapters.candidate_states import cache_kwarg, cache_of
from ..data.vision_rows import IMAGE_MARKER, _expand
from ..models.lvlm import LVLMInputs, PatchLVLM, unwrap_lvlm

__all__ = ["LVLMSamples", "encode_prompt", "generate_lvlm", "image_grid", "write_report"]


@dataclass
class LVLMSamples:
    prompt_ids: list[list[int]]  # with the image placeholders
    completion_ids: list[list[int]]  # new tokens, up to and including EOS
    texts: list[str]
    scores: list[Tensor] | None = None  # with keep_scores: [len(completion), V] float logits per example


def encode_prompt(inputs: LVLMInputs, prompt: str) -> list[int]:
    """Token ids of ``prompt`` with ``num_image_tokens`` image placeholders, as the family encodes training rows."""
    if prompt.count(IMAGE_MARKER) > 1:
        raise ValueError(f"prompt {prompt!r} holds {prompt.count(IMAGE_MARKER)} {IMAGE_MARKER} markers; one image "
                         "per prompt is supported: keep one marker (or none: the image then follows BOS)")
    ids = list(inputs.tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return _expand(ids, inputs.image_token_id, inputs.tokenizer.bos_token_id, inputs.num_image_tokens)[0]


def _left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def _next_token(logits: Tensor, temperature: float, generators: Sequence[torch.Generator],
                suppress: int | None = None) -> Tensor:
    """``[B, V]`` last-position logits → ``[B]`` tokens: argmax, or one draw per row from its own generator;
    token ``suppress`` (the image placeholder) is never chosen."""
    if suppress is not None:
        logits = logits.clone()
        logits[:, suppress] = float("-inf")
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)])


@torch.no_grad()
def decode(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, *,
           max_new_tokens: int, eos_token_id: int | None, pad_token_id: int, temperature: float = 0.0,
           generators: Sequence[torch.Generator] = (), image_token_id: int | None = None,
           scores: list[Tensor] | None = None) -> Tensor:
    """``[B, N]`` new tokens (``pad_token_id`` after a row's EOS) for left-padded prompts, with the KV cache.

    ``image_token_id`` is never generated: a placeholder fed back without pixels is an error in both models
    (and meaningless as text), which a barely trained model's sampling does hit. ``scores``: a list that receives
    each step's ``[B, V]`` logits (as HF's ``output_scores``, before the placeholder is masked)."""
    device = input_ids.device
    mask = attention_mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask, position_ids=pos,
                use_cache=True)
    # transformers 5.x names the cache ``cache`` (``past_key_values`` warns on every call); a PatchLVLM passes
    # the keyword through to its LM
    name = cache_kwarg(model.language_model if isinstance(model, PatchLVLM) else model)
    past, logits = cache_of(out), out.logits[:, -1]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    new = []
    for step in range(max_new_tokens):
        if scores is not None:
            scores.append(logits.float())
        tok = _next_token(logits, temperature, generators, image_token_id).to(device)
        tok = tok.masked_fill(done, pad_token_id)
        new.append(tok)
        if eos_token_id is not None:
            done |= tok == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, -1:] + step + 1,
                    use_cache=True, **{name: past})
        past, logits = cache_of(out), out.logits[:, -1]
    return torch.stack(new, 1) if new else input_ids.new_zeros((input_ids.shape[0], 0))


@torch.no_grad()
def generate_lvlm(model: nn.Module, inputs: LVLMInputs, images: Sequence, prompts: Sequence[str], *,
                  max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                  batch_size: int = 8, keep_scores: bool = False) -> LVLMSamples:
    """One answer per (PIL image, prompt) pair; batches of ``batch_size``, example ``i`` seeded ``seed + i``;
    ``keep_scores``: also each generated token's logits (on the CPU)."""
    if len(images) != len(prompts):
        raise ValueError(f"generate_lvlm: {len(images)} images but {len(prompts)} prompts")
    net = unwrap_lvlm(model)
    was_training = net.training
    net.eval()
    param = next(net.parameters())
    tok = inputs.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompt_ids = [encode_prompt(inputs, p) for p in prompts]
    completion_ids: list[list[int]] = []
    kept: list[Tensor] = []
    for start in range(0, len(prompts), batch_size):
        rows = prompt_ids[start:start + batch_size]
        ids, mask = _left_pad(rows, pad_id)
        pixels = inputs.pixel_values(list(images[start:start + batch_size])).to(param.device, param.dtype)
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(rows))]
        steps: list[Tensor] = []
        new = decode(net, ids.to(param.device), mask.to(param.device), pixels, max_new_tokens=max_new_tokens,
                     eos_token_id=tok.eos_token_id, pad_token_id=pad_id, temperature=temperature, generators=gens,
                     image_token_id=inputs.image_token_id, scores=steps if keep_scores else None)
        for i, row in enumerate(new.tolist()):
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id) + 1]
            completion_ids.append(row)
            if keep_scores:
                kept.append(torch.stack([s[i] for s in steps[:len(row)]]).cpu())
    net.train(was_training)
    texts = [tok.decode(c, skip_special_tokens=True).strip() for c in completion_ids]
    return LVLMSamples(prompt_ids, completion_ids, texts, kept if keep_scores else None)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        while len(word) > width:  # a long token without spaces is cut, not allowed to run off the tile
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:width])
            word = word[width:]
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


def image_grid(images: Sequence, captions: Sequence[Sequence[str]], path: str | Path, *, size: int = 128,
               columns: int = 4, text_lines: int = 8) -> Path:
    """A PNG grid: each image scaled to ``size`` px with its caption lines (e.g. ``model: ...``) under it."""
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("image_grid: no images")
    line_h, width = 11, max(8, size // 6)  # PIL's default bitmap font: ~6 px per character, 11 px per line
    blocks = [[w for c in caps for w in _wrap(c, width)][:text_lines] for caps in captions]
    tile_h = size + 4 + line_h * max(1, max(len(b) for b in blocks))
    cols = min(columns, len(images))
    nrows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * (size + 6), nrows * (tile_h + 6)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, block) in enumerate(zip(images, blocks, strict=True)):
        x, y = (i % cols) * (size + 6), (i // cols) * (tile_h + 6)
        grid.paste(im.convert("RGB").resize((size, size), resample=0), (x, y))  # nearest: tiny images stay crisp
        for j, line in enumerate(block):
            draw.text((x, y + size + 4 + j * line_h), line, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def write_report(out_dir: str | Path, items: Sequence[dict], columns: dict[str, list[str]],
                 images: Sequence) -> dict[str, Path]:
    """``samples.md`` (grid, then one table row per image: image path, prompt, one column per model),
    ``samples.json`` and ``grid.png`` under ``out_dir``. ``items``: ``{"image": path, "prompt": str}`` each."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"index": i, **item, **{name: answers[i] for name, answers in columns.items()}}
            for i, item in enumerate(items)]
    (out / "samples.json").write_text(json.dumps(rows, indent=1))
    grid = image_grid(images, [[f"{n}: {r[n]}" for n in columns] for r in rows], out / "grid.png")

    def cell(text: str) -> str:  # a table cell: no newlines, no column breaks
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["![samples](grid.png)", "", "| # | image | prompt | " + " | ".join(columns) + " |",
             "|---" * (3 + len(columns)) + "|"]
    lines += [f"| {r['index']} | {cell(r['image'])} | {cell(r['prompt'])} | "
              + " | ".join(cell(r[n]) for n in columns) + " |" for r in rows]
    (out / "samples.md").write_text("\n".join(lines) + "\n")
    return {"markdown": out / "samples.md", "json": out / "samples.json", "grid": grid}
