"""Image-caption rows for LVLM (pre-)training: read, validate, tokenise, collate into a :class:`TextBatch`.

Rows (``.jsonl`` / ``.json`` / ``.parquet`` / saved HF datasets, read by :func:`mmalign.data.rows.load_rows`):

- ``{"image": "imgs/0001.png", "caption": "a red circle ...", "prompt": "..."}`` (``prompt`` optional, default
  ``default_prompt``). ``image`` is a path (relative paths resolve against ``image_root``, else the data
  file's folder), a PIL image, or ``{"bytes": ..., "path": ...}`` (HF ``Image`` features).
- LLaVA's pre-training format (LCS-558K ``blip_laion_cc_sbu_558k.json``): ``{"image": ..., "conversations":
  [{"from": "human", "value": "...<image>"}, {"from": "gpt", "value": CAPTION}]}``; the caption is the last
  ``gpt`` turn; the human turn is dropped, as LLaVA's "plain" pre-training template does.

Every example is tokenised once, with :class:`~mmalign.data.text.TextEncoder` on an SFT row (prompt →
``[BOS] prompt``, caption → caption tokens + EOS), exactly as the text recipe tokenises the same caption when it
trains PRIOR's text-only reference, so the reference's per-token probabilities line up with the LVLM's caption
tokens (research/video_audio_clip_prior.md §3.3). The LVLM's prompt gets ``num_image_tokens`` ``<image>``
placeholders right after BOS (LLaVA's "plain" pre-training layout: image, then text). ``data.max_length``
budgets the text tokens; the image placeholders come on top.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .batches import TextBatch
from .image import to_rgb
from .rows import SKIP_HINT, DataError, RowProblem, SFTRow, load_rows, short_repr
from .text import EncodedExample, TextEncoder, collate


@dataclass
class CaptionExample:
    """One caption: the reference's prompt ids, the scored caption ids, where its image comes from."""

    text_prompt_ids: list[int]  # [BOS] + prompt: what the text-only reference reads before the caption
    completion_ids: list[int]  # caption tokens + EOS: scored by both the LVLM and the reference
    image: Any  # a Path, a PIL image or raw bytes
    caption: str
    prompt: str
    origin: tuple[str, int]
    meta: dict = field(default_factory=dict)

    @property
    def cache_key(self) -> str:
        """Caption text + prompt + token ids: a stable key for per-caption cached weights."""
        key = (self.prompt, self.caption, self.text_prompt_ids, self.completion_ids)
        return hashlib.sha256(repr(key).encode()).hexdigest()


def _bad(file: str, row: int, reason: str, fld: str, value: Any, message: str, fix: str) -> RowProblem:
    return RowProblem(file, row, reason, fld, value, message, fix)


def _resolve_image(value: Any, file: str, root: str | None, verify: bool) -> Any:
    """The image reference of a row (Path / PIL image / bytes), or a RowProblem-style (reason, message, fix)."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value["path"]
    if not isinstance(value, str) or not value.strip():
        return ("bad_type", "must be an image path, a PIL image or {'bytes'/'path'}",
                "give the image file path (relative to the data file's folder or prior.image_root)")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(root).expanduser() / path if root else Path(file).parent / path
    if not path.is_file():
        return ("missing_image", f"points to {str(path)!r}, which does not exist",
                "fix the path, or set prior.image_root to the folder relative image paths start from")
    if verify:
        try:
            with Image.open(path) as im:
                # A full decode, not ``im.verify()``: verify checks PNG chunk CRCs but nothing of a JPEG, so a
                # truncated JPEG passed and failed mid-training. ``draft`` lets a JPEG decode at 1/8 scale (it
                # still reads every byte, so truncation is found) to keep the check cheap.
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
        except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
            return ("bad_image", f"is not a readable image ({type(e).__name__}: {e})",
                    "replace the file with a valid PNG/JPEG or remove the row")
    return path


def caption_and_prompt(row: dict, caption_field: str, default_prompt: str) -> tuple[Any, Any, str]:
    """``(caption, prompt, field the caption came from)`` of a raw row (plain or LLaVA ``conversations``)."""
    if row.get(caption_field) is None and isinstance(row.get("conversations"), list):
        turns = [t for t in row["conversations"] if isinstance(t, dict)]
        answers = [t.get("value") for t in turns if t.get("from") in ("gpt", "assistant")]
        # LLaVA's "plain" pre-training template drops the human turn (a random "describe the image" line):
        # the caption follows the image directly, so the prompt is the configured default.
        return (answers[-1] if answers else None), default_prompt, "conversations"
    return row.get(caption_field), row.get("prompt", default_prompt), caption_field


def read_caption_rows(sources: str | Path | Sequence[str | Path], tokenizer, *, image_field: str = "image",
                      caption_field: str = "caption", default_prompt: str = "", image_root: str | None = None,
                      max_length: int | None = 512, limit: int | None = None, skip_bad_rows: bool = False,
                      verify_images: bool = True) -> tuple[list[CaptionExample], dict[str, int]]:
    """Load, validate and tokenise caption rows; returns the examples and flat stats for the logs.

    Raises:
        DataError: naming file, row, field, value and fix for each bad row (up to 10), unless
            ``skip_bad_rows`` (then they are counted as ``skipped/<reason>``).
    """
    skipped: Counter = Counter()
    rows = load_rows(sources, limit=limit, skip_bad_rows=skip_bad_rows, skipped=skipped)
    encoder = TextEncoder(tokenizer, max_length=max_length, skip_bad_rows=skip_bad_rows)
    examples, problems = [], []
    for file, row_no, row in rows:
        caption, prompt, cap_key = caption_and_prompt(row, caption_field, default_prompt)
        problem = None
        if not isinstance(caption, str) or not caption.strip():
            problem = _bad(file, row_no, "missing_field" if caption is None else "bad_caption", cap_key, caption,
                           "must be a non-empty caption string", f"give the row a {caption_field!r} string")
        elif not isinstance(prompt, str):
            problem = _bad(file, row_no, "bad_type", "prompt", prompt, "must be a string", "make 'prompt' text")
        elif row.get(image_field) is None:
            problem = _bad(file, row_no, "missing_field", image_field, None, "is missing",
                           f"add an {image_field!r} field with the image path")
        else:
            image = _resolve_image(row[image_field], file, image_root, verify_images)
            if isinstance(image, tuple):
                problem = _bad(file, row_no, image[0], image_field, row[image_field], image[1], image[2])
        if problem is not None:
            if skip_bad_rows:
                skipped[problem.reason] += 1
            else:
                problems.append(problem)
            continue
        try:
            enc = encoder.encode(SFTRow(prompt, caption, origin=(file, row_no)))
        except DataError as e:
            problems.extend(e.problems)
            continue
        if enc is None:
            continue  # dropped by the encoder and counted there (skip_bad_rows)
        meta = {k: v for k, v in row.items() if k not in (image_field, caption_field, "prompt", "conversations")}
        examples.append(CaptionExample(enc.prompt_ids, enc.completions[0], image, caption, prompt, (file, row_no),
                                       meta))
    if problems:
        raise DataError.from_problems(problems)
    skipped.update(encoder.dropped)
    if not examples:
        raise DataError(f"{sources}: no usable caption rows ({len(rows)} read, skipped: {dict(skipped)}); fix: rows "
                        f"need {image_field!r} and {caption_field!r} fields (or LLaVA 'conversations')")
    stats = {"rows_read": len(rows) + sum(v for k, v in skipped.items() if k in ("invalid_json", "not_an_object")),
             "rows_used": len(examples), "rows_skipped": sum(skipped.values())}
    stats.update({f"skipped/{k}": v for k, v in sorted(skipped.items())})
    stats.update({f"encode/{k}": v for k, v in encoder.stats.as_dict().items()})
    return examples, stats


def load_image(example: CaptionExample):
    """The example's image as RGB; a file that fails to decode raises DataError naming file and row."""
    from PIL import Image

    try:
        if isinstance(example.image, Image.Image):
            return to_rgb(example.image)
        src = io.BytesIO(example.image) if isinstance(example.image, bytes) else example.image
        with Image.open(src) as im:
            return to_rgb(im)
    except Exception as e:
        file, row = example.origin
        raise DataError(f"{file}:{row}: field 'image' ({short_repr(str(example.image))}) cannot be decoded "
                        f"({type(e).__name__}: {e}); fix: replace or remove the image, {SKIP_HINT}") from e


class CaptionDataset(Dataset):
    """Caption examples → LVLM batches; PRIOR weights are attached per example by the recipe.

    ``collate`` gives a :class:`TextBatch` with K=1 (the caption), ``extras["pixel_values"]`` and, once weights
    are attached, ``extras["prior_weights"]`` ``[B, 1, C]`` aligned with ``completion_ids``.
    """

    def __init__(self, examples: Sequence[CaptionExample], *, pad_token_id: int, image_token_id: int,
                 num_image_tokens: int, bos_token_id: int | None, pixel_values: Callable[[list], Tensor]):
        self.examples = list(examples)
        self.pad_token_id, self.bos_token_id = pad_token_id, bos_token_id
        self.image_tokens = [image_token_id] * num_image_tokens
        self.pixel_values = pixel_values
        self.weights: list[Tensor] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[int, CaptionExample, Tensor | None]:
        # The weights travel with the item: the loop collates eval items with the train dataset's collate.
        return index, self.examples[index], None if self.weights is None else self.weights[index]

    def attach_weights(self, weights: Sequence[Tensor] | None) -> None:
        if weights is not None and len(weights) != len(self.examples):
            raise ValueError(f"attach_weights: {len(weights)} weight rows for {len(self.examples)} examples")
        self.weights = None if weights is None else list(weights)

    def lvlm_prompt(self, ex: CaptionExample) -> list[int]:
        ids = ex.text_prompt_ids
        if self.bos_token_id is not None and ids and ids[0] == self.bos_token_id:
            return ids[:1] + self.image_tokens + ids[1:]
        return self.image_tokens + ids

    def collate(self, items: Sequence[tuple[int, CaptionExample, Tensor | None]]) -> TextBatch:
        """Items of this dataset or of another one built the same way (the loop collates eval items with it)."""
        encoded = [EncodedExample(self.lvlm_prompt(ex), [ex.completion_ids], [float("nan")],
                                  {**ex.meta, "data_file": ex.origin[0], "data_row": ex.origin[1], "data_index": i})
                   for i, ex, _ in items]
        batch = collate(encoded, pad_token_id=self.pad_token_id)
        batch.extras["pixel_values"] = self.pixel_values([load_image(ex) for _, ex, _ in items])
        weights = [w for _, _, w in items]
        if any(w is not None for w in weights):
            if any(w is None for w in weights):
                raise ValueError("collate: some items carry PRIOR weights and some do not; attach weights to every "
                                 "dataset of the stage")
            w = torch.zeros(batch.completion_ids.shape, dtype=torch.float32)
            for row, wi in enumerate(weights):
                w[row, 0, : wi.numel()] = wi
            batch.extras["prior_weights"] = w
        return batch

    def text_batches(self, batch_size: int, indices: Sequence[int] | None = None) -> Iterator[tuple[list[int],
                                                                                                    TextBatch]]:
        """Text-only batches (``[BOS] prompt`` + caption, no image) for the PRIOR reference, with their indices."""
        order = list(range(len(self.examples))) if indices is None else list(indices)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = [EncodedExample(self.examples[i].text_prompt_ids, [self.examples[i].completion_ids],
                                  [float("nan")], {}) for i in idx]
            yield idx, collate(enc, pad_token_id=self.pad_token_id)

    def content_key(self) -> str:
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(ex.cache_key.encode())
            h.update(str(ex.image).encode() if isinstance(ex.image, Path) else b"<in-memory image>")
        return h.hexdigest()
