"""Vision preference rows (TRL's format) → tokenised examples → :class:`~mmalign.data.batches.VisionTextBatch`.

Rows (``.jsonl`` / ``.json`` / ``.parquet`` / saved HF datasets, read by :func:`mmalign.data.rows.load_rows`):

- pairs: ``{"images": ["img/0.png"], "prompt": ..., "chosen": ..., "rejected": ...}`` (TRL's vision DPO rows);
- unpaired: ``{"images": [...], "prompt": ..., "completion": ..., "label": true}`` (KTO / BCO);
- also ranked (``completions`` + ``ranking``) and sft (``completion``) rows, as in :mod:`mmalign.data.rows`.

``images`` holds exactly one image (``image``: a single one is read too): a path (relative paths resolve against
``image_root``, else the data file's folder), a PIL image, or ``{"bytes": ..., "path": ...}`` (HF ``Image``).
Text fields are strings or conversations (``[{"role": ..., "content": ...}]``) whose ``content`` is a string or
a list of parts ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` (TRL's conversational vision rows).

Where the image goes: an image part of the prompt, or an ``<image>`` marker in a string prompt, becomes the
``<image>`` token. Rows are validated and tokenised with string contents (image parts → the marker); the chat
template then sees TRL's content parts (``{"type": "image"}`` where the marker was) when it renders them (LLaVA-hf
and other multimodal templates iterate over parts), and the strings otherwise (text-only templates, such as the
tiny tokenizer's, would break on lists). A prompt without a marker gets the image right after BOS (LLaVA's
"plain" layout). The one marker
token is then expanded to ``num_image_tokens`` placeholders, one per image feature. ``data.max_length``
budgets the text tokens (the marker counts as one); the placeholders come on top and are never truncated, so
image features and placeholders always match (TRL's "Image features and image tokens do not match").

Everything else (format detection, labels, truncation, chat templates, EOS) is the text path's
(:func:`~mmalign.data.rows.parse_rows`, :class:`~mmalign.data.text.TextEncoder`), so a vision row tokenises as
its text-only twin would. Bad rows raise one :class:`~mmalign.data.rows.DataError` naming file, row and field
(``data.skip_bad_rows`` counts them instead).
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from .batches import VisionTextBatch
from .captions import _resolve_image
from .image import to_rgb
from .rows import SKIP_HINT, DataError, RowProblem, load_rows, parse_rows, short_repr
from .text import EncodedExample, TextEncoder, collate

IMAGE_MARKER = "<image>"
IMAGE_KEYS = ("images", "image")
_TEXT_KEYS = ("prompt", "chosen", "rejected", "completion", "completions")


@dataclass
class VisionExample:
    """One tokenised row: prompt ids (with the image placeholders), K completions, labels, and its image."""

    encoded: EncodedExample
    image: Any  # a Path, a PIL image or raw bytes
    origin: tuple[str, int]


class _Bad(Exception):
    def __init__(self, reason: str, field: str, value: Any, message: str, fix: str):
        super().__init__(message)
        self.details = (reason, field, value, message, fix)


def _image_of(row: dict) -> tuple[str, Any]:
    key = next((k for k in IMAGE_KEYS if row.get(k) is not None), None)
    if key is None:
        raise _Bad("missing_field", "images", None, "is missing",
                   "add 'images': [path] (one image per row; paths relative to the data file's folder)")
    value = row[key]
    if key == "images":
        if not isinstance(value, list) or not value:
            raise _Bad("bad_type", key, value, "must be a list holding one image",
                       "write 'images': [path] (a path, a PIL image or {'bytes'/'path'})")
        if len(value) > 1:
            raise _Bad("too_many_images", key, value, f"holds {len(value)} images; one image per row is supported",
                       "keep one image per row (multi-image rows are not supported yet)")
        value = value[0]
    return key, value


def _flatten(value: Any, key: str) -> tuple[Any, int]:
    """A text field with its image parts rendered as the marker; returns (value, number of image markers)."""
    if isinstance(value, str):
        return value, value.count(IMAGE_MARKER)
    if not isinstance(value, list):
        return value, 0  # parse_rows reports the type error
    out, images = [], 0
    for i, msg in enumerate(value):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            out.append(msg)
            images += content.count(IMAGE_MARKER) if isinstance(content, str) else 0
            continue
        text = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                text.append(IMAGE_MARKER)
                images += 1
            elif kind == "text" and isinstance(part.get("text"), str):
                text.append(part["text"])
                images += part["text"].count(IMAGE_MARKER)
            else:
                raise _Bad("bad_type", f"{key}[{i}].content[{j}]", part, "must be {'type': 'text', 'text': str} "
                           "or {'type': 'image'}", "write content parts as TRL's conversational vision rows do")
        out.append({**msg, "content": "".join(text)})
    return out, images


def _normalise(row: dict, file: str, image_root: str | None, verify: bool) -> tuple[dict, Any]:
    """The row as a text-only row (image parts → marker, image keys dropped) and its resolved image."""
    key, value = _image_of(row)
    image = _resolve_image(value, file, image_root, verify)
    if isinstance(image, tuple):
        raise _Bad(image[0], key, value, image[1], image[2])
    text_row = {k: v for k, v in row.items() if k not in IMAGE_KEYS}
    for k in _TEXT_KEYS:
        if row.get(k) is None:
            continue
        if k == "completions" and isinstance(row[k], list):
            flat = [_flatten(c, f"{k}[{i}]") for i, c in enumerate(row[k])]
            text_row[k], markers = [f[0] for f in flat], sum(f[1] for f in flat)
        else:
            text_row[k], markers = _flatten(row[k], k)
        if k == "prompt" and markers > 1:
            raise _Bad("too_many_images", k, row[k], f"holds {markers} image markers but the row has one image",
                       "keep one <image> marker / image part in the prompt")
        if k != "prompt" and markers:
            raise _Bad("image_in_completion", k, row[k], "holds an image marker or image part",
                       "images belong in the prompt; remove it from the completion")
    return text_row, image


def _parts(message: dict) -> dict:
    """A message with string content as TRL content parts: the marker → ``{"type": "image"}``."""
    content = message.get("content")
    if not isinstance(content, str):
        return message
    pieces = content.split(IMAGE_MARKER)
    parts: list[dict] = []
    for i, text in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
    return {**message, "content": parts}


def template_takes_parts(tokenizer, chat_template: str | None) -> bool:
    """Whether the chat template renders content given as a list of ``{"type": ...}`` parts."""
    probe = [{"role": "user", "content": [{"type": "text", "text": "zq_probe"}]}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, chat_template=chat_template,
                                             add_generation_prompt=True)
    except Exception:  # no template, or one that concatenates strings (TypeError, jinja errors)
        return False
    return isinstance(text, str) and "zq_probe" in text and "'text'" not in text and '"text"' not in text


class _VisionEncoder(TextEncoder):
    """The text encoder, rendering conversations with content parts when the template takes them."""

    def __init__(self, tokenizer, *, parts: bool, **kw):
        super().__init__(tokenizer, **kw)
        self.parts = parts

    def _render(self, record, messages: list, generation_prompt: bool) -> str:
        return super()._render(record, [_parts(m) for m in messages] if self.parts else messages, generation_prompt)


def _expand(ids: list[int], marker: int, bos: int | None, n: int) -> tuple[list[int], bool]:
    """Replace the marker by ``n`` placeholders, or insert them after BOS when the prompt has none."""
    if marker in ids:
        i = ids.index(marker)
        return ids[:i] + [marker] * n + ids[i + 1:], False
    at = 1 if bos is not None and ids and ids[0] == bos else 0
    return ids[:at] + [marker] * n + ids[at:], True


def read_vision_rows(sources: str | Path | Sequence[str | Path], tokenizer, *, image_token_id: int,
                     num_image_tokens: int, format: str = "auto", image_root: str | None = None,
                     verify_images: bool = True, max_length: int | None = 512, max_prompt_length: int | None = None,
                     truncation: str = "keep_end_of_prompt", chat_template: str | None = None,
                     skip_bad_rows: bool = False, limit: int | None = None) -> tuple[list[VisionExample], dict, str]:
    """Load, validate and tokenise vision preference rows; returns (examples, flat stats for the logs, format).

    Raises:
        DataError: naming file, row, field, value and fix for each bad row (up to 10), unless
            ``skip_bad_rows`` (then they are counted as ``skipped/<reason>``).
    """
    if tokenizer.convert_tokens_to_ids(IMAGE_MARKER) != image_token_id:
        raise ValueError(f"read_vision_rows: the tokenizer does not map {IMAGE_MARKER!r} to image_token_id="
                         f"{image_token_id}; add it (mmalign.models.lvlm.add_image_token) before reading rows")
    skipped: Counter = Counter()
    rows = load_rows(sources, limit=limit, skip_bad_rows=skip_bad_rows, skipped=skipped)
    rows_read = len(rows) + sum(skipped.values())
    problems: list[RowProblem] = []
    text_rows, images = [], {}
    for file, row_no, row in rows:
        try:
            text_row, image = _normalise(row, file, image_root, verify_images)
        except _Bad as bad:
            problem = RowProblem(file, row_no, *bad.details)
            if skip_bad_rows:
                skipped[problem.reason] += 1
            else:
                problems.append(problem)
            continue
        text_rows.append((file, row_no, text_row))
        images[(file, row_no)] = image
    parsed = None
    try:
        parsed = parse_rows(text_rows, format=format, skip_bad_rows=skip_bad_rows) if text_rows else None
    except DataError as e:
        if not e.problems:
            raise
        problems.extend(e.problems)
    if problems:
        raise DataError.from_problems(sorted(problems, key=lambda p: (p.file, p.row)))
    parts = template_takes_parts(tokenizer, chat_template) if parsed and parsed.records and \
        parsed.records[0].is_conversational else False
    encoder = _VisionEncoder(tokenizer, parts=parts, max_length=max_length, max_prompt_length=max_prompt_length,
                          truncation=truncation, chat_template=chat_template, skip_bad_rows=skip_bad_rows)
    examples, placed = [], 0
    for record in parsed.records if parsed else []:
        try:
            enc = encoder.encode(record)
        except DataError as e:
            if not e.problems:
                raise  # a setup error (no chat template): the same for every row
            problems.extend(e.problems)
            continue
        if enc is None:
            continue
        if any(image_token_id in c for c in enc.completions):
            problems.append(RowProblem(*record.origin, "image_in_completion", "completion", record.candidates,
                                       f"tokenises to the {IMAGE_MARKER} token", "remove the marker text"))
            continue
        enc.prompt_ids, after_bos = _expand(enc.prompt_ids, image_token_id, tokenizer.bos_token_id,
                                            num_image_tokens)
        placed += after_bos
        examples.append(VisionExample(enc, images[record.origin], record.origin))
    if problems:
        raise DataError.from_problems(problems)
    if parsed is not None:
        skipped.update(parsed.skipped)
    skipped.update(encoder.dropped)
    if not examples:
        raise DataError(f"{sources}: no usable vision preference rows ({rows_read} read, skipped: {dict(skipped)});"
                        " fix: rows need 'images' plus prompt/chosen/rejected (pairs) or prompt/completion/label "
                        "(unpaired)")
    stats = {"rows_read": rows_read, "rows_used": len(examples), "rows_skipped": sum(skipped.values()),
             "encode/image_after_bos": placed}
    stats.update({f"skipped/{k}": v for k, v in sorted(skipped.items())})
    stats.update({f"encode/{k}": v for k, v in encoder.stats.as_dict().items()})
    return examples, stats, parsed.format


def open_image(image: Any, origin: tuple[str, int]):
    """The image as RGB; a file that fails to decode raises DataError naming file and row."""
    from PIL import Image

    try:
        if isinstance(image, Image.Image):
            return to_rgb(image)
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            return to_rgb(im)  # 16-bit greyscale scaled, not clipped white by convert("RGB")
    except Exception as e:  # PIL raises many types
        file, row = origin
        raise DataError(f"{file}:{row}: field 'images' ({short_repr(str(image))}) cannot be decoded "
                        f"({type(e).__name__}: {e}); fix: replace or remove the image, {SKIP_HINT}") from e


def _image_key(image: Any) -> bytes:
    if isinstance(image, Path):
        st = image.stat()
        return f"{image}:{st.st_size}:{st.st_mtime_ns}".encode()
    if isinstance(image, bytes):
        return hashlib.sha256(image).digest()
    return hashlib.sha256(image.convert("RGB").tobytes()).digest()  # a PIL image held in memory


class VisionPreferenceDataset(Dataset):
    """Vision preference examples; ``collate`` (a bound method) gives a :class:`VisionTextBatch`.

    ``pixel_values``: RGB PIL images → ``[B, C, H, W]`` (the model's preprocessing, e.g.
    ``LVLMInputs.pixel_values``), applied per batch.
    """

    def __init__(self, examples: Sequence[VisionExample], *, pad_token_id: int,
                 pixel_values: Callable[[list], Tensor], format: str = "pairs"):
        self.examples = list(examples)
        self.pad_token_id = pad_token_id
        self.pixel_values = pixel_values
        self.format = format

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[int, VisionExample]:
        return index, self.examples[index]

    def collate(self, items: Sequence[tuple[int, VisionExample]]) -> VisionTextBatch:
        encoded = [EncodedExample(ex.encoded.prompt_ids, ex.encoded.completions, ex.encoded.labels,
                                  {**ex.encoded.meta, "data_index": i, "image": str(ex.image)[:200]})
                   for i, ex in items]
        t = collate(encoded, pad_token_id=self.pad_token_id)
        pixels = self.pixel_values([open_image(ex.image, ex.origin) for _, ex in items])
        return VisionTextBatch(t.prompt_ids, t.prompt_mask, t.completion_ids, t.completion_mask, pixels,
                               t.candidate_mask, t.labels, t.meta, t.extras)

    def content_key(self) -> str:
        """Tokens, labels and image identity (path, size, mtime; bytes for in-memory images) of every example."""
        h = hashlib.sha256()
        for ex in self.examples:
            e = ex.encoded
            h.update(repr((e.prompt_ids, e.completions, e.labels)).encode())
            h.update(_image_key(ex.image))
        return h.hexdigest()
