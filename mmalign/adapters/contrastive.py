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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batches import ImageTextBatch
from ..types import Scores

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
