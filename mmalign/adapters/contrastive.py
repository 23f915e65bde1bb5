"""The contrastive adapter: ``(dual encoder, ImageTextBatch) → Scores`` for open_clip and transformers CLIP/SigLIP.

Scores carry ``embeddings={"image": [B, D], "text": [B, D]}`` (either may be missing for one-modality batches,
e.g. ZSCL's reference images), ``extras={"logit_scale": s, "logit_bias": b}`` with s already exponentiated (the
form open_clip's losses and :mod:`mmalign.losses.contrastive` take), and ``logps`` ``[B, 1]`` = the pair's logit
s·⟨f_i, f_t⟩ (+ b) on normalised features, so pair scores exist for every loss that wants one.

Normalisation is an explicit flag: ``normalize=True`` (the default here, as open_clip's ``forward`` and ZSCL) returns
unit-norm features; ``normalize=False`` returns the raw projections, which is what CLIP-Refine's code trains on
(research note §4.2). Deviation from open_clip: the logit scale is clamped to ≤ 100 (open_clip clamps the parameter
in place after each optimizer step; here the clamp is differentiable and applied on read, so both agree whenever
the scale is below 100, and the recipe also clamps the parameter after each step where the loop allows).

Multi-process (torch.distributed initialised, e.g. under ``accelerate launch``): :func:`gather_features` follows
open_clip's ``gather_features``: with ``gather_with_grad`` an autograd all-gather (gradients reach every rank's
features); otherwise a plain all-gather with this rank's slice put back so that local features keep their graph.
The gathered ``[world·B, D]`` features are added as ``image_all``/``text_all`` and ``extras["rank"]``.

**Frozen teachers** (CLIP-Refine's HyCD and ZSCL's distillation compare the policy with the *initial* model;
``reference.strategy``): :class:`CopyTeacher` (``copy`` and ``auto``), a frozen deep copy of the initial model run
under ``no_grad`` on every batch (2× weights in memory, as both reference implementations do); or
:class:`CachedTeacher` (``precomputed``), image features of every record, text features of every caption and ZSCL's
text anchors computed once from the initial weights and saved under ``reference.cache_dir`` (default
``<output_dir>/teacher_cache``), keyed by a hash of the data (image paths with size and mtime, captions, image
transform) and of the weights: a second run on the same data and model loads the file, changing either rebuilds
it. Lookups use the record and caption actually in the batch, so the per-epoch caption choice and replaced bad
images stay exact (this needs a deterministic image transform, which the dual-encoder family uses). Teacher
features are stored raw (unnormalised); the family normalises them exactly as it does the policy's.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batches import ImageTextBatch
from ..hashing import tensor_hash
from ..types import Scores

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _is_open_clip(model: nn.Module) -> bool:
    import open_clip

    return isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP))


def _pooled(out) -> Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected features; 4.x a tensor.
    return out if torch.is_tensor(out) else out.pooler_output


def encode_images(model: nn.Module, pixel_values: Tensor, *, normalize: bool = True) -> Tensor:
    """``[B, D]`` image features (raw projections, or unit-norm with ``normalize``)."""
    model = _unwrap(model)
    dtype = next(model.parameters()).dtype
    pixel_values = pixel_values.to(dtype)
    feats = model.encode_image(pixel_values) if _is_open_clip(model) else _pooled(
        model.get_image_features(pixel_values=pixel_values))
    return F.normalize(feats, dim=-1) if normalize else feats


def encode_texts(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                 normalize: bool = True) -> Tensor:
    """``[B, D]`` text features; open_clip pools at the EOT token itself, transformers uses the mask."""
    model = _unwrap(model)
    if _is_open_clip(model):
        feats = model.encode_text(input_ids)
    else:
        feats = _pooled(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
    return F.normalize(feats, dim=-1) if normalize else feats


def logit_scale_and_bias(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(exp(logit_scale) clamped to ≤ 100, logit_bias or None)`` as 0-dim tensors."""
    model = _unwrap(model)
    scale = model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp().reshape(())
    bias = getattr(model, "logit_bias", None)
    return scale, None if bias is None else bias.reshape(())


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of torch.distributed, or ``(0, 1)`` when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_features(features: Tensor, *, gather_with_grad: bool = True) -> Tensor:
    """All-gather ``[B, D]`` features from every rank into ``[world·B, D]`` (rank order), as open_clip does.

    Without ``gather_with_grad`` only this rank's slice carries gradient (open_clip's ``local_loss=False``
    path); with it, ``torch.distributed.nn.all_gather`` back-propagates into every rank's features.
    Single process: returns ``features`` unchanged.
    """
    rank, world = dist_info()
    if world == 1:
        return features
    if gather_with_grad:
        import torch.distributed.nn as dist_nn

        return torch.cat(dist_nn.all_gather(features), dim=0)
    parts = [torch.zeros_like(features) for _ in range(world)]
    torch.distributed.all_gather(parts, features.detach())
    parts[rank] = features  # keep the local graph
    return torch.cat(parts, dim=0)


def score_contrastive(model: nn.Module, batch: ImageTextBatch, *, normalize: bool = True, gather: bool = True,
                      gather_with_grad: bool = True) -> Scores:
    """Encode a batch; see the module docstring for what the Scores hold."""
    embeddings: dict[str, Tensor] = {}
    if batch.pixel_values is not None:
        embeddings["image"] = encode_images(model, batch.pixel_values, normalize=normalize)
    if batch.input_ids is not None:
        embeddings["text"] = encode_texts(model, batch.input_ids, batch.attention_mask, normalize=normalize)
    scale, bias = logit_scale_and_bias(model)
    extras = {"logit_scale": scale}
    if bias is not None:
        extras["logit_bias"] = bias
    b = batch.batch_size
    if "image" in embeddings and "text" in embeddings:
        with torch.no_grad():  # a reported score only; the losses work on the embeddings
            img = F.normalize(embeddings["image"].float(), dim=-1)
            txt = F.normalize(embeddings["text"].float(), dim=-1)
            pair = scale.float() * (img * txt).sum(-1) + (0.0 if bias is None else bias.float())
        logps = pair[:, None]
    else:
        logps = torch.zeros(b, 0, device=scale.device)
    rank, world = dist_info()
    if gather and world > 1:
        for name in list(embeddings):
            embeddings[f"{name}_all"] = gather_features(embeddings[name], gather_with_grad=gather_with_grad)
        extras["rank"] = torch.tensor(rank, device=scale.device)
    return Scores(logps=logps, embeddings=embeddings, extras=extras)


# -- frozen teachers (see the module docstring) -----------------------------------------------------------------
def model_hash(model: nn.Module) -> str:
    # reshape(-1): mmalign.hashing.model_hash cannot view 0-dim tensors (logit_scale) as bytes.
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
            raise RuntimeError(f"no precomputed teacher features for split {split}; the family builds them in "
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
