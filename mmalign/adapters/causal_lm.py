"""Causal-LM adapter: ``(model, TextBatch) -> Scores`` with a shared prompt pass and chunked log-probs.

How :func:`score_batch` differs from the usual ``[prompt; chosen] + [prompt; rejected]`` forward (TRL):

1. **Prefix sharing.** Prompts are left-padded, so all of them end at column ``P-1``. They run once
   (``use_cache=True``); the KV cache is then gathered to one row per scored candidate and the ``[N, C]``
   completions run on top of it with explicit ``position_ids`` (counted over real tokens, so left pads do not
   shift RoPE) and a ``[prompt_mask; completion_mask]`` attention mask. The result equals the concatenated
   forward; the prompt is encoded once instead of K times, and gradients flow through both passes.
2. **Chunked log-probs.** Only completion positions need logits. Their hidden states are gathered and pushed
   through ``lm_head`` -> ``logsumexp``/``gather`` in chunks of ``chunk_size`` rows, so neither forward nor
   backward ever holds more than one ``[chunk, V]`` block. A plain ``nn.Linear`` head runs a fused autograd
   function (:class:`_LinearTargetLogps`: forward keeps ``logsumexp`` per row; backward recomputes the chunk's
   logits once and forms ``grad * (onehot - softmax)`` in place); other heads (LoRA on ``lm_head``, quantized,
   hooked) are called as modules with each chunk under ``torch.utils.checkpoint``. TRL 1.16 does the same
   tiling (``add_fused_lm_head``) but, off Triton devices, over every position of the ``[prompt; completion]``
   sequences, prompt included.
3. **Padding candidates are skipped** (``candidate_mask`` False): they never reach the model and score 0.

Fallback: when the model cannot return a KV cache, or activation checkpointing is on while training (HF then
drops the cache inside each layer), the adapter runs the concatenated ``[N, P+C]`` sequences instead, still
with chunked log-probs. Results are identical; only the prompt is recomputed per candidate.

Not supported yet: prompt-learning PEFT (prefix/prompt tuning), extra model inputs (pixel values for VLMs),
FSDP full-shard (the decoder and ``lm_head`` are called directly, bypassing the root FSDP unit; DeepSpeed
ZeRO-3 works because its gathering hooks sit on every submodule). Under DDP, call this inside the forward of
the wrapped module so that the reducer sees the pass.

Layout: this module holds the scoring entry points, the chunked ``lm_head`` log-probs (point 2) and per-token
KL; the decoder side (unwrapping, batch validation, the prefix-sharing pass and its fallback) lives in
:mod:`mmalign.adapters.candidate_states`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmalign.adapters.candidate_states import (
    _candidate_states,
    _Parts,
    _scatter_rows,
    _validate_and_select,
    unwrap_causal_lm,
)

from ..data.batches import TextBatch

# The decoder side (unwrapping, validation, prefix-sharing pass) lives in candidate_states; imported back here
# so that `from mmalign.adapters.causal_lm import unwrap_causal_lm` and the helpers below keep working.
from ..types import Scores


def score_batch(
    model: nn.Module,
    batch: TextBatch,
    *,
    share_prompt: bool = True,
    chunk_size: int = 1024,
    return_token_logps: bool = True,
    compute_values: bool = False,
    return_states: bool = False,
    return_layer_states: bool = False,
) -> Scores:
    """Score every candidate completion of ``batch`` under ``model``.

    Args:
        model: a transformers causal LM, a ``peft.PeftModel`` over one, or a ``ValueHeadModel``.
        batch: prompts left-padded ``[B, P]``, completions right-padded ``[B, K, C]``.
        share_prompt: encode each prompt once and reuse its KV cache for all K candidates.
        chunk_size: most completion positions pushed through ``lm_head`` at once.
        return_token_logps: also return ``token_logps`` ``[B, K, C]``.
        compute_values: value-head output at the last scored token (needs a ``ValueHeadModel``).
        return_states: also return ``extras["states"]`` ``[B, K, C, H]``: the final hidden state that predicts
            each completion token (0 where masked), the input of ``lm_head``. Token-level losses (TDPO,
            SparsePO) turn the policy's and the reference's states into per-token KL with
            :func:`token_kl_from_states`, chunk by chunk, so no ``[B, K, C, V]`` tensor is ever built.
        return_layer_states: also return ``extras["layer_states"]`` ``[B, K, C, L, H]``: every decoder layer's
            output at those positions (HF ``hidden_states[1:]``; the last entry is after the final norm), for
            SparsePO's mask heads and activation masks.

    Returns:
        :class:`Scores` with ``logps`` ``[B, K]`` (summed completion log-probs, fp32), ``token_logps`` and
        ``token_mask`` ``[B, K, C]``, ``lengths`` ``[B, K]``, and ``values`` ``[B, K]`` if asked. Padding
        candidates score exactly 0.
    """
    if chunk_size < 1:
        raise ValueError(f"score_batch: chunk_size={chunk_size} must be >= 1 (typical: 512-4096)")
    parts = unwrap_causal_lm(model)
    if compute_values and parts.v_head is None:
        raise ValueError(
            f"score_batch: compute_values=True needs a model with a value head, got {type(model).__name__}; "
            "load it with mmalign.models.text.load_causal_lm(..., value_head=True)"
        )
    rows, ex_idx, token_mask = _validate_and_select(batch)
    B, K, C = batch.completion_ids.shape
    device = batch.completion_ids.device
    flat_tokens = torch.zeros(B * K, C, dtype=torch.float32, device=device)
    values = torch.zeros(B * K, dtype=torch.float32, device=device) if compute_values else None
    extras: dict[str, Tensor] = {}
    if rows.numel() > 0:
        states, comp_ids, comp_mask, layer_states = _candidate_states(
            parts, batch, rows, ex_idx, share_prompt, layers=return_layer_states
        )
        sel_mask = comp_mask.bool()
        if return_states:
            extras["states"] = _scatter_rows(states[:, :-1], sel_mask, rows, B, K, C)
        if layer_states is not None:
            extras["layer_states"] = _scatter_rows(layer_states[:, :-1], sel_mask, rows, B, K, C)
        picked = _chunked_target_logps(
            states[:, :-1][sel_mask], comp_ids[sel_mask], parts.lm_head, parts.logit_transform, chunk_size
        )
        row_tokens = torch.zeros(comp_ids.shape, dtype=torch.float32, device=device)
        row_tokens = row_tokens.masked_scatter(sel_mask, picked)
        flat_tokens = flat_tokens.index_copy(0, rows, F.pad(row_tokens, (0, C - row_tokens.shape[1])))
        if values is not None:
            # states[:, j] has seen j completion tokens, so index by length = after the last scored token.
            last = states[torch.arange(states.shape[0], device=device), sel_mask.sum(-1)]
            row_values = parts.v_head(last.to(parts.v_head.weight.dtype)).squeeze(-1).float()
            values = values.index_copy(0, rows, row_values)
    token_logps = flat_tokens.view(B, K, C)
    return Scores(
        logps=token_logps.sum(-1),
        token_logps=token_logps if return_token_logps else None,
        token_mask=token_mask,
        lengths=token_mask.sum(-1),
        values=None if values is None else values.view(B, K),
        extras=extras,
    )


def _target_logps(hidden: Tensor, targets: Tensor, lm_head: nn.Module, transform) -> Tensor:
    logits = _logits(hidden, lm_head, transform)
    # gather - logsumexp keeps one [rows, V] tensor alive in the forward where log_softmax would keep two.
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def _logits(hidden: Tensor, lm_head: nn.Module, transform) -> Tensor:
    logits = lm_head(hidden).float()
    return logits if transform is None else transform(logits)


def _chunked_target_logps(
    hidden: Tensor, targets: Tensor, lm_head: nn.Module, transform, chunk_size: int
) -> Tensor:
    """``log p(target | hidden)`` for ``[M, H]`` states, at most ``chunk_size`` rows of logits at a time.

    A plain ``nn.Linear`` head goes through :class:`_LinearTargetLogps` (one logits pass in forward, one in
    backward); any other head (PEFT LoRA on ``lm_head``, quantized layers, ZeRO-3 or accelerate-offloaded
    modules whose hooks must run) is called as a module under per-chunk activation checkpointing.
    """
    linear = _plain_linear(lm_head)
    if linear is None:
        return _chunked(
            lambda h, t: _target_logps(h, t, lm_head, transform), (hidden, targets), lm_head, chunk_size
        )
    weight, bias = linear
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(
        [
            _LinearTargetLogps.apply(h, weight, bias, t, transform)
            for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True)
        ]
    )


def _plain_linear(lm_head: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """``(weight, bias)`` when calling ``F.linear`` on them is exactly what calling ``lm_head`` does."""
    if type(lm_head) is not nn.Linear or lm_head._forward_hooks or lm_head._forward_pre_hooks:
        return None
    if hasattr(lm_head, "_hf_hook") or hasattr(lm_head.weight, "ds_id"):  # accelerate offload, DeepSpeed ZeRO-3
        return None
    if _is_dtensor(lm_head.weight):  # FSDP2 shards: the module's hooks gather them
        return None
    return lm_head.weight, lm_head.bias


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _linear_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, torch.dtype]:
    """fp32 logits as ``lm_head(hidden).float()`` computes them, and the dtype the matmul ran in (autocast)."""
    raw = F.linear(hidden, weight, bias)
    return raw.float(), raw.dtype


class _LinearTargetLogps(torch.autograd.Function):
    """``log_softmax(transform(hidden @ W.T + b))[target]`` for one chunk of rows, with a hand-written backward.

    Forward keeps only ``hidden``, ``targets`` and the ``logsumexp`` per row. Backward recomputes the logits
    once and turns them in place into ``grad * (onehot - softmax)``, then runs the two weight/input matmuls.
    Compared with checkpointing the autograd version, this skips the second ``logsumexp`` and the ``[rows, V]``
    buffers of the gather/logsumexp backward, and it takes ``weight``/``bias`` as inputs, so their gradients
    reach autograd (and DDP's hooks) the normal way. Autocast state is recorded in forward and replayed for the
    recomputation, so forward and backward see the same logits. A ``transform`` (soft-capping, logit scaling) is
    differentiated by autograd on the recomputed chunk.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, transform) -> Tensor:
        device_type = hidden.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        raw, ctx.compute_dtype = _linear_logits(hidden, weight, bias)
        z = raw if transform is None else transform(raw)
        lse = z.logsumexp(-1)
        picked = z.gather(-1, targets[:, None]).squeeze(-1) - lse
        ctx.transform = transform
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return picked

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        device_type, enabled, dtype = ctx.autocast
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            raw, _ = _linear_logits(hidden, weight, bias)
        grad = grad.float()[:, None]
        if ctx.transform is None:
            grad_raw = raw.sub_(lse[:, None]).exp_().mul_(-grad)  # -grad * softmax
            grad_raw.scatter_add_(-1, targets[:, None], grad)  # + grad * onehot
        else:
            raw.requires_grad_(True)
            with torch.enable_grad():
                z = ctx.transform(raw)
            grad_z = (z.detach() - lse[:, None]).exp_().mul_(-grad)
            grad_z.scatter_add_(-1, targets[:, None], grad)
            (grad_raw,) = torch.autograd.grad(z, raw, grad_z)
        grad_raw = grad_raw.to(ctx.compute_dtype)
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_raw @ weight.to(ctx.compute_dtype)).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_raw.t() @ hidden.to(ctx.compute_dtype)).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_raw.sum(0).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _chunked(
    fn: Callable[..., Tensor], tensors: tuple[Tensor, ...], lm_head: nn.Module, chunk_size: int
) -> Tensor:
    """Apply ``fn`` to row chunks of ``tensors``; under autograd each chunk is checkpointed, so backward
    recomputes that chunk's logits instead of keeping every chunk's ``[chunk, V]`` block alive."""
    rows = tensors[0].shape[0]
    if rows == 0:
        return tensors[0].new_zeros(0, dtype=torch.float32)
    recompute = torch.is_grad_enabled() and (
        tensors[0].requires_grad or any(p.requires_grad for p in lm_head.parameters())
    )
    outs = []
    for start in range(0, rows, chunk_size):
        chunk = tuple(t[start : start + chunk_size] for t in tensors)
        outs.append(checkpoint(fn, *chunk, use_reentrant=False) if recompute else fn(*chunk))
    return torch.cat(outs)


_KL_DIRECTIONS = ("policy_ref", "ref_policy")


def token_kl_chunked(
    policy_model: nn.Module,
    ref_model: nn.Module | None,
    batch: TextBatch,
    *,
    share_prompt: bool = True,
    chunk_size: int = 1024,
    direction: str = "policy_ref",
) -> Tensor:
    """Per-token KL between policy and reference over the full vocabulary at every scored completion position.

    ``direction="policy_ref"``: ``KL(pi || pi_ref)``; ``"ref_policy"``: ``KL(pi_ref || pi)`` (TDPO's sequential
    KL, arXiv 2404.11999). Returns ``[B, K, C]`` fp32, 0 where ``token_mask`` is False; differentiable w.r.t.
    the policy only. ``ref_model=None`` means "the policy with its PEFT adapter disabled" (no second copy in
    memory). Both models' logits are formed chunk by chunk (:func:`token_kl_from_states`), so at most two
    ``[chunk_size, V]`` blocks exist at once.
    """
    parts = unwrap_causal_lm(policy_model)
    _check_ref(parts, policy_model, ref_model)
    ref_parts = parts if ref_model is None else unwrap_causal_lm(ref_model)
    ref_ctx = parts.peft.disable_adapter if ref_model is None else contextlib.nullcontext
    rows, ex_idx, token_mask = _validate_and_select(batch)
    B, K, C = batch.completion_ids.shape
    if rows.numel() == 0:
        return torch.zeros(B, K, C, dtype=torch.float32, device=batch.completion_ids.device)
    states, _, comp_mask, _ = _candidate_states(parts, batch, rows, ex_idx, share_prompt)
    with torch.no_grad(), ref_ctx():
        ref_states = _candidate_states(ref_parts, batch, rows, ex_idx, share_prompt)[0]
    sel = comp_mask.bool()
    return token_kl_from_states(
        policy_model, ref_model, _scatter_rows(states[:, :-1], sel, rows, B, K, C),
        _scatter_rows(ref_states[:, :-1], sel, rows, B, K, C), token_mask, chunk_size=chunk_size,
        direction=direction,
    )


def _check_ref(parts: _Parts, policy_model: nn.Module, ref_model: nn.Module | None) -> None:
    if ref_model is None and parts.peft is None:
        raise ValueError(
            f"per-token KL: ref_model=None needs a PEFT policy (the reference is its adapter disabled), got "
            f"{type(policy_model).__name__}; pass a frozen reference model"
        )


def token_kl_from_states(
    policy_model: nn.Module,
    ref_model: nn.Module | None,
    states: Tensor,
    ref_states: Tensor,
    token_mask: Tensor,
    *,
    chunk_size: int = 1024,
    direction: str = "policy_ref",
) -> Tensor:
    """Per-token KL from final hidden states (``score_batch(..., return_states=True)`` of each model).

    ``states`` / ``ref_states``: ``[..., H]`` inputs of each model's ``lm_head`` (``ref_states`` is used
    detached); ``token_mask``: ``[...]`` bool. Only masked-in rows are pushed through the two heads, at most
    ``chunk_size`` rows at a time, each chunk recomputed in backward (activation checkpointing), so memory is
    ``O(chunk_size * V)`` whatever the batch. ``ref_model=None``: the policy's head under ``disable_adapter``
    (a reference that is the PEFT policy's base). Gradient flows into the policy's states and head only.
    Returns fp32 ``[...]``, 0 where masked.
    """
    if direction not in _KL_DIRECTIONS:
        raise ValueError(f"direction={direction!r} is not one of {list(_KL_DIRECTIONS)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (typical: 512-4096)")
    if states.shape != ref_states.shape or states.shape[:-1] != token_mask.shape:
        raise ValueError(f"per-token KL: states {tuple(states.shape)}, ref_states {tuple(ref_states.shape)} and "
                         f"token_mask {tuple(token_mask.shape)} must agree ([..., H] and [...])")
    parts = unwrap_causal_lm(policy_model)
    _check_ref(parts, policy_model, ref_model)
    ref_parts = parts if ref_model is None else unwrap_causal_lm(ref_model)
    # Entering disable_adapter for the reference only, also inside backward's recomputation of a chunk.
    ref_ctx = parts.peft.disable_adapter if ref_model is None else contextlib.nullcontext
    sel = token_mask.bool()

    def chunk_kl(h: Tensor, ref_h: Tensor) -> Tensor:
        logps = _logits(h, parts.lm_head, parts.logit_transform).log_softmax(-1)
        with torch.no_grad(), ref_ctx():
            ref_logps = _logits(ref_h, ref_parts.lm_head, ref_parts.logit_transform).log_softmax(-1)
        if direction == "policy_ref":
            return (logps.exp() * (logps - ref_logps)).sum(-1)
        return (ref_logps.exp() * (ref_logps - logps)).sum(-1)

    kl = _chunked(chunk_kl, (states[sel], ref_states.detach()[sel]), parts.lm_head, chunk_size)
    return torch.zeros(sel.shape, dtype=torch.float32, device=states.device).masked_scatter(sel, kl)


def score_batch_naive(model: nn.Module, batch: TextBatch) -> Scores:
    """Reference implementation for tests: one flush-left ``[prompt; completion]`` sequence per candidate,
    the model's own forward (full ``[N, T, V]`` logits), ``log_softmax``, ``gather``. Slow, plainly right."""
    parts = unwrap_causal_lm(model)
    rows, ex_idx, token_mask = _validate_and_select(batch)
    B, K, C = batch.completion_ids.shape
    device = batch.completion_ids.device
    flat = torch.zeros(B * K, C, dtype=torch.float32, device=device)
    if rows.numel() == 0:
        return Scores(logps=flat.view(B, K, C).sum(-1), token_logps=flat.view(B, K, C), token_mask=token_mask)
    seqs, spans = [], []
    comp_ids, comp_mask = batch.completion_ids.flatten(0, 1), batch.completion_mask.flatten(0, 1).bool()
    for row, ex in zip(rows.tolist(), ex_idx.tolist(), strict=True):
        prompt = batch.prompt_ids[ex][batch.prompt_mask[ex].bool()]
        completion = comp_ids[row][comp_mask[row]]
        seqs.append(torch.cat([prompt, completion]))
        spans.append((len(prompt), len(completion)))
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], attn[i, : len(s)] = s, 1
    logits = parts.lm(input_ids=ids, attention_mask=attn).logits.float()
    logps = logits.log_softmax(-1)
    per_row = []
    for i, (p, c) in enumerate(spans):
        picked = logps[i, p - 1 : p - 1 + c].gather(-1, ids[i, p : p + c, None]).squeeze(-1)
        per_row.append(F.pad(picked, (0, C - c)))
    flat = flat.index_copy(0, rows, torch.stack(per_row))
    token_logps = flat.view(B, K, C)
    return Scores(
        logps=token_logps.sum(-1), token_logps=token_logps, token_mask=token_mask, lengths=token_mask.sum(-1)
    )
