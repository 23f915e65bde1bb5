"""Image–caption pairs for contrastive training, reference sets for ZSCL, and zero-shot classification folders.

Sources (a path or a list of them; formats by suffix):

=====================  =================================================================================
COCO captions ``.json``  ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``
                       (``captions_train2017.json``); images under ``image_root`` (default: the json's folder)
``.csv`` / ``.tsv``    a header row with ``filepath`` and ``caption`` columns, as open_clip's ``CsvDataset``
                       (keys and separator configurable; default separator by suffix)
``.jsonl`` / ``.json``   rows ``{"image": "path.png", "caption": "..." | ["...", ...]}``
HF datasets directory  ``save_to_disk`` output with an image column (``Image`` feature or paths) and captions
image folder           (reference images only) every image file below it
=====================  =================================================================================

Column names default to the first present of :data:`IMAGE_KEYS` / :data:`CAPTION_KEYS`. Relative image paths are
resolved against ``image_root`` or else the data file's folder. Rows naming the same image merge their captions
(``group_by_image``); each epoch then uses one caption per image, drawn from ``(seed, epoch, index)`` only, so
the choice is reproducible and survives a resume (the dataset's ``set_epoch`` takes the loop's epoch).

Bad rows (no image field, no caption, a missing file, and with ``check_images`` an undecodable one) raise one
:class:`~mmalign.data.rows.DataError` naming file, row, field, value and fix, or with ``skip_bad_rows`` are dropped
and counted in the stats. An image that fails to decode later, at training time, raises a DataError naming the
file, row and path, or with ``skip_bad_rows`` is replaced by the next good record and counted (``bad_images``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from .batches import ImageTextBatch
from .image import to_rgb
from .rows import MAX_REPORTED, SKIP_HINT, DataError, RowProblem, load_rows
from .zeroshot_names import pair_classnames

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_KEYS = ("image", "image_path", "filepath", "file_name", "img")
CAPTION_KEYS = ("caption", "captions", "title", "text")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass
class ImageTextOptions:
    """How to read sources (the ``clip:`` config keys plus ``data.skip_bad_rows``/``data.limit``)."""

    image_root: str | None = None
    image_key: str | None = None
    caption_key: str | None = None
    separator: str | None = None
    group_by_image: bool = True
    check_images: bool = False
    skip_bad_rows: bool = False
    limit: int | None = None

    @classmethod
    def from_config(cls, cfg) -> ImageTextOptions:
        c, d = cfg.clip, cfg.data
        return cls(c.image_root, c.image_key, c.caption_key, c.separator, c.group_by_image, c.check_images,
                   d.skip_bad_rows, d.limit)


@dataclass
class ImageTextRecord:
    """One image with its captions. ``image`` is a resolved path, or ``(table, row)`` of an HF dataset."""

    image: str | tuple[int, int]
    captions: list[str]
    origin: tuple[str, int]  # (file, 1-based row)


@dataclass
class _Reader:
    opts: ImageTextOptions
    need_captions: bool
    problems: list[RowProblem] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    tables: list[Any] = field(default_factory=list)
    rows_read: int = 0

    def bad(self, file: str, row: int, reason: str, fld: str, value: Any, message: str, fix: str) -> None:
        if self.opts.skip_bad_rows:
            self.skipped[reason] += 1
        else:
            self.problems.append(RowProblem(file, row, reason, fld, value, message, fix))


def _pick_key(explicit: str | None, candidates: Sequence[str], columns: Sequence[str], what: str, file: str,
              required: bool) -> str | None:
    if explicit:
        if explicit not in columns:
            raise DataError(f"{file}: no {what} column {explicit!r}; columns: {sorted(columns)}; fix: set "
                            f"clip.{what}_key to one of them")
        return explicit
    found = next((k for k in candidates if k in columns), None)
    if found is None and required:
        raise DataError(f"{file}: no {what} column among {list(candidates)}; columns: {sorted(columns)}; fix: "
                        f"rename the column or set clip.{what}_key")
    return found


def _captions(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value] if value.strip() else None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return list(value)
    return None


def _check_decode(path: str) -> str | None:
    try:
        with Image.open(path) as im:
            to_rgb(im)
        return None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on corrupt files
        return f"{type(e).__name__}: {e}"


def _add_row(r: _Reader, out: list[ImageTextRecord], file: str, row: int, image: Any, caption: Any,
             root: Path, image_key: str, caption_key: str | None) -> None:
    caps = _captions(caption) if caption_key else []
    if r.need_captions and caps is None:
        r.bad(file, row, "bad_caption", caption_key or "caption", caption, "must be a non-empty string or list of "
              "non-empty strings", "write the caption text")
        return
    if isinstance(image, tuple):  # (table, row) of an HF dataset with an Image feature
        out.append(ImageTextRecord(image, caps or [], (file, row)))
        return
    if not isinstance(image, str) or not image.strip():
        r.bad(file, row, "bad_image_field", image_key, image, "must be an image path", "give the image's path")
        return
    path = Path(image) if Path(image).is_absolute() else root / image
    if not path.is_file():
        r.bad(file, row, "missing_image", image_key, image, f"names {path}, which does not exist",
              "fix the path, or set "
              f"clip.image_root (relative paths are resolved against {root})")
        return
    if r.opts.check_images and (err := _check_decode(str(path))):
        r.bad(file, row, "bad_image", image_key, image, f"names {path}, which cannot be decoded ({err})",
              "replace or remove the file")
        return
    out.append(ImageTextRecord(str(path), caps or [], (file, row)))


def _read_coco(r: _Reader, path: Path, data: dict, out: list[ImageTextRecord]) -> None:
    root = Path(r.opts.image_root) if r.opts.image_root else path.parent
    files = {im.get("id"): im.get("file_name") for im in data.get("images", []) if isinstance(im, dict)}
    by_image: dict[Any, list[str]] = {}
    first_row: dict[Any, int] = {}
    for row, ann in enumerate(data.get("annotations", []), start=1):
        r.rows_read += 1
        if not isinstance(ann, dict) or ann.get("image_id") not in files:
            value = ann.get("image_id") if isinstance(ann, dict) else ann
            r.bad(str(path), row, "unknown_image_id", "annotations.image_id", value, "names no entry of "
                  "'images'", "add the image to 'images' or drop the annotation")
            continue
        by_image.setdefault(ann["image_id"], []).append(ann.get("caption"))
        first_row.setdefault(ann["image_id"], row)
    for image_id, caps in by_image.items():
        good = [c for c in caps if isinstance(c, str) and c.strip()]
        _add_row(r, out, str(path), first_row[image_id], files[image_id], good or None, root, "file_name",
                 "annotations.caption")


def _read_csv(r: _Reader, path: Path, out: list[ImageTextRecord]) -> None:
    sep = r.opts.separator or ("\t" if path.suffix.lower() == ".tsv" else ",")
    root = Path(r.opts.image_root) if r.opts.image_root else path.parent
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=sep)
        cols = reader.fieldnames or []
        ik = _pick_key(r.opts.image_key, IMAGE_KEYS, cols, "image", str(path), True)
        ck = _pick_key(r.opts.caption_key, CAPTION_KEYS, cols, "caption", str(path), r.need_captions)
        for i, row in enumerate(reader, start=2):  # line 1 is the header
            if r.opts.limit is not None and r.rows_read >= r.opts.limit:
                break
            r.rows_read += 1
            _add_row(r, out, str(path), i, row.get(ik), row.get(ck) if ck else None, root, ik, ck)


def _read_hf(r: _Reader, path: Path, out: list[ImageTextRecord]) -> None:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise DataError(f"{path}: a DatasetDict with splits {sorted(ds)} and no 'train'; fix: save one split")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    cols = list(ds.column_names)
    ik = _pick_key(r.opts.image_key, IMAGE_KEYS, cols, "image", str(path), True)
    ck = _pick_key(r.opts.caption_key, CAPTION_KEYS, cols, "caption", str(path), r.need_captions)
    n = len(ds) if r.opts.limit is None else min(len(ds), max(0, r.opts.limit - r.rows_read))
    lazy = isinstance(ds.features[ik], datasets.Image)
    table = len(r.tables)
    r.tables.append((ds, ik))
    images = [(table, i) for i in range(n)] if lazy else ds[ik][:n]
    caps = ds[ck][:n] if ck else [None] * n
    for i in range(n):
        r.rows_read += 1
        _add_row(r, out, str(path), i + 1, images[i], caps[i], path.parent, ik, ck)


def _read_rows(r: _Reader, path: Path, out: list[ImageTextRecord]) -> None:
    rows = load_rows(path, skip_bad_rows=r.opts.skip_bad_rows, skipped=r.skipped,
                     limit=None if r.opts.limit is None else max(0, r.opts.limit - r.rows_read))
    if not rows:
        return
    root = Path(r.opts.image_root) if r.opts.image_root else path.parent
    cols = sorted({k for _, _, row in rows for k in row})
    ik = _pick_key(r.opts.image_key, IMAGE_KEYS, cols, "image", str(path), True)
    ck = _pick_key(r.opts.caption_key, CAPTION_KEYS, cols, "caption", str(path), r.need_captions)
    for file, i, row in rows:
        r.rows_read += 1
        _add_row(r, out, file, i, row.get(ik), row.get(ck) if ck else None, root, ik, ck)


def _read_folder(r: _Reader, path: Path, out: list[ImageTextRecord]) -> None:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) below this folder")
    for i, p in enumerate(files[: r.opts.limit], start=1):
        r.rows_read += 1
        _add_row(r, out, str(path), i, str(p.relative_to(path)), None, path, "file", None)


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def load_image_text(sources: str | Path | Sequence[str | Path], opts: ImageTextOptions | None = None, *,
                    need_captions: bool = True) -> tuple[list[ImageTextRecord], list[Any], dict[str, int]]:
    """Read and validate sources into records; returns ``(records, hf_tables, stats)``.

    ``need_captions=False`` (ZSCL reference images) also accepts image folders and rows without captions.
    Stats: ``rows_read``, ``rows_used`` (records), ``rows_skipped`` and ``skipped/<reason>``.
    """
    opts = opts or ImageTextOptions()
    srcs = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not srcs:
        raise DataError("no image-text sources given; fix: set data.train (or clip.ref_images) to a file or folder")
    r = _Reader(opts, need_captions)
    records: list[ImageTextRecord] = []
    for src in srcs:
        path = Path(src)
        if not path.exists():
            raise DataError(f"{path}: no such file or directory; fix: check the path (relative to {Path.cwd()})")
        suffix = path.suffix.lower()
        if _is_hf_dir(path):
            _read_hf(r, path, records)
        elif path.is_dir():
            if need_captions:
                raise DataError(f"{path}: a folder of images has no captions; fix: give a COCO .json, .csv/.tsv, "
                                ".jsonl or a saved HF dataset (image folders serve only as clip.ref_images)")
            _read_folder(r, path, records)
        elif suffix in (".csv", ".tsv"):
            _read_csv(r, path, records)
        elif suffix == ".json" and _is_coco(path):
            _read_coco(r, path, json.loads(path.read_text(encoding="utf-8")), records)
        else:
            _read_rows(r, path, records)
    if r.problems:
        raise DataError.from_problems(r.problems)
    if opts.group_by_image:
        records = _group(records)
    names = ", ".join(str(s) for s in srcs)
    if not records:
        raise DataError(f"{names}: no usable rows ({r.rows_read} read, skipped: {dict(r.skipped)}); fix the data "
                        f"or the clip.image_key/caption_key/image_root settings")
    stats = {"rows_read": r.rows_read, "rows_used": len(records), "rows_skipped": sum(r.skipped.values())}
    stats.update({f"skipped/{k}": v for k, v in sorted(r.skipped.items())})
    return records, r.tables, stats


def _is_coco(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"{"):
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e}); fix: repair the file") from e
    return isinstance(data, dict) and "annotations" in data and "images" in data


def _group(records: list[ImageTextRecord]) -> list[ImageTextRecord]:
    out: dict[Any, ImageTextRecord] = {}
    for rec in records:
        if rec.image in out:
            out[rec.image].captions.extend(c for c in rec.captions if c not in out[rec.image].captions)
        else:
            out[rec.image] = ImageTextRecord(rec.image, list(rec.captions), rec.origin)
    return list(out.values())


def load_texts(sources: str | Path | Sequence[str | Path], opts: ImageTextOptions | None = None) -> list[str]:
    """Reference sentences: ``.txt`` files (one per non-empty line) or the captions of image–caption sources."""
    srcs = [sources] if isinstance(sources, (str, Path)) else list(sources)
    texts: list[str] = []
    for src in srcs:
        path = Path(src)
        if path.suffix.lower() == ".txt":
            if not path.is_file():
                raise DataError(f"{path}: no such file; fix: check clip.ref_texts")
            texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            records, _, _ = load_image_text(path, opts)
            texts += [c for rec in records for c in rec.captions]
    if not texts:
        raise DataError(f"{[str(s) for s in srcs]}: no reference sentences; fix: give a .txt with one per line")
    return texts


def open_image(record: ImageTextRecord, tables: list[Any]) -> Image.Image:
    """Decode a record's image as RGB (raises whatever PIL/datasets raise; the dataset turns it into a DataError)."""
    if isinstance(record.image, tuple):
        ds, key = tables[record.image[0]]
        value = ds[record.image[1]][key]
        if isinstance(value, dict):  # Image(decode=False): {"bytes", "path"}
            import io

            value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        return to_rgb(value)
    with Image.open(record.image) as im:
        return to_rgb(im)


class ImageTextDataset(Dataset):
    """Records → examples ``{"pixel_values", "caption", "image_index", "caption_index", "origin"}``.

    ``with_text=False`` yields images only (ZSCL reference images). ``collate`` tokenises the captions of a
    batch into an :class:`~mmalign.adapters.contrastive.ImageTextBatch`.
    """

    def __init__(self, records: list[ImageTextRecord], tables: list[Any], transform: Callable, tokenizer=None, *,
                 seed: int = 0, with_text: bool = True, skip_bad_rows: bool = False):
        self.records, self.tables, self.transform, self.tokenizer = records, tables, transform, tokenizer
        self.seed, self.with_text, self.skip_bad_rows = seed, with_text, skip_bad_rows
        self.epoch = 0
        self.split = 0  # which table of precomputed teacher features belongs to this dataset (set by the task)
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """The caption drawn for each image depends on (seed, epoch, index) only: resumable and rank-free."""
        self.epoch = int(epoch)

    def caption_index(self, i: int, epoch: int | None = None) -> int:
        n = len(self.records[i].captions)
        if n <= 1:
            return 0
        return random.Random(f"{self.seed}:{self.epoch if epoch is None else epoch}:{i}").randrange(n)

    def _decode(self, i: int):
        try:
            return self.transform(open_image(self.records[i], self.tables))
        except Exception as e:  # a corrupt or vanished file: name it and the row it came from
            file, row = self.records[i].origin
            if not self.skip_bad_rows:
                raise DataError(f"{file}:{row}: image {self.records[i].image!r} cannot be decoded "
                                f"({type(e).__name__}: {e}); fix: replace or remove it, {SKIP_HINT}") from e
            self.bad.add(i)
            return None

    def __getitem__(self, i: int) -> dict:
        n = len(self.records)
        for step in range(n):
            j = (i + step) % n
            if j in self.bad:
                continue
            pixels = self._decode(j)
            if pixels is not None:
                cap_idx = self.caption_index(j) if self.with_text else 0
                caption = self.records[j].captions[cap_idx] if self.with_text else None
                return {"pixel_values": pixels, "caption": caption, "image_index": j, "caption_index": cap_idx,
                        "substituted": j != i, "split": self.split, "origin": self.records[j].origin}
        raise DataError(f"none of the {n} images could be decoded (first: {self.records[0].origin}); fix the data")

    def collate(self, examples: list[dict]) -> ImageTextBatch:
        return ImageTextCollator(self.tokenizer)(examples)

    def content_key(self, extra: str = "") -> str:
        """sha256 over image identities (path, size, mtime) and captions: a cache key without reading pixels."""
        h = hashlib.sha256(extra.encode())
        for rec in self.records:
            if isinstance(rec.image, tuple):
                ds, _ = self.tables[rec.image[0]]
                ident = f"{getattr(ds, '_fingerprint', '')}:{rec.image[1]}"
            else:
                st = Path(rec.image).stat()
                ident = f"{rec.image}:{st.st_size}:{st.st_mtime_ns}"
            h.update(json.dumps([ident, rec.captions if self.with_text else []]).encode())
        return h.hexdigest()


class ImageTextCollator:
    """Examples of any :class:`ImageTextDataset` (pairs or images only) → :class:`ImageTextBatch`; captions are
    tokenised here, batch-wise. One collator serves the train, eval and reference-image sets of a run."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def __call__(self, examples: list[dict]) -> ImageTextBatch:
        pixels = torch.stack([ex["pixel_values"] for ex in examples])
        captions = [ex["caption"] for ex in examples]
        ids = mask = None
        if any(c is not None for c in captions):
            if any(c is None for c in captions) or self.tokenizer is None:
                raise ValueError("a batch mixes image-only and image-caption examples (or has no tokenizer)")
            ids, mask = self.tokenizer(captions)
        extras = {"image_index": torch.tensor([ex["image_index"] for ex in examples]),
                  "caption_index": torch.tensor([ex["caption_index"] for ex in examples]),
                  "split": torch.tensor([ex.get("split", 0) for ex in examples]),
                  "substituted": torch.tensor([float(ex["substituted"]) for ex in examples])}
        return ImageTextBatch(pixels, ids, mask, [{"origin": ex["origin"]} for ex in examples], extras)


@dataclass
class ZeroShotSet:
    """A zero-shot classification set: image ``paths`` with integer ``labels`` into ``classnames``."""

    root: str
    paths: list[str]
    labels: list[int]
    classnames: list[str]
    templates: list[str]
    folders: list[str] = field(default_factory=list)  # the class folder of each label
    pairing: str = "folders"  # how names met folders: "folders", "map", "by name" or "sorted order"


def load_zeroshot(root: str | Path, *, classnames: Sequence[str] | Mapping[str, str] | None = None,
                  templates: Sequence[str] | None = None, limit_per_class: int | None = None) -> ZeroShotSet:
    """A folder with one sub-folder of images per class; labels follow the sorted folder order.

    Class names: ``classnames`` (a list or a ``{folder: name}`` map), else ``classnames.txt``, else the folder
    names with ``_`` → space. ``classnames.txt`` holds one ``folder: name`` line per folder, or one name per
    line: names that are the folder names (any order, ``_``/``-`` as spaces, any case) are matched by name;
    other names are paired with the sorted folder order, and refused when that order is ambiguous
    (:func:`~mmalign.data.zeroshot_names.pair_classnames`). Prompt templates (``{}`` = class name):
    ``templates``, else ``templates.txt``, else ``"a photo of a {}."``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: zero-shot set not found; fix: give a folder with one sub-folder per class")
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not dirs:
        raise DataError(f"{root}: no class sub-folders; fix: put each class's images in root/<class>/")
    where = f"{root} (classnames argument)"
    if classnames is None and (root / "classnames.txt").is_file():
        where = str(root / "classnames.txt")
        classnames = [c.strip() for c in (root / "classnames.txt").read_text().splitlines() if c.strip()]
    names, pairing = pair_classnames(where, [d.name for d in dirs], classnames)
    if templates is None and (root / "templates.txt").is_file():
        templates = [t.strip() for t in (root / "templates.txt").read_text().splitlines() if t.strip()]
    templates = list(templates or DEFAULT_TEMPLATES)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise DataError(f"{root}: templates {bad[:MAX_REPORTED]} have no '{{}}' for the class name")
    paths, labels = [], []
    for label, d in enumerate(dirs):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit_per_class]
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{root}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return ZeroShotSet(str(root), paths, labels, names, templates, [d.name for d in dirs], pairing)
