"""Vision-language LM adapter: ``(model, batch) -> Scores`` for LLaVA and the encoder-free :class:`PatchLVLM`.

Two scorers, both in the losses' units (summed completion log-probs, per-token log-probs, masks, lengths):

- :func:`score_candidates`: B examples × K candidate completions, one image per example
  (:class:`~mmalign.data.batches.VisionTextBatch`), what every preference loss of the METHODS table reads.
- :func:`score_captions`: PRIOR's caption scorer (a ``TextBatch`` with K=1 and ``extras["pixel_values"]``),
  one full ``[prompt; caption]`` forward.

What :func:`score_candidates` shares, instead of TRL's ``[image+prompt+chosen ; image+prompt+rejected]`` rows
(which run the vision tower once per candidate, twice more for the reference):

1. **The image, once per example.** The vision tower + projector (LLaVA) or the patch embedding (PatchLVLM)
   runs on the ``[B, 3, H, W]`` pixels once; its ``[B, N, D]`` features are scattered into the prompt's
   ``<image>`` placeholders (LLaVA's ``masked_scatter`` rule) before any candidate is looked at.
2. **The prompt (image tokens included), once per example.** Prompts are left-padded, so the decoder runs
   them once with ``use_cache=True``; the KV cache is gathered to one row per candidate and the K completions
   run on top of it (as :mod:`mmalign.adapters.causal_lm` does for text). When the cache is unavailable
   (activation checkpointing while training) the ``[prompt; completion]`` embeddings are concatenated per
   candidate: the image features are still computed once per example, only the decoder repeats the prompt.
3. **A frozen image encoder, once per batch across models.** When the encoder (LLaVA's vision tower before the
   projector; PatchLVLM's patch embedding) has no trainable parameter, no LoRA layer and no active dropout, its
   output is kept on the batch under a fingerprint of its weights, so the reference pass (a frozen copy, a
   moving or adapter-disabled reference with the same frozen encoder) reuses the policy's encoding.

Log-probs are formed only at completion positions, in fp32, chunk by chunk (``causal_lm``'s chunked
``lm_head``). Padding candidates (``candidate_mask`` False) never reach the model and score 0.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batches import EncoderCache, TextBatch, VisionTextBatch
from ..hashing import tensor_hash
from ..models.lvlm import PatchLVLM, unwrap_lvlm
from ..types import Scores
from .candidate_states import _cache_disabled, _logit_transform, _validate_and_select, cache_kwarg, cache_of
from .causal_lm import _chunked_target_logps


@dataclass
class LVLMParts:
    """The pieces of an LVLM (through DDP / compile / PEFT wrappers) that the scorer calls directly."""

    base: nn.Module  # LlavaForConditionalGeneration or PatchLVLM
    decoder: nn.Module  # the language model's decoder (embeddings → final hidden states)
    embed: nn.Module  # token embeddings
    lm_head: nn.Module
    logit_transform: Any
    encoder: nn.Module  # the image encoder whose output can be shared between models when frozen
    image_token_id: int

    def encode(self, pixel_values: Tensor) -> Tensor:
        """The encoder's output for ``[B, C, H, W]`` pixels (before any trainable projector)."""
        if isinstance(self.base, PatchLVLM):
            return self.base.image_features(pixel_values)
        cfg = self.base.config
        tower = self.encoder
        out = tower(pixel_values.to(tower.dtype), output_hidden_states=True, return_dict=True)
        layers = cfg.vision_feature_layer
        picked = [out.hidden_states[i] for i in (layers if isinstance(layers, (list, tuple)) else [layers])]
        if cfg.vision_feature_select_strategy == "default":
            picked = [h[:, 1:] for h in picked]  # drop CLS
        return torch.cat(picked, dim=-1)

    def project(self, encoded: Tensor) -> Tensor:
        """Encoder output → ``[B, N, D]`` LM embeddings for the placeholders."""
        if isinstance(self.base, PatchLVLM):
            return encoded
        return self.base.model.multi_modal_projector(encoded)


def lvlm_parts(model: nn.Module) -> LVLMParts:
    """Reach decoder, embeddings, ``lm_head`` and the image encoder of either LVLM kind."""
    base = unwrap_lvlm(model)
    if isinstance(base, PatchLVLM):
        lm = base.language_model
        decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        return LVLMParts(base, decoder, lm.get_input_embeddings(), lm.get_output_embeddings(),
                         _logit_transform(lm.config), base.patch_embed, base.image_token_id)
    if not hasattr(base, "model") or not hasattr(base.model, "vision_tower"):
        raise TypeError(f"LVLM adapter: {type(base).__name__} is neither a LlavaForConditionalGeneration nor a "
                        "PatchLVLM (mmalign.models.lvlm.load_lvlm builds both)")
    cfg = base.config
    token = getattr(cfg, "image_token_id", None)
    token = getattr(cfg, "image_token_index", None) if token is None else token
    return LVLMParts(base, base.model.language_model, base.model.get_input_embeddings(),
                     base.get_output_embeddings(), _logit_transform(cfg), base.model.vision_tower, int(token))


# -- the frozen-encoder cache (point 3) ------------------------------------------------------------------

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _shareable(encoder: nn.Module) -> bool:
    """Frozen, no LoRA inside, deterministic: its output depends on the pixels and the weights only."""
    if any(p.requires_grad for p in encoder.parameters()):
        return False
    for m in encoder.modules():
        if hasattr(m, "lora_A") or (isinstance(m, nn.Dropout) and m.p > 0 and m.training):
            return False
    cfg = getattr(encoder, "config", None)
    return not (encoder.training and any(float(getattr(cfg, k, 0) or 0) > 0 for k in ("attention_dropout",
                                                                                       "dropout")))


def encoder_fingerprint(encoder: nn.Module) -> str:
    """sha256 of the encoder's weights, computed once per module object (frozen weights do not change)."""
    fp = _FINGERPRINTS.get(encoder)
    if fp is None:
        fp = tensor_hash(v for _, v in sorted(encoder.state_dict().items()))
        _FINGERPRINTS[encoder] = fp
    return fp


def image_features(parts: LVLMParts, pixel_values: Tensor, cache: EncoderCache | None = None) -> Tensor:
    """``[B, N, D]`` placeholder embeddings for ``[B, C, H, W]`` pixels: the encoder runs once per example
    (per batch), and not at all when ``cache`` already holds its output for the same frozen weights."""
    if cache is not None and _shareable(parts.encoder):
        key = encoder_fingerprint(parts.encoder)
        encoded = cache.entries.get(key)
        if encoded is not None:
            encoded = encoded.to(pixel_values.device)
        else:
            with torch.no_grad():
                encoded = parts.encode(pixel_values)
            cache.entries[key] = encoded
            cache.encoder_calls += 1
    else:
        encoded = parts.encode(pixel_values)
        if cache is not None:
            cache.encoder_calls += 1
    return parts.project(encoded)


# -- scoring ----------------------------------------------------------------------------------------------


def _prompt_embeds(parts: LVLMParts, prompt_ids: Tensor, feats: Tensor) -> Tensor:
    embeds = parts.embed(prompt_ids)
    slots = prompt_ids == parts.image_token_id
    counts = slots.sum(-1)
    if bool((counts != feats.shape[1]).any()):
        bad = int((counts != feats.shape[1]).nonzero()[0])
        raise ValueError(f"LVLM adapter: prompt {bad} holds {int(counts[bad])} <image> placeholders but its image "
                         f"gives {feats.shape[1]} features; build prompts with the model's LVLMInputs "
                         "(num_image_tokens placeholders per image)")
    return embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))


def _candidate_states(parts: LVLMParts, batch: VisionTextBatch, rows: Tensor, ex_idx: Tensor,
                      share_prompt: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``states [N, C'+1, H]`` (``states[:, j]`` predicts completion token j), ids and mask ``[N, C']``."""
    prompt_mask = batch.prompt_mask.long()
    keep = prompt_mask.any(0).nonzero()
    first = int(keep[0]) if keep.numel() else 0  # columns that are padding in every prompt
    prompt_ids, prompt_mask = batch.prompt_ids[:, first:], prompt_mask[:, first:]
    comp_mask = batch.completion_mask.flatten(0, 1)[rows].long()
    width = max(int(comp_mask.sum(-1).max()), 1)
    comp_ids, comp_mask = batch.completion_ids.flatten(0, 1)[rows, :width], comp_mask[:, :width]
    if bool((comp_ids[comp_mask.bool()] == parts.image_token_id).any()):
        raise ValueError("LVLM adapter: a completion holds the <image> placeholder token; images belong in the "
                         "prompt (one per example)")
    feats = image_features(parts, batch.pixel_values, batch.encoder_cache)
    embeds = _prompt_embeds(parts, prompt_ids, feats)
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    comp_pos = prompt_mask.sum(-1)[ex_idx, None] + torch.arange(width, device=comp_ids.device)
    states = shared_prompt_states(parts.decoder, parts.embed, embeds, prompt_mask, prompt_pos, comp_ids, comp_mask,
                                  comp_pos, ex_idx, share_prompt and not _cache_disabled(parts))
    return states, comp_ids, comp_mask


def shared_prompt_states(decoder: nn.Module, embed: nn.Module, prompt_embeds: Tensor, prompt_mask: Tensor,
                         prompt_pos: Tensor, comp_ids: Tensor, comp_mask: Tensor, comp_pos: Tensor, ex_idx: Tensor,
                         share_prompt: bool) -> Tensor:
    """Final hidden states ``[N, C'+1, H]`` of N candidates (``states[:, j]`` predicts completion token j) after
    their example's prompt, given as embeddings (media features already in place), used by the LVLM and the VLM
    families.

    ``prompt_embeds`` ``[B, P, H]`` / ``prompt_mask`` ``[B, P]`` (left-padded); ``prompt_pos`` ``[..., B, P]`` and
    ``comp_pos`` ``[..., N, C']`` position ids (``[3, ...]`` for M-RoPE); ``ex_idx`` ``[N]`` each candidate's
    example. ``share_prompt``: the decoder runs the prompts once with ``use_cache=True`` and the completions on the
    KV cache gathered to one row per candidate (the gather keeps the graph); otherwise, or when the decoder gives
    no cache, ``[prompt; completion]`` is run per candidate."""
    if share_prompt:
        out = decoder(inputs_embeds=prompt_embeds, attention_mask=prompt_mask, position_ids=prompt_pos,
                      use_cache=True)
        cache = cache_of(out)
        if cache is not None and hasattr(cache, "batch_select_indices") and cache.get_seq_length() > 0:
            prompt_last = out.last_hidden_state[:, -1]
            if ex_idx.shape[0] != prompt_embeds.shape[0] or not torch.equal(ex_idx, torch.arange(
                    prompt_embeds.shape[0], device=ex_idx.device)):
                cache.batch_select_indices(ex_idx)  # one cache row per candidate; the gather keeps the graph
            out = decoder(input_ids=comp_ids, attention_mask=torch.cat([prompt_mask[ex_idx], comp_mask], 1),
                          position_ids=comp_pos, use_cache=True, **{cache_kwarg(decoder): cache})
            return torch.cat([prompt_last[ex_idx, None], out.last_hidden_state], 1)
    P = prompt_embeds.shape[1]
    out = decoder(inputs_embeds=torch.cat([prompt_embeds[ex_idx], embed(comp_ids)], 1),
                  attention_mask=torch.cat([prompt_mask[ex_idx], comp_mask], 1),
                  position_ids=torch.cat([prompt_pos.index_select(-2, ex_idx), comp_pos], -1), use_cache=False)
    return out.last_hidden_state[:, P - 1:]


def score_candidates(model: nn.Module, batch: VisionTextBatch, *, share_prompt: bool = True,
                     chunk_size: int = 1024, return_token_logps: bool = True) -> Scores:
    """Score every candidate completion of ``batch`` given its example's image and prompt.

    Args:
        model: a ``LlavaForConditionalGeneration`` or :class:`PatchLVLM` (optionally under PEFT / DDP).
        batch: left-padded prompts holding ``num_image_tokens`` ``<image>`` placeholders each, right-padded
            completions ``[B, K, C]``, ``pixel_values`` ``[B, 3, H, W]`` (one image per example).
        share_prompt: run image + prompt once per example and reuse its KV cache for the K candidates.
        chunk_size: most completion positions pushed through ``lm_head`` at once.

    Returns:
        :class:`Scores`: ``logps`` ``[B, K]`` (summed completion log-probs, fp32), ``token_logps`` and
        ``token_mask`` ``[B, K, C]``, ``lengths`` ``[B, K]``; padding candidates score exactly 0.
    """
    if chunk_size < 1:
        raise ValueError(f"score_candidates: chunk_size={chunk_size} must be >= 1 (typical: 512-4096)")
    parts = lvlm_parts(model)
    if batch.pixel_values is None or batch.pixel_values.dim() != 4 or \
            batch.pixel_values.shape[0] != batch.prompt_ids.shape[0]:
        shape = None if batch.pixel_values is None else tuple(batch.pixel_values.shape)
        raise ValueError(f"score_candidates: pixel_values {shape} must be [B={batch.prompt_ids.shape[0]}, C, H, W] "
                         "(one image per example)")
    return scores_from_states(parts, batch, _candidate_states, share_prompt=share_prompt, chunk_size=chunk_size,
                              return_token_logps=return_token_logps)


def scores_from_states(parts, batch, candidate_states, *, share_prompt: bool, chunk_size: int,
                       return_token_logps: bool) -> Scores:
    """Scores of a vision batch's real candidates (padding candidates score 0) from ``candidate_states(parts,
    batch, rows, ex_idx, share_prompt) -> (hidden states, completion ids, completion mask)``: per-token log-probs
    through the chunked LM head (never ``[B, T, V]`` logits). Shared by the LVLM and VLM families, whose media and
    prompt passes differ but whose completion scoring is the same."""
    rows, ex_idx, token_mask = _validate_and_select(batch)
    B, K, C = batch.completion_ids.shape
    flat = torch.zeros(B * K, C, dtype=torch.float32, device=batch.completion_ids.device)
    if rows.numel() > 0:
        states, comp_ids, comp_mask = candidate_states(parts, batch, rows, ex_idx, share_prompt)
        sel = comp_mask.bool()
        picked = _chunked_target_logps(states[:, :-1][sel], comp_ids[sel], parts.lm_head, parts.logit_transform,
                                       chunk_size)
        row_tokens = torch.zeros(comp_ids.shape, dtype=torch.float32, device=flat.device).masked_scatter(sel, picked)
        flat = flat.index_copy(0, rows, F.pad(row_tokens, (0, C - row_tokens.shape[1])))
    token_logps = flat.view(B, K, C)
    return Scores(logps=token_logps.sum(-1), token_logps=token_logps if return_token_logps else None,
                  token_mask=token_mask, lengths=token_mask.sum(-1))


def score_candidates_naive(model: nn.Module, batch: VisionTextBatch) -> Scores:
    """Reference implementation for tests: one ``[image+prompt; completion]`` row per candidate through the
    model's own forward (its vision tower runs once per candidate), full logits, ``log_softmax``, ``gather``."""
    rows, ex_idx, token_mask = _validate_and_select(batch)
    B, K, C = batch.completion_ids.shape
    flat = torch.zeros(B * K, C, dtype=torch.float32, device=batch.completion_ids.device)
    comp_ids, comp_mask = batch.completion_ids.flatten(0, 1), batch.completion_mask.flatten(0, 1).bool()
    for row, ex in zip(rows.tolist(), ex_idx.tolist(), strict=True):
        prompt = batch.prompt_ids[ex][batch.prompt_mask[ex].bool()]
        completion = comp_ids[row][comp_mask[row]]
        ids = torch.cat([prompt, completion])[None]
        logits = model(input_ids=ids, pixel_values=batch.pixel_values[ex:ex + 1],
                       attention_mask=torch.ones_like(ids)).logits.float()
        p, c = len(prompt), len(completion)
        picked = logits[0, p - 1:p - 1 + c].log_softmax(-1).gather(-1, completion[:, None]).squeeze(-1)
        flat[row, :c] = picked
    token_logps = flat.view(B, K, C)
    return Scores(logps=token_logps.sum(-1), token_logps=token_logps, token_mask=token_mask,
                  lengths=token_mask.sum(-1))


# -- PRIOR's caption scorer (moved from mmalign.models.lvlm) ---------------------------------------------


def lvlm_hidden_states(model: nn.Module, input_ids: Tensor, pixel_values: Tensor, attention_mask: Tensor,
                       position_ids: Tensor) -> tuple[Tensor, nn.Module]:
    """Final hidden states ``[B, L, H]`` and the ``lm_head`` of either LVLM kind (through DDP/PEFT)."""
    base = unwrap_lvlm(model)
    if isinstance(base, PatchLVLM):
        return base.hidden_states(input_ids, pixel_values, attention_mask, position_ids), \
            base.language_model.get_output_embeddings()
    dtype = base.model.vision_tower.dtype
    out = base.model(input_ids=input_ids, pixel_values=pixel_values.to(dtype), attention_mask=attention_mask,
                     position_ids=position_ids, use_cache=False)
    return out.last_hidden_state, base.get_output_embeddings()


def score_captions(model: nn.Module, batch: TextBatch) -> Scores:
    """Per-token log-probs of the caption (candidate 0 of ``batch``) given the image and the prompt.

    ``batch``: left-padded prompts that already hold the image placeholders, right-padded captions ``[B, 1, C]``,
    ``extras["pixel_values"]`` ``[B, C, H, W]``. Positions count real tokens only (left pads do not shift
    RoPE). Logits are formed only at caption positions, in fp32 (``[tokens, V]``, not ``[B, L, V]``).
    """
    prompt_ids, comp_ids = batch.prompt_ids, batch.completion_ids[:, 0]
    comp_mask = batch.completion_mask[:, 0].bool()
    ids = torch.cat([prompt_ids, comp_ids], 1)
    mask = torch.cat([batch.prompt_mask.long(), comp_mask.long()], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden, head = lvlm_hidden_states(model, ids, batch.extras["pixel_values"], mask, pos)
    P = prompt_ids.shape[1]
    states = hidden[:, P - 1 : -1][comp_mask]  # state at t predicts token t+1
    logits = head(states).float()
    picked = logits.gather(-1, comp_ids[comp_mask][:, None]).squeeze(-1) - logits.logsumexp(-1)
    token_logps = torch.zeros(comp_ids.shape, dtype=torch.float32, device=comp_ids.device)
    token_logps = token_logps.masked_scatter(comp_mask, picked)
    return Scores(logps=token_logps.sum(-1, keepdim=True), token_logps=token_logps[:, None],
                  token_mask=comp_mask[:, None], lengths=comp_mask.sum(-1, keepdim=True))
