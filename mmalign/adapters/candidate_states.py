"""Hidden states of the scored candidates: model unwrapping, batch validation and the prefix-sharing pass.

This is the decoder side of :mod:`mmalign.adapters.causal_lm` (points 1 and 3 of its docstring, plus the
fallback): reaching the decoder and ``lm_head`` through DDP / ValueHeadModel / PEFT wrappers, checking the
left/right padding layout the prefix trick relies on, and running the prompt once with ``use_cache=True``
and the completions on top of the gathered KV cache (or the concatenated ``[N, P+C]`` sequences when the cache
is unavailable). It ends at the final hidden states; turning them into log-probs (the chunked ``lm_head``
and its fused autograd function) and per-token KL stays in ``causal_lm``. It lives apart so that each file
holds one of the two memory tricks; ``causal_lm`` re-exports :func:`unwrap_causal_lm`, so existing imports
keep working.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batches import TextBatch


@dataclass
class _Parts:
    """The pieces of a (possibly wrapped) causal LM that the adapter calls directly."""

    lm: nn.Module  # the transformers causal LM; LoRA layers, if any, are injected inside it
    decoder: nn.Module
    lm_head: nn.Module
    logit_transform: Callable[[Tensor], Tensor] | None
    v_head: nn.Module | None
    peft: nn.Module | None  # the PeftModel, for disable_adapter()


def unwrap_causal_lm(model: nn.Module) -> _Parts:
    """Reach the decoder, ``lm_head`` and optional value head through DDP, ValueHeadModel and PEFT wrappers.

    PEFT's LoRA injects its layers into the base model in place, so calling the base model's submodules
    applies the adapter, and ``with peft_model.disable_adapter():`` turns it off for them too.
    """
    v_head = peft = None
    while True:  # DDP / accelerate wrappers, then torch.compile's OptimizedModule
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
    if hasattr(model, "v_head") and hasattr(model, "base"):  # mmalign.models.text.ValueHeadModel
        v_head, model = model.v_head, model.base
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        active = model.peft_config[model.active_adapter]
        if getattr(active, "is_prompt_learning", False):
            raise NotImplementedError(
                f"causal_lm adapter: PEFT method {active.peft_type} (prompt learning) adds virtual "
                "tokens the adapter cannot see; use LoRA-style adapters (mmalign.models.text.apply_lora)"
            )
        peft, model = model, model.get_base_model()
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise TypeError(
            f"causal_lm adapter: {type(model).__name__} has no lm_head (get_output_embeddings is None)"
        )
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return _Parts(model, decoder, model.get_output_embeddings(), _logit_transform(model.config), v_head, peft)


def _logit_transform(config) -> Callable[[Tensor], Tensor] | None:
    """The post-``lm_head`` step some families apply in their forward, replayed on each chunk."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    scale = getattr(config, "logit_scale", None)  # Cohere multiplies
    divide = getattr(config, "logits_scaling", None)  # Granite divides
    if not (cap or scale or divide):
        return None

    def transform(logits: Tensor) -> Tensor:
        if scale:
            logits = logits * scale
        if divide:
            logits = logits / divide
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def _scatter_rows(t: Tensor, sel: Tensor, rows: Tensor, B: int, K: int, C: int) -> Tensor:
    """``[N, C', ...]`` per-selected-candidate values -> ``[B, K, C, ...]``, zero at masked tokens and padding
    candidates (differentiable)."""
    t = t * sel.view(*sel.shape, *([1] * (t.dim() - 2))).to(t.dtype)
    t = F.pad(t.movedim(1, -1), (0, C - t.shape[1])).movedim(-1, 1)
    out = t.new_zeros(B * K, *t.shape[1:])
    return out.index_copy(0, rows, t).view(B, K, *t.shape[1:])


def _validate_and_select(batch: TextBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Check the padding layout the prefix trick relies on; return the scored rows of the flattened
    ``[B*K]`` candidates, their example index, and the ``[B, K, C]`` bool token mask."""
    B, P = batch.prompt_ids.shape
    if batch.completion_ids.dim() != 3 or batch.completion_ids.shape[0] != B:
        raise ValueError(
            f"TextBatch: completion_ids must be [B={B}, K, C], got {tuple(batch.completion_ids.shape)}; "
            "collate completions as a [B, K, C] tensor (K=1 for unpaired rows)"
        )
    B, K, C = batch.completion_ids.shape
    if tuple(batch.prompt_mask.shape) != (B, P) or tuple(batch.completion_mask.shape) != (B, K, C):
        raise ValueError(
            f"TextBatch: prompt_mask {tuple(batch.prompt_mask.shape)} / completion_mask "
            f"{tuple(batch.completion_mask.shape)} must match prompt_ids {(B, P)} / "
            f"completion_ids {(B, K, C)}"
        )
    prompt_mask = batch.prompt_mask.bool()
    bad = (prompt_mask[:, :-1] & ~prompt_mask[:, 1:]).any(-1)
    if bad.any():
        raise ValueError(
            f"TextBatch: prompt_mask of example {int(bad.nonzero()[0])} is not left-padded (a pad follows a "
            "real token); build prompts with tokenizer.padding_side='left'"
        )
    cand = torch.ones(B, K, dtype=torch.bool, device=batch.completion_mask.device)
    if batch.candidate_mask is not None:
        if tuple(batch.candidate_mask.shape) != (B, K):
            raise ValueError(
                f"TextBatch: candidate_mask has shape {tuple(batch.candidate_mask.shape)}, expected [B, K] = "
                f"{[B, K]} (one flag per candidate)"
            )
        cand = batch.candidate_mask.bool()
    comp_mask = batch.completion_mask.bool()
    # Padding candidates are never run, so whatever the collator left in their masks is fine.
    bad = (~comp_mask[..., :-1] & comp_mask[..., 1:]).any(-1).flatten() & cand.flatten()
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"TextBatch: completion_mask of example {row // K}, candidate {row % K} is not right-padded; "
            "completions must be contiguous real tokens followed by padding"
        )
    empty = cand.any(-1) & ~prompt_mask.any(-1)
    if empty.any():
        raise ValueError(
            f"TextBatch: example {int(empty.nonzero()[0])} has an empty prompt, so its first completion "
            "token has nothing to be predicted from; start prompts with the tokenizer's BOS token"
        )
    token_mask = comp_mask & cand[..., None]
    rows = cand.flatten().nonzero().squeeze(-1)
    return rows, torch.div(rows, K, rounding_mode="floor"), token_mask


def _candidate_states(
    parts: _Parts, batch: TextBatch, rows: Tensor, ex_idx: Tensor, share_prompt: bool, *, layers: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Final hidden states of the selected candidates.

    Returns ``states`` ``[N, C'+1, H]`` where ``states[:, j]`` has read the prompt and the first j completion
    tokens (so it predicts completion token j), plus the candidates' ids and mask ``[N, C']``, with ``C'``
    trimmed to the longest selected completion, and with ``layers`` every decoder layer's output at the same
    positions ``[N, C'+1, L, H]`` (else None).
    """
    prompt_mask = batch.prompt_mask.long()
    keep = prompt_mask.any(0).nonzero()
    first = int(keep[0]) if keep.numel() else 0  # drop columns that are padding for every prompt
    prompt_ids, prompt_mask = batch.prompt_ids[:, first:], prompt_mask[:, first:]
    comp_mask = batch.completion_mask.flatten(0, 1)[rows].long()
    width = max(int(comp_mask.sum(-1).max()), 1)
    comp_ids, comp_mask = batch.completion_ids.flatten(0, 1)[rows, :width], comp_mask[:, :width]
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    prompt_len = prompt_mask.sum(-1)
    comp_pos = prompt_len[ex_idx, None] + torch.arange(width, device=comp_ids.device)
    hs = {"output_hidden_states": True} if layers else {}

    if share_prompt and not _cache_disabled(parts):
        out = parts.decoder(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True,
            **hs,
        )
        cache = cache_of(out)
        if cache is not None and hasattr(cache, "batch_select_indices") and cache.get_seq_length() > 0:
            prompt_last = out.last_hidden_state[:, -1]
            prompt_layers = _layer_stack(out, layers, slice(-1, None))
            identity = torch.arange(prompt_ids.shape[0], device=ex_idx.device)
            if ex_idx.shape != identity.shape or not torch.equal(ex_idx, identity):
                cache.batch_select_indices(ex_idx)  # one cache row per candidate; gather keeps the graph
            out = parts.decoder(
                input_ids=comp_ids,
                attention_mask=torch.cat([prompt_mask[ex_idx], comp_mask], dim=1),
                position_ids=comp_pos,
                use_cache=True,
                **{cache_kwarg(parts.decoder): cache},
                **hs,
            )
            layer_states = None
            if layers:
                layer_states = torch.cat([prompt_layers[ex_idx], _layer_stack(out, layers, slice(None))], dim=1)
            states = torch.cat([prompt_last[ex_idx, None], out.last_hidden_state], dim=1)
            return states, comp_ids, comp_mask, layer_states
    # Concatenated path: [left-padded prompt ; right-padded completion] per candidate.
    P = prompt_ids.shape[1]
    out = parts.decoder(
        input_ids=torch.cat([prompt_ids[ex_idx], comp_ids], dim=1),
        attention_mask=torch.cat([prompt_mask[ex_idx], comp_mask], dim=1),
        position_ids=torch.cat([prompt_pos[ex_idx], comp_pos], dim=1),
        use_cache=False,
        **hs,
    )
    return out.last_hidden_state[:, P - 1 :], comp_ids, comp_mask, _layer_stack(out, layers, slice(P - 1, None))


def cache_kwarg(decoder: nn.Module) -> str:
    """The decoder's KV-cache argument: transformers 5.x names it ``cache``; passing ``past_key_values`` there
    still works but emits a FutureWarning (removal announced for 5.40) on every call. Older decoders: the old name."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def cache_of(out) -> object | None:
    """The KV cache of a decoder output: ``out.cache`` in transformers 5.x (reading ``out.past_key_values`` there
    logs the deprecation warning), ``past_key_values`` before."""
    if "cache" in getattr(out, "__dataclass_fields__", {}):
        return out.cache
    return getattr(out, "past_key_values", None)


def _layer_stack(out, layers: bool, cols: slice) -> Tensor | None:
    """``[N, T, L, H]``: the decoder layers' outputs (HF ``hidden_states[1:]``, embeddings dropped) at ``cols``."""
    if not layers:
        return None
    hidden = getattr(out, "hidden_states", None)
    if not hidden:
        raise ValueError("causal_lm adapter: the decoder returned no hidden_states for output_hidden_states=True; "
                         "per-layer activations (SparsePO masks) need a transformers decoder that supports it")
    return torch.stack([h[:, cols] for h in hidden[1:]], dim=2)


def _cache_disabled(parts: _Parts) -> bool:
    """True when HF would drop ``past_key_values`` inside the layers (activation checkpointing while
    training)."""
    return parts.decoder.training and any(
        getattr(m, "gradient_checkpointing", False) for m in parts.decoder.modules()
    )
