"""The VLM scorer's arithmetic (mmalign/adapters/vlm.py) on tiny random models of the four real classes.

- shared-prompt scores (media once per example, prompt KV cache shared by the K candidates, M-RoPE continued from
  the cached prompt) equal one plain ``model(input_ids=[prompt; completion], pixel_values=...)`` per candidate to
  1e-5 in fp32, for every arch, with images, videos and both in one batch;
- the M-RoPE index matters (1-D positions on a Qwen model do not reproduce the model's forward), so the test above
  checks it;
- the media go through the visual path once per batch, and a frozen visual path is not run again for the
  reference (identical reference scores);
- over-long completions are cut and counted, over-long prompts refused or skipped and counted.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mmalign.adapters import vlm as V
from mmalign.adapters.vlm import score_candidates, score_candidates_naive, vlm_parts
from mmalign.adapters.vlm_data import VLMDataset, encode_examples
from mmalign.adapters.vlm_family import freeze_visual
from mmalign.data.row_files import DataError

from ._tiny_vlm import ARCHS, examples, tiny


def _batch(inputs, exs, max_length: int = 4096):
    enc, stats = encode_examples(inputs, exs, max_length=max_length)
    ds = VLMDataset(enc, inputs, format="pairs")
    return ds.collate([ds[i] for i in range(len(ds))]), stats


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("media", ["image", "video", "both"])
def test_shared_prompt_scores_equal_a_full_forward_per_candidate(arch, media):
    model, inputs = tiny(arch)
    batch, _ = _batch(inputs, examples(media))
    assert bool((batch.prompt_mask == 0).any()), "prompts of several lengths: the batch is left-padded"
    fast = score_candidates(model, batch, chunk_size=3)
    naive = score_candidates_naive(model, batch)
    torch.testing.assert_close(fast.token_logps, naive.token_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.logps, naive.logps, rtol=0, atol=1e-5)
    assert torch.equal(fast.lengths, batch.completion_mask.sum(-1)) and bool((fast.logps < 0).all())


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava_next_video"])
def test_unshared_layout_gives_the_same_scores(arch):
    model, inputs = tiny(arch)
    batch, _ = _batch(inputs, examples("both"))
    torch.testing.assert_close(score_candidates(model, batch, share_prompt=False).logps,
                               score_candidates_naive(model, batch).logps, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_index_is_what_makes_the_scores_match(arch, monkeypatch):
    model, inputs = tiny(arch)
    batch, _ = _batch(inputs, examples("video"))
    pos = V._positions(vlm_parts(model), batch.prompt_ids, batch.prompt_mask, batch.media)
    assert pos.shape[0] == 3 and not torch.equal(pos[0], pos[1]), "visual tokens get distinct t/h/w ids"
    naive = score_candidates_naive(model, batch).logps
    monkeypatch.setattr(V, "_positions", lambda parts, ids, mask, media: (mask.cumsum(-1) - 1).clamp(min=0))
    one_d = score_candidates(model, batch).logps
    assert (one_d - naive).abs().max() > 1e-4, "plain 1-D positions must not reproduce the model's M-RoPE forward"


def _count_visual_calls(model):
    calls = []
    for m in vlm_parts(model).visual[:1]:
        m.register_forward_hook(lambda mod, args, out: calls.append(1))
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_media_encoded_once_and_a_frozen_visual_path_is_shared_with_the_reference(arch):
    model, inputs = tiny(arch)
    exs = examples("image")
    batch, _ = _batch(inputs, exs)
    calls = _count_visual_calls(model)
    score_candidates_naive(model, batch)
    assert len(calls) == 2 * len(exs), "the naive forward encodes the media once per candidate"
    calls.clear()
    score_candidates(model, batch)
    assert len(calls) == 1, "one visual pass over the batch's images, none per candidate"

    freeze_visual(model, arch, tower=True, projector=True)
    reference = copy.deepcopy(model).requires_grad_(False)
    calls, ref_calls = _count_visual_calls(model), _count_visual_calls(reference)
    batch, _ = _batch(inputs, exs)
    policy = score_candidates(model, batch)
    ref = score_candidates(reference, batch)
    assert (len(calls), len(ref_calls), batch.encoder_cache.encoder_calls) == (1, 0, 1)
    assert torch.equal(policy.logps.detach(), ref.logps), "policy == reference: identical scores"
    policy.logps.sum().backward()  # cached features carry no graph; the LM still gets gradients
    assert any(p.grad is not None for n, p in model.named_parameters() if "language_model" in n)

    freeze_visual(model, arch, tower=False, projector=False)  # a trainable tower is never shared
    batch, _ = _batch(inputs, exs)
    calls.clear()
    score_candidates(model, batch).logps.sum().backward()
    score_candidates(reference, batch)
    assert len(calls) == 1 and len(ref_calls) == 1
    assert any(p.grad is not None for p in vlm_parts(model).visual[0].parameters())


def test_ranked_lists_with_padding_candidates():
    model, inputs = tiny("qwen2_vl")
    exs = examples("image")
    exs[0].candidates, exs[0].kind = ["a red square", "a blue dot", "nothing happens"], "ranked"
    exs[1].kind = "ranked"
    batch, _ = _batch(inputs, exs)
    assert batch.candidate_mask.tolist() == [[True, True, True], [True, True, False]]
    assert batch.labels[0].tolist() == [0.0, 1.0, 2.0]
    s = score_candidates(model, batch)
    assert s.logps[1, 2] == 0 and not bool(s.token_mask[1, 2].any())
    torch.testing.assert_close(s.logps, score_candidates_naive(model, batch).logps, rtol=0, atol=1e-5)


def test_activation_checkpointing_and_bf16():
    model, inputs = tiny("qwen2_5_vl")
    batch, _ = _batch(inputs, examples("both"))
    naive = score_candidates_naive(model, batch).logps
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # no dropout in the tiny configs: train mode changes only the (uncached) layout
    s = score_candidates(model, batch)
    torch.testing.assert_close(s.logps.detach(), naive, rtol=0, atol=1e-5)
    s.logps.sum().backward()
    model.eval().to(torch.bfloat16)
    bf16 = score_candidates(model, batch)
    assert bf16.logps.dtype == torch.float32 and bool(torch.isfinite(bf16.logps).all())
    assert (bf16.logps - naive).abs().max() < 0.05 * naive.abs().max()


def test_long_completions_are_cut_and_counted_long_prompts_refused():
    _, inputs = tiny("qwen2_vl")
    exs = examples("image")
    enc, stats = encode_examples(inputs, exs, max_length=4096)
    longest_prompt = max(len(e.prompt_ids) for e in enc)
    enc, stats = encode_examples(inputs, exs, max_length=longest_prompt + 2)
    assert stats["completions_truncated"] >= 2 and stats["rows_truncated"] >= 1
    assert all(len(e.prompt_ids) + len(c) <= longest_prompt + 2 for e in enc for c in e.completions)
    with pytest.raises(DataError, match="prompt_too_long|no room for a completion.*max_length"):
        encode_examples(inputs, exs, max_length=longest_prompt)
    enc, stats = encode_examples(inputs, exs, max_length=longest_prompt, skip_bad_rows=True)
    assert stats["skipped/prompt_too_long"] >= 1 and len(enc) == len(exs) - stats["skipped/prompt_too_long"]
