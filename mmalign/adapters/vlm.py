"""Vision-language LM adapter for images and video: ``(model, batch) -> Scores`` for Qwen2-VL, Qwen2.5-VL,
LLaVA-OneVision and LLaVA-NeXT-Video (:mod:`mmalign.models.vlm`), in the losses' units (summed completion log-probs,
per-token log-probs, masks, lengths).

What :func:`score_candidates` shares, instead of TRL's one ``[media + prompt + completion]`` row per candidate
(which runs the vision tower K times, and K more for the reference):

1. **The media, once per example.** Every image and video of the batch goes through the model's own
   ``get_image_features`` / ``get_video_features`` (vision tower, projector / merger, LLaVA's anyres packing and
   video pooling) once; the features are scattered into the prompt's placeholder tokens in order, the rule of the
   models' own ``forward`` (``masked_scatter`` over ``<|image_pad|>`` / ``<|video_pad|>`` / ``<image>`` /
   ``<video>``).
2. **The prompt (visual tokens included), once per example.** Prompts are left-padded, run once with
   ``use_cache=True``, and the K completions run on the KV cache gathered to one row per candidate
   (:func:`mmalign.adapters.lvlm.shared_prompt_states`, shared with the LVLM family). With activation
   checkpointing while training the cache is unavailable, and ``[prompt; completion]`` runs per candidate (media
   still encoded once).
3. **A frozen visual path, once per batch across models.** When every module between pixels and placeholder
   embeddings (Qwen's ``visual`` with its merger; LLaVA's vision tower, projector and ``image_newline``) has no
   trainable parameter, no LoRA layer and no active dropout, its features are kept on the batch under a
   fingerprint of those weights, and the reference pass reuses them.

**M-RoPE (Qwen2-VL / Qwen2.5-VL, arXiv 2409.12191 §2.1).** Prompt positions are the model's own
``get_rope_index`` on the left-padded prompts (3-D temporal/height/width ids for visual tokens, 1-D for text;
Qwen2.5-VL spaces temporal ids by ``tokens_per_second · second_per_grid_t``). A completion continues from the
prompt's last token position + 1 in all three axes, which is what ``get_rope_index`` gives the same tokens in
one full ``[prompt; completion]`` sequence (the prompt ends in text). Note that HF ``generate`` continues from
``max(position) + 1`` instead (``rope_deltas``); the two differ when a video's temporal ids exceed the text after
it, and scoring follows the full-sequence forward that training frameworks (TRL, ms-swift) use.

Log-probs are formed only at completion positions, in fp32, chunk by chunk (``causal_lm``'s chunked ``lm_head``).
Padding candidates (``candidate_mask`` False) never reach the model and score 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batches import EncoderCache
from ..hashing import tensor_hash
from ..models.vlm import QWEN, arch_of, unwrap_vlm
from ..types import CandidateBatch, Scores
from .candidate_states import _cache_disabled, _logit_transform, _validate_and_select
from .lvlm import _shareable, encoder_fingerprint, scores_from_states, shared_prompt_states

__all__ = ["VLMBatch", "VLMParts", "collate_media", "encode_media", "score_candidates", "score_candidates_naive",
           "vlm_parts"]


@dataclass
class VLMBatch(CandidateBatch):
    """B examples, each with its media and one chat prompt, and K text completions.

    Attributes:
        prompt_ids: ``[B, P]`` left-padded prompt ids holding the processor's placeholders (one per visual feature).
        prompt_mask: ``[B, P]`` 1 on real prompt tokens.
        completion_ids / completion_mask: ``[B, K, C]`` right-padded completions (pairs: 0 = chosen, 1 = rejected).
        media: per example, the processor's media tensors (``pixel_values``, ``image_grid_thw``,
            ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``, ``image_sizes``, ...) for that
            example alone; batched by :func:`collate_media` when encoded.
        candidate_mask, labels, meta, extras: as :class:`~mmalign.data.batches.TextBatch`.
        encoder_cache: frozen visual-path features shared by the passes that score this batch.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    media: list[dict[str, Tensor]] = field(default_factory=list)
    candidate_mask: Tensor | None = None
    labels: Tensor | None = None
    meta: list[dict] = field(default_factory=list)
    extras: dict[str, Tensor] = field(default_factory=dict)
    encoder_cache: EncoderCache = field(default_factory=EncoderCache, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def num_candidates(self) -> int:
        return self.completion_ids.shape[1]

    def to(self, device):
        out = super().to(device)
        out.media = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in m.items()} for m in self.media]
        return out

    def with_candidates(self, completion_ids: Tensor, completion_mask: Tensor, labels: Tensor | None) -> VLMBatch:
        """The same examples (media, prompts, encoder cache) with other candidates."""
        return VLMBatch(self.prompt_ids, self.prompt_mask, completion_ids, completion_mask, self.media, None, labels,
                        self.meta, self.extras, self.encoder_cache)


@dataclass
class VLMParts:
    """The pieces of a VLM (through DDP / compile / PEFT wrappers) that the scorer calls directly."""

    base: nn.Module
    arch: str
    decoder: nn.Module  # the language model (embeddings → final hidden states)
    embed: nn.Module
    lm_head: nn.Module
    logit_transform: Any
    visual: list[nn.Module]  # every module between pixels and placeholder embeddings
    newline: Tensor | None  # LLaVA's image_newline parameter (also on the visual path)
    image_token_id: int
    video_token_id: int


def vlm_parts(model: nn.Module) -> VLMParts:
    base = unwrap_vlm(model)
    arch = arch_of(getattr(base, "config", None))
    inner = base.model
    if arch in QWEN:
        visual, newline = [inner.visual], None
    else:
        visual = [inner.vision_tower, *([inner.vision_resampler] if hasattr(inner, "vision_resampler") else []),
                  inner.multi_modal_projector]
        newline = getattr(inner, "image_newline", None)
    cfg = base.config
    image = getattr(cfg, "image_token_id", None)
    video = getattr(cfg, "video_token_id", None)
    return VLMParts(base, arch, inner.language_model, inner.get_input_embeddings(), base.get_output_embeddings(),
                    _logit_transform(cfg), visual, newline,
                    int(image if image is not None else cfg.image_token_index),
                    int(video if video is not None else cfg.video_token_index))


# -- media ----------------------------------------------------------------------------------------------------


def collate_media(media: list[dict[str, Tensor]]) -> dict[str, Any]:
    """Per-example processor outputs → one batch, in example order (the order of the placeholders).

    Flattened patch tensors (Qwen ``pixel_values`` ``[patches, D]``) and per-medium rows (grids, sizes, counts) are
    concatenated; LLaVA's anyres ``pixel_values`` ``[n, tiles, C, H, W]`` are padded along ``tiles`` (the model
    reads only each image's own tiles); LLaVA videos ``[n, frames, C, H, W]`` stay a list (frame counts differ)."""
    keys = sorted({k for m in media for k in m})
    out: dict[str, Any] = {}
    for key in keys:
        values = [torch.as_tensor(m[key]) for m in media if m.get(key) is not None]
        if not values:
            continue
        if key == "pixel_values_videos" and values[0].dim() == 5:
            out[key] = [v for t in values for v in t]
        elif key == "pixel_values" and values[0].dim() == 5:
            tiles = max(v.shape[1] for v in values)
            out[key] = torch.cat([F.pad(v, (0, 0, 0, 0, 0, 0, 0, tiles - v.shape[1])) for v in values])
        else:
            out[key] = torch.cat([v.reshape(-1) if v.dim() == 0 else v for v in values])
    return out


def _visual_shareable(parts: VLMParts) -> bool:
    return all(_shareable(m) for m in parts.visual) and (parts.newline is None or not parts.newline.requires_grad)


def _flat(pooled: Any, dim: int) -> Tensor:
    """Pooled features (a tensor, or a tuple/list per medium) → ``[N, D]`` in the models' scatter order."""
    if torch.is_tensor(pooled):
        return pooled.reshape(-1, dim)
    return torch.cat([p.reshape(-1, dim) for p in pooled])


def _encode(parts: VLMParts, m: dict[str, Any]) -> tuple[Tensor | None, Tensor | None]:
    inner, cfg, dim = parts.base.model, parts.base.config, parts.embed.embedding_dim
    image = video = None
    if parts.arch in QWEN:
        if m.get("pixel_values") is not None:
            image = _flat(inner.get_image_features(m["pixel_values"], m["image_grid_thw"], return_dict=True)
                          .pooler_output, dim)
        if m.get("pixel_values_videos") is not None:
            video = _flat(inner.get_video_features(m["pixel_values_videos"], m["video_grid_thw"], return_dict=True)
                          .pooler_output, dim)
        return image, video
    select = {"vision_feature_layer": cfg.vision_feature_layer,
              "vision_feature_select_strategy": cfg.vision_feature_select_strategy}
    if m.get("pixel_values") is not None:
        extra = {"batch_num_images": m["batch_num_images"]} if "batch_num_images" in m else {}
        image = _flat(inner.get_image_features(m["pixel_values"], m["image_sizes"], **select, **extra,
                                               return_dict=True).pooler_output, dim)
    if m.get("pixel_values_videos") is not None:
        videos, feats = m["pixel_values_videos"], {}
        for shape in dict.fromkeys(tuple(v.shape) for v in videos):  # one call per frame count
            idx = [i for i, v in enumerate(videos) if tuple(v.shape) == shape]
            pooled = inner.get_video_features(torch.stack([videos[i] for i in idx]), **select,
                                              return_dict=True).pooler_output
            feats.update({i: p.reshape(-1, dim) for i, p in zip(idx, pooled, strict=True)})
        video = torch.cat([feats[i] for i in range(len(videos))])
    return image, video


def encode_media(parts: VLMParts, media: list[dict[str, Tensor]], cache: EncoderCache | None = None
                 ) -> tuple[Tensor | None, Tensor | None]:
    """``(image [Ni, D], video [Nv, D])`` placeholder embeddings of a batch's media (None where it has none):
    one visual pass per batch, and none when ``cache`` holds it for the same frozen visual weights."""
    batched = collate_media(media)
    if not batched:
        return None, None
    if cache is not None and _visual_shareable(parts):
        key = "vlm:" + "|".join(encoder_fingerprint(m) for m in parts.visual) + \
            ("" if parts.newline is None else tensor_hash([parts.newline.detach()]))
        if key + "/image" not in cache.entries:
            with torch.no_grad():
                image, video = _encode(parts, batched)
            cache.entries[key + "/image"], cache.entries[key + "/video"] = image, video
            cache.encoder_calls += 1
        return cache.entries[key + "/image"], cache.entries[key + "/video"]
    if cache is not None:
        cache.encoder_calls += 1
    return _encode(parts, batched)


def _prompt_embeds(parts: VLMParts, ids: Tensor, image: Tensor | None, video: Tensor | None) -> Tensor:
    embeds = parts.embed(ids)
    for name, token, feats in (("image", parts.image_token_id, image), ("video", parts.video_token_id, video)):
        slots = ids == token
        n = int(slots.sum())
        have = 0 if feats is None else feats.shape[0]
        if n != have:
            raise ValueError(f"VLM adapter: the prompts hold {n} {name} placeholder tokens but the media give {have} "
                             f"{name} features; build prompts with the model's own processor (the VLM family does)")
        if n:
            embeds = embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))
    return embeds


def _positions(parts: VLMParts, ids: Tensor, mask: Tensor, media: list[dict]) -> Tensor:
    """Prompt position ids: ``[3, B, P]`` from the model's own ``get_rope_index`` (Qwen), else ``[B, P]``."""
    if parts.arch not in QWEN:
        return (mask.cumsum(-1) - 1).clamp(min=0)
    m = collate_media(media)
    types = (ids == parts.image_token_id).int() + 2 * (ids == parts.video_token_id).int()
    extra = {"second_per_grid_ts": m["second_per_grid_ts"]} if "second_per_grid_ts" in m else {}
    pos, _ = parts.base.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=m.get("image_grid_thw"),
                                             video_grid_thw=m.get("video_grid_thw"), attention_mask=mask, **extra)
    return pos


# -- scoring ----------------------------------------------------------------------------------------------------


def _candidate_states(parts: VLMParts, batch: VLMBatch, rows: Tensor, ex_idx: Tensor, share_prompt: bool):
    prompt_mask = batch.prompt_mask.long()
    keep = prompt_mask.any(0).nonzero()
    first = int(keep[0]) if keep.numel() else 0  # columns that are padding in every prompt
    prompt_ids, prompt_mask = batch.prompt_ids[:, first:], prompt_mask[:, first:]
    comp_mask = batch.completion_mask.flatten(0, 1)[rows].long()
    width = max(int(comp_mask.sum(-1).max()), 1)
    comp_ids, comp_mask = batch.completion_ids.flatten(0, 1)[rows, :width], comp_mask[:, :width]
    sel = comp_mask.bool()
    if bool(((comp_ids == parts.image_token_id) | (comp_ids == parts.video_token_id))[sel].any()):
        raise ValueError("VLM adapter: a completion holds an image/video placeholder token; media belong in the "
                         "prompt")
    image, video = encode_media(parts, batch.media, batch.encoder_cache)
    embeds = _prompt_embeds(parts, prompt_ids, image, video)
    prompt_pos = _positions(parts, prompt_ids, prompt_mask, batch.media)
    # the last prompt column is a real token of every prompt (left padding): continue from it in every axis
    comp_pos = prompt_pos[..., ex_idx, -1:] + 1 + torch.arange(width, device=comp_ids.device)
    states = shared_prompt_states(parts.decoder, parts.embed, embeds, prompt_mask, prompt_pos, comp_ids, comp_mask,
                                  comp_pos, ex_idx, share_prompt and not _cache_disabled(parts))
    return states, comp_ids, comp_mask


def score_candidates(model: nn.Module, batch: VLMBatch, *, share_prompt: bool = True, chunk_size: int = 1024,
                     return_token_logps: bool = True) -> Scores:
    """Score every candidate completion of ``batch`` given its example's media and prompt.

    Args:
        model: a model of :data:`mmalign.models.vlm.ARCHS` (optionally under PEFT / DDP).
        batch: a :class:`VLMBatch` (left-padded prompts with the processor's placeholders).
        share_prompt: run media + prompt once per example and reuse its KV cache for the K candidates.
        chunk_size: most completion positions pushed through ``lm_head`` at once.

    Returns:
        :class:`Scores`: ``logps`` ``[B, K]`` (summed completion log-probs, fp32), ``token_logps`` and
        ``token_mask`` ``[B, K, C]``, ``lengths`` ``[B, K]``; padding candidates score exactly 0.
    """
    if chunk_size < 1:
        raise ValueError(f"score_candidates: chunk_size={chunk_size} must be >= 1 (typical: 512-4096)")
    if len(batch.media) != batch.batch_size:
        raise ValueError(f"VLMBatch: media has {len(batch.media)} entries for {batch.batch_size} examples (one dict "
                         "per example, empty for a text-only prompt)")
    parts = vlm_parts(model)
    return scores_from_states(parts, batch, _candidate_states, share_prompt=share_prompt, chunk_size=chunk_size,
                              return_token_logps=return_token_logps)


def score_candidates_naive(model: nn.Module, batch: VLMBatch) -> Scores:
    """Reference implementation for tests: one ``[media + prompt; completion]`` row per candidate through the
    model's own forward (its own placeholder scatter and M-RoPE index), full logits, ``log_softmax``, ``gather``."""
    parts = vlm_parts(model)
    rows, ex_idx, token_mask = _validate_and_select(batch)
    B, K, C = batch.completion_ids.shape
    flat = torch.zeros(B * K, C, dtype=torch.float32, device=batch.completion_ids.device)
    comp_ids, comp_mask = batch.completion_ids.flatten(0, 1), batch.completion_mask.flatten(0, 1).bool()
    for row, ex in zip(rows.tolist(), ex_idx.tolist(), strict=True):
        prompt = batch.prompt_ids[ex][batch.prompt_mask[ex].bool()]
        completion = comp_ids[row][comp_mask[row]]
        ids = torch.cat([prompt, completion])[None]
        extra = dict(batch.media[ex])
        if parts.arch in QWEN:
            extra["mm_token_type_ids"] = (ids == parts.image_token_id).int() + 2 * (ids == parts.video_token_id).int()
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **extra).logits.float()
        p, c = len(prompt), len(completion)
        flat[row, :c] = logits[0, p - 1:p - 1 + c].log_softmax(-1).gather(-1, completion[:, None]).squeeze(-1)
    token_logps = flat.view(B, K, C)
    return Scores(logps=token_logps.sum(-1), token_logps=token_logps, token_mask=token_mask,
                  lengths=token_mask.sum(-1))
