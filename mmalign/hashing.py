"""Content hashes of tensors, collated batches and model weights.

Pure torch, at the bottom of the package so that any layer can key a cache on content: the reference-score
cache (:mod:`mmalign.train.reference`), the diffusion latent/text caches (:mod:`mmalign.adapters.diffusion`),
the ZSCL teacher and PRIOR reference-probability caches (:mod:`mmalign.methods`). Changing what these
functions hash invalidates every cache on disk that is keyed by them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable

import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP wraps the model in `.module`


def tensor_hash(tensors: Iterable[torch.Tensor], h=None) -> str:
    """sha256 over the raw bytes of tensors (order matters)."""
    h = h or hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return h.hexdigest()


def _batch_tensors(batch) -> Iterable[torch.Tensor]:
    values = ([getattr(batch, f.name) for f in dataclasses.fields(batch)] if dataclasses.is_dataclass(batch)
              else list(vars(batch).values()))
    for v in values:
        if torch.is_tensor(v):
            yield v
        elif isinstance(v, dict):
            yield from (v[k] for k in sorted(v) if torch.is_tensor(v[k]))


def batches_hash(batches: Iterable) -> str:
    """sha256 over every tensor of collated batches: a content key for data the task gave no key for."""
    h = hashlib.sha256()
    for batch in batches:
        tensor_hash(_batch_tensors(batch), h)
    return h.hexdigest()


def model_hash(model: nn.Module) -> str:
    """sha256 over the (unwrapped) model's state dict, keys in sorted order."""
    return tensor_hash(v for _, v in sorted(_unwrap(model).state_dict().items()))
