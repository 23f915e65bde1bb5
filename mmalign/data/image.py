"""Image preference rows → :class:`~mmalign.adapters.diffusion.ImageBatch`.

Formats (detected from the columns; ``caption`` may also be called ``prompt``):

==========  =====================================  ==============================================================
format      columns                                notes
==========  =====================================  ==============================================================
pickapic    jpg_0, jpg_1, label_0, caption         Pick-a-Pic v1/v2: images as bytes (or HF ``Image`` cells);
                                                   ``label_0 = 1`` ⇒ jpg_0 preferred, 0 ⇒ jpg_1, 0.5 = tie
                                                   (dropped by default: the Salesforce code drops them, the
                                                   diffusers scripts keep them in file order); ``label_1``, when
                                                   present, must equal ``1 − label_0``
pairs       caption, chosen, rejected              image paths (relative to the data file) or bytes
unpaired    caption, image, label                  label true/false (1/0): desirable or not (Diffusion-KTO)
ranked      caption, images, ranking | scores      ``ranking[i]`` = rank of ``images[i]`` (0 = best)
sft         caption, image                         plain image-caption data
==========  =====================================  ==============================================================

Sources: ``.jsonl``/``.json`` (via :func:`mmalign.data.rows.load_rows`), ``.parquet`` (memory-mapped, rows
read lazily: Pick-a-Pic v2 is ~335 GB), a ``save_to_disk`` directory (lazy), a directory of such files, or a
glob pattern (``pickapic_v2/data/train-*.parquet``); see :mod:`mmalign.data.image_sources`.
Captions and labels are read column-wise up front; images only when an example is loaded.

Images are resized (short side, bilinear) and centre-cropped to ``resolution`` and scaled to [-1, 1], as in
the reference scripts. A random horizontal flip is off by default; when on, it is decided once per example
and applied to all its candidates (the diffusers SDXL script flips the pair jointly; the SD1.5 scripts flip
each image independently, which makes winner and loser differ by more than preference).
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .batches import ImageBatch
from .image_sources import _open_sources, _RowsTable, _Table
from .noise import NoiseSampler, example_seed
from .rows import ALWAYS_DROPPED, SKIP_HINT, DataError, RowProblem

IMAGE_FORMATS = ("pickapic", "pairs", "unpaired", "ranked", "sft")
_SIGNATURES = {  # first match wins
    "pickapic": ("jpg_0", "jpg_1"),
    "pairs": ("chosen", "rejected"),
    "ranked": ("images",),
    "unpaired": ("label",),
    "sft": ("image",),
}
_TRUE, _FALSE = {"true", "yes", "1"}, {"false", "no", "0"}


class _Bad(Exception):
    def __init__(self, reason: str, field: str, value: Any, message: str, fix: str):
        super().__init__(message)
        self.details = (reason, field, value, message, fix)


# ------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class ImageRef:
    """One image: a cell of a source table (bytes, a path string, an HF image dict or a PIL image)."""

    table: _Table = field(compare=False)
    row: int
    key: str
    item: int | None = None  # position inside a list cell (ranked ``images``)

    @property
    def field_name(self) -> str:
        return self.key if self.item is None else f"{self.key}[{self.item}]"

    def value(self) -> Any:
        v = self.table.cell(self.row, self.key)
        return v if self.item is None else v[self.item]

    def path(self) -> Path | None:
        v = self.value()
        if isinstance(v, dict) and not v.get("bytes") and v.get("path"):
            v = v["path"]
        if isinstance(v, str):
            p = Path(v).expanduser()
            return p if p.is_absolute() else self.table.base_dir / p
        return None

    def raw_bytes(self) -> bytes:
        v = self.value()
        if isinstance(v, dict) and v.get("bytes"):
            return v["bytes"]
        if isinstance(v, (bytes, bytearray)):
            return bytes(v)
        p = self.path()
        if p is not None:
            return p.read_bytes()
        buf = io.BytesIO()  # a decoded PIL image (HF Image feature): re-encode losslessly
        v.save(buf, format="PNG")
        return buf.getvalue()

    def open(self):
        """The image as RGB ``PIL.Image`` (raises OSError/ValueError on unreadable data)."""
        from PIL import Image

        v = self.value()
        img = v if isinstance(v, Image.Image) else Image.open(io.BytesIO(self.raw_bytes()))
        img.load()
        return to_rgb(img)


_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img):
    """``img`` as an 8-bit RGB ``PIL.Image``. 16-bit greyscale (PNG/TIFF open as ``I;16`` or ``I``) is scaled
    to 8 bits (÷257): PIL's own ``convert("RGB")`` clips such values at 255, turning a mid-grey 16-bit image
    white without a word. Other modes (palette, CMYK, alpha, 1-bit, ...) use PIL's conversion."""
    from PIL import Image

    if img.mode in _WIDE_MODES:
        import numpy as np

        grey = np.asarray(img, dtype=np.float64) / 257.0  # 0..65535 → 0..255
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


@dataclass
class ImageRecord:
    """One example: a caption and K candidate images, candidate 0 preferred for pairs."""

    caption: str
    images: list[ImageRef]
    labels: list[float]  # pairs: [0, 1] ranks (0.5, 0.5 for kept ties); unpaired: [1/0]; ranked: ranks; sft: NaN
    origin: tuple[str, int]  # (file, 1-based row)


def _row_number(table: _Table, i: int) -> int:
    return table.numbers[i] if isinstance(table, _RowsTable) else i + 1


def _caption(table: _Table, i: int, captions: list, prompts: list) -> str:
    c = captions[i] if captions[i] is not None else prompts[i]
    if not isinstance(c, str):
        raise _Bad("missing_field", "caption", c, "is missing or not a string",
                   "add a 'caption' (or 'prompt') text field to the row")
    return c


def _check_image(ref: ImageRef, verify: bool) -> None:
    v = ref.value()
    if v is None:
        raise _Bad("missing_field", ref.field_name, v, "is missing", "give the image as a path or bytes")
    p = ref.path()
    if p is not None and not p.is_file():
        raise _Bad("missing_image", ref.field_name, str(p), "points to no file",
                   f"fix the path (relative paths are resolved against {ref.table.base_dir})")
    if verify:
        try:
            ref.open()
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise _Bad("bad_image", ref.field_name, str(p) if p else "<bytes>",
                       f"cannot be decoded ({type(e).__name__}: {e})", "replace or re-encode the image") from e


def _label(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise _Bad("bad_label", key, v, "is not boolean-like", "use true/false (or 1/0)")


def _pickapic(t: _Table, i: int, cols: dict, drop_ties: bool) -> ImageRecord | None:
    label = cols["label_0"][i]
    if isinstance(label, bool) or not isinstance(label, (int, float)) or label not in (0, 0.5, 1):
        raise _Bad("bad_label", "label_0", label, "must be 1 (jpg_0 preferred), 0 (jpg_1 preferred) or 0.5 (tie)",
                   "store label_0 as a number in {0, 0.5, 1}")
    other = cols["label_1"][i]
    if other is not None and (isinstance(other, bool) or not isinstance(other, (int, float))
                              or not math.isclose(other, 1 - label)):
        raise _Bad("bad_label", "label_1", other, f"must equal 1 − label_0 = {1 - label}",
                   "fix label_1 or drop the column (label_0 alone decides the preference)")
    if label == 0.5 and drop_ties:
        return None
    first, second = ImageRef(t, i, "jpg_0"), ImageRef(t, i, "jpg_1")
    pair = [first, second] if label >= 0.5 else [second, first]  # ties keep file order (diffusers behaviour)
    labels = [0.5, 0.5] if label == 0.5 else [0.0, 1.0]
    return ImageRecord("", pair, labels, ("", 0))


def _ranking(t: _Table, i: int, cols: dict, k: int) -> list[float]:
    ranking, scores = cols["ranking"][i], cols["scores"][i]
    if ranking is None and scores is not None:
        if not (isinstance(scores, list) and len(scores) == k and all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores)):
            raise _Bad("bad_ranking", "scores", scores, f"must be {k} finite numbers, one per image",
                       "give one score per image (higher = better) or a 'ranking'")
        order = sorted(range(k), key=lambda j: -scores[j])
        return [float(order.index(j)) for j in range(k)]
    if not (isinstance(ranking, list) and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ranking)
            and sorted(ranking) == list(range(k))):
        raise _Bad("bad_ranking", "ranking", ranking, f"is not a permutation of 0..{k - 1} ({k} images)",
                   "give the rank of each image (0 = best), each rank once, or 'scores'")
    return [float(r) for r in ranking]


def _same_images(refs: list[ImageRef]) -> bool:
    """Whether all candidates are one file (or the same bytes); Pick-a-Pic's bytes are not compared (cost)."""
    keys = []
    for ref in refs:
        p, v = ref.path(), ref.value()
        keys.append(p.resolve() if p is not None else v.get("bytes") if isinstance(v, dict) else v)
    return all(isinstance(k, (Path, bytes)) and k == keys[0] for k in keys)


def _detect(columns: set[str]) -> str | None:
    return next((f for f, keys in _SIGNATURES.items() if all(k in columns for k in keys)), None)


def load_image_records(sources: str | Path | Sequence[str | Path], *, format: str = "auto", drop_ties: bool = True,
                       skip_bad_rows: bool = False, verify_images: bool = True, limit: int | None = None,
                       split: str = "train") -> tuple[list[ImageRecord], dict[str, Any]]:
    """Read and validate image preference rows (module docstring); returns ``(records, stats)``.

    Raises:
        DataError: the first 10 bad rows, each with file, row, field, value and fix (or, with
            ``skip_bad_rows``, the rows are dropped and counted under ``stats["skipped/<reason>"]``).
    """
    if format not in ("auto", *IMAGE_FORMATS):
        raise ValueError(f"format={format!r} is not one of {['auto', *IMAGE_FORMATS]}")
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not sources:
        raise DataError("no image data sources given; fix: set data.train to a .jsonl/.parquet file or directory")
    skipped: Counter = Counter()
    tables = _open_sources(sources, split, limit, skip_bad_rows, skipped)
    records: list[ImageRecord] = []
    problems: list[RowProblem] = []
    stats: Counter = Counter()
    formats: dict[str, str] = {}
    for t in tables:
        fmt = _detect(t.columns) if format == "auto" else format
        if fmt is None:
            raise DataError(f"{t.name}: cannot tell the image data format from the columns {sorted(t.columns)}; "
                            "fix: use jpg_0/jpg_1/label_0/caption (pickapic), caption/chosen/rejected (pairs), "
                            "caption/image/label (unpaired), caption/images/ranking (ranked) or caption/image (sft)")
        formats[t.name] = fmt
        keys = {"caption", "prompt", "label_0", "label_1", "label", "ranking", "scores", "images"}
        cols = {k: t.column(k) for k in keys}
        for i in range(t.n):
            origin = (t.name, _row_number(t, i))
            try:
                rec = _parse(t, i, fmt, cols, drop_ties)
                if rec is None:
                    stats["ties_dropped"] += 1
                    continue
                for ref in rec.images:
                    _check_image(ref, verify_images)
                if fmt in ("pairs", "ranked") and _same_images(rec.images):  # as for text rows (rows.ALWAYS_DROPPED)
                    raise _Bad("identical_candidates", rec.images[-1].field_name, str(rec.images[-1].path()),
                               f"is the same image as {rec.images[0].field_name!r}, so the row holds no preference",
                               "remove the row, or give it different images")
                rec.origin = origin
                records.append(rec)
            except _Bad as bad:
                if skip_bad_rows or bad.details[0] in ALWAYS_DROPPED:
                    skipped[bad.details[0]] += 1
                else:
                    problems.append(RowProblem(origin[0], origin[1], *bad.details))
    if problems:
        raise DataError.from_problems(problems)
    if len(set(formats.values())) > 1:
        raise DataError(f"the data sources mix image formats {formats}; fix: train on one format at a time")
    out = {"format": next(iter(formats.values())), "rows": sum(t.n for t in tables), "examples": len(records),
           **stats}
    out.update({f"skipped/{k}": v for k, v in skipped.items()})
    if not records:
        raise DataError(f"no usable examples in {[t.name for t in tables]} ({out}); fix: check the data "
                        "(all rows were ties or bad)")
    return records, out


def _parse(t: _Table, i: int, fmt: str, cols: dict, drop_ties: bool) -> ImageRecord | None:
    caption = _caption(t, i, cols["caption"], cols["prompt"])
    if fmt == "pickapic":
        rec = _pickapic(t, i, cols, drop_ties)
        if rec is not None:
            rec.caption = caption
        return rec
    if fmt == "pairs":
        return ImageRecord(caption, [ImageRef(t, i, "chosen"), ImageRef(t, i, "rejected")], [0.0, 1.0], ("", 0))
    if fmt == "unpaired":
        return ImageRecord(caption, [ImageRef(t, i, "image")], [float(_label(cols["label"][i], "label"))], ("", 0))
    if fmt == "sft":
        return ImageRecord(caption, [ImageRef(t, i, "image")], [float("nan")], ("", 0))
    images = cols["images"][i]
    if not isinstance(images, list) or len(images) < 2:
        raise _Bad("bad_type", "images", images, "must be a list of at least 2 images",
                   "give 2 or more images (single images belong in the unpaired or sft format)")
    refs = [ImageRef(t, i, "images", j) for j in range(len(images))]
    return ImageRecord(caption, refs, _ranking(t, i, cols, len(images)), ("", 0))


# ------------------------------------------------------------------------------------------------ tensors


def preprocess(img, resolution: int, *, center_crop: bool = True, flip: bool = False) -> tuple[Tensor, Tensor]:
    """PIL image → ``([3, R, R] in [-1, 1], time_ids [6])``; time_ids = SDXL's (orig h, orig w, crop top,
    crop left, R, R), computed as diffusers' SDXL training script does (crop coords after the resize)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    w0, h0 = img.size
    img = TF.resize(img, resolution, interpolation=InterpolationMode.BILINEAR)
    w, h = img.size
    if center_crop:
        top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    else:
        top, left = 0, 0
    img = TF.crop(img, top, left, resolution, resolution)
    if flip:
        img = TF.hflip(img)
        left = w - left - resolution
    x = TF.to_tensor(img) * 2.0 - 1.0
    return x, torch.tensor([h0, w0, top, left, resolution, resolution], dtype=torch.float32)


@dataclass
class ImageExample:
    """One loaded example (what :class:`ImageDataset` yields and collates)."""

    index: int
    epoch: int
    caption: str
    labels: list[float]
    time_ids: Tensor  # [K, 6]
    pixels: Tensor | None = None  # [K, 3, R, R]
    latent_params: Tensor | None = None  # [K, 2C, h, w] cached VAE posterior parameters
    prompt_embeds: Tensor | None = None  # [L, D] cached
    pooled_prompt_embeds: Tensor | None = None  # [P] cached
    meta: dict = field(default_factory=dict)
    source: ImageDataset | None = field(default=None, repr=False)  # whose noise sampler and caches apply


class ImageDataset(Dataset):
    """Records → examples → :class:`ImageBatch` (``collate``). Set ``noise_sampler`` before collating.

    The epoch that seeds an example's noise and flip comes from :meth:`set_epoch` when the loop calls it, and
    otherwise from a count of how often the example was loaded (the same number for an uninterrupted run).
    """

    def __init__(self, records: list[ImageRecord], *, resolution: int, center_crop: bool = True,
                 random_flip: bool = False, seed: int = 0, noise_sampler: NoiseSampler | None = None):
        self.records, self.resolution, self.center_crop = records, resolution, center_crop
        self.random_flip, self.seed, self.noise_sampler = random_flip, seed, noise_sampler
        self._epoch: int | None = None
        self._visits: Counter = Counter()
        self.latent_store: dict[int, tuple[Tensor, Tensor]] | None = None  # index → (params [K,..], time_ids)
        self.text_store: dict[str, tuple[Tensor, Tensor | None]] | None = None  # caption → (embeds, pooled)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def load_pixels(self, index: int, *, flip: bool = False) -> tuple[Tensor, Tensor]:
        """``([K, 3, R, R], time_ids [K, 6])`` of one record; unreadable images raise :class:`DataError`."""
        rec = self.records[index]
        xs, ids = [], []
        for ref in rec.images:
            try:
                img = ref.open()
            except Exception as e:
                p = ref.path()
                raise DataError(
                    f"{rec.origin[0]}:{rec.origin[1]}: field {ref.field_name!r} image "
                    f"{str(p) if p else '<bytes>'} cannot be read ({type(e).__name__}: {e}); fix: replace the image, "
                    f"or set diffusion.verify_images=true with data.skip_bad_rows=true to drop such rows before "
                    f"training ({SKIP_HINT})") from e
            x, t = preprocess(img, self.resolution, center_crop=self.center_crop, flip=flip)
            xs.append(x)
            ids.append(t)
        return torch.stack(xs), torch.stack(ids)

    def __getitem__(self, index: int) -> ImageExample:
        epoch = self._epoch if self._epoch is not None else self._visits[index]
        self._visits[index] += 1
        rec = self.records[index]
        flip = False
        if self.random_flip:
            g = torch.Generator().manual_seed(example_seed(self.seed + 1, index, epoch))
            flip = bool(torch.rand((), generator=g) < 0.5)
        ex = ImageExample(index, epoch, rec.caption, list(rec.labels), torch.empty(0),
                          meta={"file": rec.origin[0], "row": rec.origin[1]}, source=self)
        if self.latent_store is not None:
            ex.latent_params, ex.time_ids = self.latent_store[index]
        else:
            ex.pixels, ex.time_ids = self.load_pixels(index, flip=flip)
        return ex

    def collate(self, examples: Sequence[ImageExample]) -> ImageBatch:
        """Stack examples; the noise sampler and text cache are those of the dataset the examples came from
        (the loop collates evaluation examples with the training dataset's ``collate``)."""
        src = examples[0].source or self
        if src.noise_sampler is None:
            raise RuntimeError("ImageDataset.noise_sampler must be set before collating (the task sets it)")
        k = max(len(e.labels) for e in examples)
        draws = [src.noise_sampler.draw(e.index, e.epoch, k) for e in examples]
        captions = ["" if d["drop_caption"] else e.caption for e, d in zip(examples, draws, strict=True)]
        mask = torch.tensor([[j < len(e.labels) for j in range(k)] for e in examples])
        labels = torch.tensor([e.labels + [float("nan")] * (k - len(e.labels)) for e in examples])

        def pad(t: Tensor) -> Tensor:  # ragged candidate lists: zero candidates, masked out
            return torch.cat([t, t.new_zeros((k - t.shape[0], *t.shape[1:]))]) if t.shape[0] < k else t

        extras: dict[str, Tensor] = {key: torch.stack([d[key] for d in draws])
                                     for key in ("noise", "timesteps", "sigmas", "vae_noise") if key in draws[0]}
        extras["time_ids"] = torch.stack([pad(e.time_ids) for e in examples])
        batch = ImageBatch(captions=captions, candidate_mask=None if bool(mask.all()) else mask, labels=labels,
                           meta=[e.meta for e in examples], extras=extras)
        if examples[0].latent_params is not None:
            batch.latent_params = torch.stack([pad(e.latent_params) for e in examples])
        else:
            batch.pixel_values = torch.stack([pad(e.pixels) for e in examples])
        if src.text_store is not None:
            embeds = [src.text_store[c] for c in captions]
            batch.prompt_embeds = torch.stack([e for e, _ in embeds])
            if embeds[0][1] is not None:
                batch.pooled_prompt_embeds = torch.stack([p for _, p in embeds])
        return batch
