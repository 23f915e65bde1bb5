"""Frozen teachers for the CLIP recipes: a frozen copy, or teacher features precomputed once and cached on disk.

CLIP-Refine's HyCD and ZSCL's distillation compare the policy with the *initial* model. Two strategies
(``reference.strategy``):

- ``copy`` (and ``auto``): a frozen deep copy of the initial model, run under ``no_grad`` on every batch (2× weights
  in memory, as both reference implementations do);
- ``precomputed``: image features of every record, text features of every caption, and ZSCL's text anchors,
  computed once from the initial weights and saved under ``reference.cache_dir`` (default
  ``<output_dir>/teacher_cache``), keyed by a hash of the data (image paths with size and mtime, captions, image
  transform) and of the weights. A second run on the same data and model loads the file; changing either rebuilds
  it. Lookups use the record and caption actually in the batch, so the per-epoch caption choice and replaced bad
  images stay exact. This needs a deterministic image transform, which the CLIP recipes use.

Teacher features are stored raw (unnormalised); the recipe normalises them exactly as it does the policy's.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapters.contrastive import encode_images, encode_texts, logit_scale_and_bias
from ..data.batches import ImageTextBatch
from ..train.reference import tensor_hash

log = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def model_hash(model: nn.Module) -> str:
    # reshape(-1): mmalign.train.reference.model_hash cannot view 0-dim tensors (logit_scale) as bytes.
    return tensor_hash(v.reshape(-1) for _, v in sorted(_unwrap(model).state_dict().items()))


@torch.no_grad()
def encode_text_list(model: nn.Module, tokenizer, texts: list[str], device, batch_size: int = 256) -> Tensor:
    """Raw text features of a list of sentences, ``[M, D]`` (fp32, on ``device``)."""
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenizer(texts[i:i + batch_size])
        out.append(encode_texts(model, ids.to(device), mask.to(device), normalize=False).float())
    return torch.cat(out)


class CopyTeacher:
    """A frozen deep copy of the initial model (eval mode, no grad); moved to the batch's device on first use."""

    kind = "copy"

    def __init__(self, model: nn.Module, tokenizer):
        self.model = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self._anchors: Tensor | None = None
        self.anchor_texts: list[str] = []

    def _to(self, device) -> None:
        p = next(self.model.parameters())
        if p.device != torch.device(device):
            self.model.to(device)

    @torch.no_grad()
    def features(self, batch: ImageTextBatch) -> dict[str, Tensor]:
        dev = (batch.pixel_values if batch.pixel_values is not None else batch.input_ids).device
        self._to(dev)
        out = {"logit_scale": logit_scale_and_bias(self.model)[0].float()}
        if batch.pixel_values is not None:
            out["image"] = encode_images(self.model, batch.pixel_values, normalize=False)
        if batch.input_ids is not None:
            out["text"] = encode_texts(self.model, batch.input_ids, batch.attention_mask, normalize=False)
        return out

    def anchors(self, device) -> Tensor:
        """Teacher text features of the reference sentences (ZSCL computes them with the frozen model; constant,
        so computed once)."""
        if self._anchors is None:
            self._to(device)
            self._anchors = encode_text_list(self.model, self.tokenizer, self.anchor_texts, device)
        return self._anchors.to(device)

    def initial_params(self, device) -> dict[str, Tensor]:
        self._to(device)
        return dict(self.model.named_parameters())


class CachedTeacher:
    """Teacher features of whole datasets, built once from the initial weights and cached on disk."""

    kind = "precomputed"

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        self.tables: dict[int, dict[str, Tensor]] = {}  # split id -> image/text/offsets
        self.anchor_table: Tensor | None = None
        self.logit_scale: Tensor | None = None
        self.reused: dict[str, bool] = {}

    def _path(self, name: str, key: str) -> Path:
        return self.cache_dir / f"teacher-{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    def _load_or_build(self, name: str, key: str, build) -> dict[str, Tensor]:
        path = self._path(name, key)
        if path.is_file():
            self.reused[name] = True
            log.info("teacher features reused from %s", path)
            return torch.load(path, weights_only=True)
        table = build()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # every DDP rank may write: atomic per-process rename
        torch.save(table, tmp)
        tmp.replace(path)
        self.reused[name] = False
        return table

    @torch.no_grad()
    def build_dataset(self, split: int, name: str, model: nn.Module, dataset, device, batch_size: int = 64) -> None:
        """Image features of every record and text features of every caption of ``dataset``."""
        key = f"{name}:{dataset.content_key(repr(dataset.transform))}:{model_hash(model)}"

        def build() -> dict[str, Tensor]:
            model.eval()
            n = len(dataset)
            image = None
            for start in range(0, n, batch_size):
                exs = [dataset[i] for i in range(start, min(n, start + batch_size))]
                feats = encode_images(model, torch.stack([e["pixel_values"] for e in exs]).to(device),
                                      normalize=False).float().cpu()
                image = feats.new_zeros(n, feats.shape[1]) if image is None else image
                image[[e["image_index"] for e in exs]] = feats
            table = {"image": image, "logit_scale": logit_scale_and_bias(model)[0].float().cpu()}
            if dataset.with_text:
                caps = [c for rec in dataset.records for c in rec.captions]
                counts = torch.tensor([len(rec.captions) for rec in dataset.records])
                table["text"] = encode_text_list(model, dataset.tokenizer, caps, device).cpu()
                table["offsets"] = torch.cumsum(counts, 0) - counts
            return table

        self.tables[split] = self._load_or_build(name, key, build)
        self.logit_scale = self.tables[split]["logit_scale"]

    @torch.no_grad()
    def build_anchors(self, model: nn.Module, tokenizer, texts: list[str], device) -> None:
        key = f"anchors:{hashlib.sha256(repr(texts).encode()).hexdigest()}:{model_hash(model)}"
        table = self._load_or_build("anchors", key, lambda: {
            "text": encode_text_list(model, tokenizer, texts, device).cpu()})
        self.anchor_table = table["text"]

    def features(self, batch: ImageTextBatch) -> dict[str, Tensor]:
        split = int(batch.extras["split"][0])
        if split not in self.tables:
            raise RuntimeError(f"no precomputed teacher features for split {split}; the recipe builds them in "
                               "stage_data")
        t = self.tables[split]
        img_idx = batch.extras["image_index"].cpu()
        dev = batch.extras["image_index"].device
        out = {"logit_scale": t["logit_scale"].to(dev)}
        if batch.pixel_values is not None:
            out["image"] = t["image"][img_idx].to(dev)
        if batch.input_ids is not None:
            out["text"] = t["text"][t["offsets"][img_idx] + batch.extras["caption_index"].cpu()].to(dev)
        return out

    def anchors(self, device) -> Tensor:
        if self.anchor_table is None:
            raise RuntimeError("teacher text anchors were not built")
        return self.anchor_table.to(device)
