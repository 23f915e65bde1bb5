"""The causal-LM adapter equals the plain concatenated forward, in values and in gradients.

``score_batch_naive`` scores one flush-left ``[prompt; completion]`` sequence per candidate with the
model's own forward and full logits; every fast path (shared prompt KV cache, concatenated fallback,
gradient checkpointing, PEFT) must match it to fp32 round-off.
"""

from __future__ import annotations

import pytest
import torch

from mmalign.adapters import causal_lm
from mmalign.adapters.causal_lm import score_batch, score_batch_naive, token_kl_chunked
from mmalign.data.batches import TextBatch
from mmalign.models.text import ValueHeadModel, apply_lora, build_tiny_causal_lm

VOCAB = 300
TINY = dict(hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64, initializer_range=0.2)
ATOL = 1e-5


def make_batch(
    B: int = 3, K: int = 2, P: int = 7, C: int = 6, seed: int = 0, masked: bool = True
) -> TextBatch:
    """Ragged prompts (left-padded) and ragged completions (right-padded, one empty); with ``masked`` the last
    candidate of example 1 is a padding candidate whose ids are random junk (it must not matter)."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(1, P + 1, (B,), generator=g)
    prompt_len[0] = P
    prompt_mask = (torch.arange(P)[None] >= (P - prompt_len)[:, None]).long()
    prompt_ids = torch.randint(3, VOCAB, (B, P), generator=g) * prompt_mask
    comp_len = torch.randint(1, C + 1, (B, K), generator=g)
    comp_len[0, 0] = C
    if B * K > 2:
        comp_len[-1, -1] = 0  # a real candidate with an empty completion scores 0
    comp_mask = (torch.arange(C)[None, None] < comp_len[..., None]).long()
    comp_ids = torch.randint(3, VOCAB, (B, K, C), generator=g) * comp_mask
    cand = torch.ones(B, K, dtype=torch.bool)
    if masked and K > 1:
        cand[1, -1] = False
        comp_ids[1, -1] = torch.randint(3, VOCAB, (C,), generator=g)
        comp_mask[1, -1] = torch.randint(0, 2, (C,), generator=g)  # even a malformed mask is ignored
    return TextBatch(prompt_ids, prompt_mask, comp_ids, comp_mask, candidate_mask=cand)


def _grads(model, fn, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    scores = fn(model, batch)
    g = torch.Generator().manual_seed(1)
    seq_weights = torch.randn(scores.logps.shape, generator=g)
    token_weights = torch.rand(scores.token_logps.shape, generator=g) * 0.1
    ((scores.logps * seq_weights).sum() + (scores.token_logps * token_weights).sum()).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _assert_same(scores, ref) -> None:
    torch.testing.assert_close(scores.logps, ref.logps, atol=ATOL, rtol=0)
    torch.testing.assert_close(scores.token_logps, ref.token_logps, atol=ATOL, rtol=0)
    assert torch.equal(scores.token_mask, ref.token_mask)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_shared_prompt_and_concatenated_paths_equal_naive(attn, K):
    model = build_tiny_causal_lm(VOCAB, attn_implementation=attn, **TINY)
    batch = make_batch(K=K)
    ref = score_batch_naive(model, batch)
    assert (ref.logps[batch.candidate_mask] < -1).sum() >= batch.candidate_mask.sum() - 1  # not vacuous
    for share in (True, False):
        scores = score_batch(model, batch, share_prompt=share, chunk_size=4)
        _assert_same(scores, ref)
        assert torch.equal(
            scores.lengths, (batch.completion_mask.bool() & batch.candidate_mask[..., None]).sum(-1)
        )
        if K > 1:
            assert scores.logps[1, -1] == 0 and not scores.token_logps[1, -1].any()
            assert torch.isfinite(scores.token_logps).all()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gradients_equal_naive_through_prompt_and_completion_passes(attn):
    model = build_tiny_causal_lm(VOCAB, attn_implementation=attn, **TINY).train()
    batch = make_batch(K=3)
    ref = _grads(model, score_batch_naive, batch)
    shared = _grads(model, lambda m, b: score_batch(m, b, chunk_size=5), batch)
    concat = _grads(model, lambda m, b: score_batch(m, b, share_prompt=False, chunk_size=5), batch)
    assert torch.isfinite(shared).all()
    torch.testing.assert_close(shared, ref, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(concat, ref, atol=ATOL, rtol=1e-4)
    # Prompt-only tokens receive gradient, so the prompt pass is really in the graph.
    prompt_only = set(batch.prompt_ids[batch.prompt_mask.bool()].tolist()) - set(
        batch.completion_ids.flatten().tolist()
    )
    emb_grad = model.model.embed_tokens.weight.grad
    assert emb_grad[sorted(prompt_only)].abs().sum() > 0


def _count_decoder_calls(model):
    calls = []
    handle = model.model.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    return calls, handle


def test_prompt_runs_once_and_padding_candidates_never_reach_the_model():
    model = build_tiny_causal_lm(VOCAB, **TINY)
    batch = make_batch(B=3, K=3, P=7, C=6)
    calls, handle = _count_decoder_calls(model)
    score_batch(model, batch)
    handle.remove()
    assert calls[0] == (3, 7)  # prompts once, not K times
    assert calls[1][0] == int(batch.candidate_mask.sum()) == 8  # one row per real candidate


@pytest.mark.parametrize("path", ["fused", "module"])
def test_logits_are_materialised_in_bounded_chunks_at_completion_positions_only(path, monkeypatch):
    """``fused``: a plain ``nn.Linear`` head goes through ``_LinearTargetLogps`` (rows counted at its logits
    helper); ``module``: a forward hook on ``lm_head`` makes the adapter call the module under checkpointing
    (the path for LoRA'd, quantized or hooked heads). Either way no ``[rows, V]`` tensor is kept for backward."""
    model = build_tiny_causal_lm(VOCAB, **TINY).train()
    batch = make_batch(B=3, K=3)
    rows = []
    if path == "module":
        handle = model.lm_head.register_forward_hook(lambda mod, inp, out: rows.append(out.shape[0]))
    else:
        original = causal_lm._linear_logits

        def counting(hidden, weight, bias):
            rows.append(hidden.shape[0])
            return original(hidden, weight, bias)

        monkeypatch.setattr(causal_lm, "_linear_logits", counting)
    saved_vocab_rows = []

    def pack(t):
        if t.dim() >= 2 and t.shape[-1] == VOCAB:
            saved_vocab_rows.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        scores = score_batch(model, batch, chunk_size=4)
    n_forward = len(rows)
    scores.logps.sum().backward()
    if path == "module":
        handle.remove()
    assert max(rows) <= 4
    assert sum(rows[:n_forward]) == int(scores.lengths.sum())  # only scored completion positions
    assert len(rows) == 2 * n_forward  # backward recomputes each chunk instead of storing its logits
    assert saved_vocab_rows == []


def test_gradient_checkpointing_falls_back_to_concatenated_path():
    model = build_tiny_causal_lm(VOCAB, **TINY)
    batch = make_batch(K=2)
    ref_grads = _grads(model.train(), score_batch_naive, batch)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    calls, handle = _count_decoder_calls(model)
    grads = _grads(model, lambda m, b: score_batch(m, b, chunk_size=3), batch)
    handle.remove()
    assert len(calls) == 1  # HF drops the KV cache under checkpointing, so the adapter does not try
    torch.testing.assert_close(grads, ref_grads, atol=ATOL, rtol=1e-4)


def _lora_model():
    model = apply_lora(build_tiny_causal_lm(VOCAB, **TINY), r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_peft_model_and_disabled_adapter_reference():
    model = _lora_model()
    batch = make_batch(K=2)
    _assert_same(score_batch(model, batch), score_batch_naive(model, batch))
    with torch.no_grad(), model.disable_adapter():
        ref = score_batch(model, batch)
    base = build_tiny_causal_lm(VOCAB, **TINY)
    _assert_same(ref, score_batch_naive(base, batch))
    assert not torch.allclose(ref.logps, score_batch(model, batch).logps)
    lora_grads = _grads(model.train(), lambda m, b: score_batch(m, b, chunk_size=4), batch)
    torch.testing.assert_close(lora_grads, _grads(model, score_batch_naive, batch), atol=ATOL, rtol=1e-4)


def test_values_from_value_head_at_last_completion_token():
    model = ValueHeadModel(build_tiny_causal_lm(VOCAB, **TINY))
    batch = make_batch(K=2)
    scores = score_batch(model, batch, compute_values=True)
    assert scores.values.shape == (3, 2) and scores.values[1, 1] == 0
    for b, k in [(0, 0), (0, 1), (2, 0)]:
        prompt = batch.prompt_ids[b][batch.prompt_mask[b].bool()]
        completion = batch.completion_ids[b, k][batch.completion_mask[b, k].bool()]
        seq = torch.cat([prompt, completion])[None]
        with torch.no_grad():
            expected = model(seq).values[0, -1]
        torch.testing.assert_close(scores.values[b, k], expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="value head"):
        score_batch(build_tiny_causal_lm(VOCAB, **TINY), batch, compute_values=True)


def test_token_kl_chunked_matches_full_logits():
    policy = _lora_model()
    batch = make_batch(K=2)
    kl = token_kl_chunked(policy, None, batch, chunk_size=3)
    ids = torch.cat([batch.prompt_ids[0][batch.prompt_mask[0].bool()], batch.completion_ids[0, 0]])[None]
    P = int(batch.prompt_mask[0].sum())
    with torch.no_grad():
        logps = policy(input_ids=ids).logits.log_softmax(-1)[0, P - 1 : -1]
        with policy.disable_adapter():
            ref_logps = policy(input_ids=ids).logits.log_softmax(-1)[0, P - 1 : -1]
    expected = (logps.exp() * (logps - ref_logps)).sum(-1)
    torch.testing.assert_close(kl[0, 0], expected, atol=ATOL, rtol=0)
    assert (kl[0, 0] > 0).all() and kl[1, 1].abs().sum() == 0
    kl.sum().backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_" in n
    )
    same = token_kl_chunked(policy, policy, batch)
    torch.testing.assert_close(same, torch.zeros_like(same), atol=ATOL, rtol=0)


def test_all_candidates_masked_gives_zero_scores():
    model = build_tiny_causal_lm(VOCAB, **TINY)
    batch = make_batch(K=2)
    batch.candidate_mask[:] = False
    scores = score_batch(model, batch)
    assert not scores.logps.any() and not scores.token_mask.any() and not scores.lengths.any()


def test_bad_padding_layouts_raise_with_the_example_index():
    model = build_tiny_causal_lm(VOCAB, **TINY)
    batch = make_batch(K=2)
    batch.prompt_mask[2] = torch.tensor([1, 1, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="prompt_mask of example 2 is not left-padded"):
        score_batch(model, batch)
    batch = make_batch(K=2)
    batch.completion_mask[0, 1] = torch.tensor([0, 1, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="example 0, candidate 1 is not right-padded"):
        score_batch(model, batch)
    batch = make_batch(K=2)
    batch.prompt_mask[1] = 0
    with pytest.raises(ValueError, match="example 1 has an empty prompt"):
        score_batch(model, batch)
    with pytest.raises(ValueError, match="chunk_size=0"):
        score_batch(model, make_batch(), chunk_size=0)


def _other_family(name: str):
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if name == "gemma2":  # logit soft-capping replayed per chunk; sliding window (4) shorter than prompts
        config = Gemma2Config(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, head_dim=8, initializer_range=0.2, sliding_window=4,
            final_logit_softcapping=3.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        return Gemma2ForCausalLM(config).eval()
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()  # learned absolute positions: explicit position_ids matter


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_other_model_families_equal_naive(family):
    model = _other_family(family)
    batch = make_batch(K=3)
    ref = score_batch_naive(model, batch)
    for share in (True, False):
        _assert_same(score_batch(model, batch, share_prompt=share, chunk_size=4), ref)


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_other_model_families_gradients_equal_naive(family):
    """Gemma 2 runs its logit soft-capping through the fused head's backward; GPT-2 ties ``lm_head`` to the
    input embedding, so both gradient contributions must land on the one parameter. (Eval mode: GPT-2 has
    dropout; gradients flow all the same.)"""
    model = _other_family(family)
    batch = make_batch(K=2)
    ref = _grads(model, score_batch_naive, batch)
    fast = _grads(model, lambda m, b: score_batch(m, b, chunk_size=4), batch)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=1e-4)


def test_lora_on_lm_head_uses_the_module_path_with_equal_gradients():
    model = apply_lora(build_tiny_causal_lm(VOCAB, **TINY), r=4, alpha=8, target_modules=["q_proj", "lm_head"])
    assert causal_lm._plain_linear(causal_lm.unwrap_causal_lm(model).lm_head) is None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    batch = make_batch(K=2)
    model.train()
    ref = _grads(model, score_batch_naive, batch)
    torch.testing.assert_close(_grads(model, lambda m, b: score_batch(m, b, chunk_size=3), batch), ref,
                               atol=ATOL, rtol=1e-4)


def test_fused_head_under_bf16_autocast_matches_module_path():
    """Autocast state is replayed for the backward recomputation: logps are identical to calling the module,
    gradients agree to bf16 precision."""
    model = build_tiny_causal_lm(VOCAB, **TINY).train()
    batch = make_batch(K=2)

    def run(module_path: bool):
        handle = model.lm_head.register_forward_hook(lambda *a: None) if module_path else None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grads = _grads(model, lambda m, b: score_batch(m, b, chunk_size=4), batch)
            logps = score_batch(model, batch).logps.detach()
        if handle is not None:
            handle.remove()
        return grads, logps

    (g_fused, l_fused), (g_module, l_module) = run(False), run(True)
    assert torch.equal(l_fused, l_module)
    torch.testing.assert_close(g_fused, g_module, atol=2e-2, rtol=2e-2)
