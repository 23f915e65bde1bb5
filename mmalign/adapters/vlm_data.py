"""VLM examples → model inputs: the model's own processor renders and tokenises each example once; its media are
re-processed per batch (so float pixels are never held for a whole dataset).

Per example (:func:`encode_examples`):

- **prompt**: ``processor.apply_chat_template(prompt, add_generation_prompt=True)`` then ``processor(text, images,
  videos)``, which expands each image / video part to one placeholder per visual feature (Qwen's
  ``<|image_pad|>``, LLaVA's ``<image>``). Qwen2.5-VL videos carry their sampled fps (``video_metadata``) so the
  processor sets ``second_per_grid_ts`` (M-RoPE's temporal spacing).
- **completion**: the chat template of ``prompt + [assistant: completion]`` minus the rendered prompt (so it
  carries the template's end-of-turn, Qwen's ``<|im_end|>\\n``); where the template renders the assistant turn
  differently from its generation prompt (LLaVA-OneVision's ``assistant \\n`` vs ``assistant\\n``) the
  completion is its text + EOS, counted as ``template_mismatches``.
- **length**: the prompt (visual tokens included) must leave room under ``data.max_length``; a longer prompt is
  a bad row (:class:`~mmalign.data.rows.DataError`, or a skip counted as ``skipped/prompt_too_long`` with
  ``data.skip_bad_rows``), since cutting it would cut visual tokens. Completions are cut to fit and counted as
  ``completions_truncated`` (logged with the stage's data stats), never silently.

Labels follow :mod:`mmalign.data.records`: pairs ``[0, 1]``, ranked lists their ranks, unpaired 1/0, SFT NaN.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from ..data.row_files import DataError, RowProblem
from ..data.text import EncodedExample, collate
from ..models.vlm import QWEN, VLMInputs
from .vlm import VLMBatch

__all__ = ["VLMDataset", "VLMEncoded", "encode_examples", "processor_call"]

log = logging.getLogger(__name__)
_TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class VLMEncoded:
    """One tokenised example: prompt ids (placeholders expanded), K completions, labels, the source example."""

    prompt_ids: list[int]
    completions: list[list[int]]
    labels: list[float]
    prompt_text: str
    example: Any  # the VLMExample (its decoded media)
    meta: dict = field(default_factory=dict)


def _labels(ex) -> list[float]:
    kind = ex.kind or ("unpaired" if ex.label is not None else "pairs" if len(ex.candidates) == 2 else "sft")
    if kind == "unpaired":
        return [1.0 if ex.label else 0.0]
    if kind == "sft":
        return [float("nan")] * len(ex.candidates)
    return [float(i) for i in range(len(ex.candidates))]


def processor_call(inputs: VLMInputs, text: str, ex) -> dict[str, Any]:
    """``processor(text, images, videos)`` of one example as tensors (text keys included)."""
    kwargs: dict[str, Any] = {}
    if ex.images:
        kwargs["images"] = list(ex.images)
    if ex.videos:
        kwargs["videos"] = list(ex.videos)
        if inputs.arch in QWEN:
            kwargs["video_metadata"] = [{"total_num_frames": len(v), "fps": float(f)}
                                        for v, f in zip(ex.videos, ex.video_fps, strict=True)]
    bos = getattr(inputs.tokenizer, "bos_token", None)
    out = inputs.processor(text=[text], return_tensors="pt",
                           add_special_tokens=not (bos and text.startswith(bos)), **kwargs)
    return dict(out)


def media_of(inputs: VLMInputs, enc: VLMEncoded) -> dict[str, torch.Tensor]:
    """The example's processed media (checked against the prompt ids tokenised when the data was read)."""
    out = processor_call(inputs, enc.prompt_text, enc.example)
    if out["input_ids"][0].tolist() != enc.prompt_ids:
        raise RuntimeError(f"{enc.meta.get('source')}:{enc.meta.get('row')}: the processor gave other prompt ids "
                           "than when the data was read (a processor setting changed between them)")
    return {k: torch.as_tensor(v) for k, v in out.items() if k not in _TEXT_KEYS and v is not None}


def _completion_text(inputs: VLMInputs, messages: list, prompt_text: str, completion: str,
                     counts: Counter) -> str:
    turn = {"role": "assistant", "content": [{"type": "text", "text": completion}]}
    full = inputs.processor.apply_chat_template([*messages, turn], tokenize=False)
    if full.startswith(prompt_text) and len(full) > len(prompt_text):
        return full[len(prompt_text):]
    counts["template_mismatches"] += 1
    return completion + (inputs.tokenizer.eos_token or "")


def encode_examples(inputs: VLMInputs, examples: Sequence, *, max_length: int, skip_bad_rows: bool = False
                    ) -> tuple[list[VLMEncoded], dict[str, int]]:
    """Tokenise ``examples`` (:class:`~mmalign.data.vlm_rows.VLMExample`) with the model's processor; returns the
    encoded examples and counters (``completions_truncated``, ``rows_truncated``, ``template_mismatches``,
    ``skipped/prompt_too_long``)."""
    counts: Counter = Counter()
    out, problems = [], []
    tok = inputs.tokenizer
    for ex in examples:
        messages = list(ex.prompt)
        prompt_text = inputs.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = processor_call(inputs, prompt_text, ex)["input_ids"][0].tolist()
        room = max_length - len(prompt_ids)
        if room < 1:
            if skip_bad_rows:
                counts["skipped/prompt_too_long"] += 1
                continue
            problems.append(RowProblem(
                ex.source, ex.row, "prompt_too_long", "prompt", f"{len(prompt_ids)} tokens",
                f"(media tokens included) leaves no room for a completion under data.max_length={max_length}",
                "raise data.max_length, or lower vlm.max_pixels / vlm.max_frames / vlm.fps (fewer visual tokens)"))
            continue
        completions, cut = [], False
        for c in ex.candidates:
            ids = tok(_completion_text(inputs, messages, prompt_text, c, counts), add_special_tokens=False)["input_ids"]
            if len(ids) > room:
                ids, cut = ids[:room], True
                counts["completions_truncated"] += 1
            completions.append(list(ids))
        counts["rows_truncated"] += int(cut)
        out.append(VLMEncoded(prompt_ids, completions, _labels(ex), prompt_text, ex,
                              {"source": ex.source, "row": ex.row, **{k: v for k, v in ex.meta.items()
                                                                      if isinstance(v, (int, float, str))}}))
    if problems:
        raise DataError.from_problems(problems)
    if counts["completions_truncated"]:
        log.warning("VLM data: %d completion(s) in %d row(s) cut to fit data.max_length=%d (counted as "
                    "completions_truncated)", counts["completions_truncated"], counts["rows_truncated"], max_length)
    stats = {k: int(counts[k]) for k in ("completions_truncated", "rows_truncated", "template_mismatches")}
    stats.update({k: int(v) for k, v in counts.items() if k.startswith("skipped/")})
    return out, stats


class VLMDataset(Dataset):
    """Encoded VLM examples; ``collate`` (a bound method) gives a :class:`~mmalign.adapters.vlm.VLMBatch` whose
    media are processed for that batch only."""

    def __init__(self, encoded: Sequence[VLMEncoded], inputs: VLMInputs, *, format: str):
        self.encoded, self.inputs, self.format = list(encoded), inputs, format
        tok = inputs.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> tuple[int, VLMEncoded]:
        return index, self.encoded[index]

    def collate(self, items: Sequence[tuple[int, VLMEncoded]]) -> VLMBatch:
        t = collate([EncodedExample(e.prompt_ids, e.completions, e.labels, {**e.meta, "data_index": i})
                     for i, e in items], pad_token_id=self.pad_token_id)
        media = [media_of(self.inputs, e) for _, e in items]
        return VLMBatch(t.prompt_ids, t.prompt_mask, t.completion_ids, t.completion_mask, media, t.candidate_mask,
                        t.labels, t.meta, t.extras)

    def content_key(self) -> str:
        """Tokens, labels and media bytes of every example (keys the reference-score cache)."""
        h = hashlib.sha256()
        for e in self.encoded:
            h.update(repr((e.prompt_ids, e.completions, e.labels)).encode())
            for im in e.example.images:
                h.update(hashlib.sha256(im.convert("RGB").tobytes()).digest())
            for v in e.example.videos:
                h.update(hashlib.sha256(v.tobytes()).digest())
        return h.hexdigest()
