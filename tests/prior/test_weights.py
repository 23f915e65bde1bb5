"""PRIOR weights through the recipe: α = 0 is NTP (= the model's HF loss), the weights carry no gradient,
cached weights equal on-the-fly ones, and the cache is reused, or rebuilt when the reference model or the
weight settings change."""

from __future__ import annotations

import copy

import pytest
import torch

from mmalign.losses import prior_token_weights, token_weighted_nll
from mmalign.methods.prior import PriorTask, reference_token_logps
from mmalign.models.text import build_tiny_causal_lm
from mmalign.schema import StageConfig

from ._tiny import caption_tokenizer, config, hf_loss, write_rows

MAIN = StageConfig(name="main")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("weights"), n=10)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """A tiny text-only LM fitted for a few steps on the captions, so that p̂ ranges from ~0 to ~1."""
    from mmalign.adapters.causal_lm import score_batch

    cfg = config(tmp_path_factory.mktemp("ref"), data)
    tok = caption_tokenizer(cfg)
    ref = build_tiny_causal_lm(len(tok), seed=5, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    ds, _ = PriorTask(cfg, tokenizer=tok, reference=ref).family.caption_dataset(cfg.data.train)
    (_, text), = list(ds.text_batches(len(ds)))
    opt = torch.optim.Adam(ref.parameters(), lr=2e-2)
    for _ in range(15):
        s = score_batch(ref, text)
        loss = -(s.logps / s.lengths).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ref.eval()


def _setup(tmp_path, data, reference, *overrides):
    cfg = config(tmp_path, data, *overrides)
    return PriorTask(cfg, tokenizer=caption_tokenizer(cfg), reference=reference), reference


def _full_batch(stage):
    return stage.collate([stage.train[i] for i in range(len(stage.train))])


@pytest.mark.parametrize("lvlm", ["llava", "patch"])
def test_alpha_zero_is_plain_ntp_equal_to_the_hf_loss(tmp_path, data, reference, lvlm):
    task, _ = _setup(tmp_path, data, reference, "prior.alpha=0", f"prior.lvlm={lvlm}")
    batch = _full_batch(task.stage_data(MAIN))
    w = batch.extras["prior_weights"][:, 0][batch.completion_mask[:, 0].bool()]
    torch.testing.assert_close(w, torch.ones_like(w))
    loss = task.loss(task.score(task.model, batch), None, batch).loss
    assert abs(loss.item() - hf_loss(task.model, batch).item()) < 1e-6


@pytest.mark.parametrize("extra", [
    ("prior.alpha=2.0", "prior.floor=0.05"),
    ("prior.form=surprisal", "prior.alpha=0.5"),
    ("prior.form=inverse_p", "prior.clip=20", "prior.normalize=sequence"),
    ("prior.normalize=none",),
])
def test_cached_weights_equal_on_the_fly_weights(tmp_path, data, reference, extra):
    task, ref = _setup(tmp_path, data, reference, *extra)
    pc = task.pc
    stage = task.stage_data(MAIN)
    batch = _full_batch(stage)
    (_, text), = list(stage.train.text_batches(len(stage.train)))
    mask = text.completion_mask[:, 0].bool()
    fly = prior_token_weights(reference_token_logps(ref, text), mask, alpha=pc.alpha, form=pc.form,
                              normalize=pc.normalize, clip=pc.clip, floor=pc.floor)
    assert float(fly[mask].std()) > 0.05, "the reference must give varied weights for this test to mean much"
    # The loss with cached weights equals the loss with the on-the-fly weights on the same batch.
    policy = task.score(task.model, batch)
    cached = task.loss(policy, None, batch).loss
    direct = token_weighted_nll(policy.token_logps[:, 0], mask, weights=fly, normalize="per_token").loss
    torch.testing.assert_close(cached, direct, rtol=1e-6, atol=1e-6)


def test_weights_carry_no_gradient(tmp_path, data, reference):
    task, _ = _setup(tmp_path, data, reference, "prior.alpha=1.5")
    batch = _full_batch(task.stage_data(MAIN))
    assert not batch.extras["prior_weights"].requires_grad
    policy = task.score(task.model, batch)
    logps = policy.token_logps.detach().requires_grad_(True)
    policy.token_logps = logps
    task.loss(policy, None, batch).loss.backward()
    mask = batch.completion_mask[:, 0].bool()
    raw = batch.extras["prior_weights"][:, 0]
    expected = -(raw / raw[mask].mean()) * mask / mask.sum()  # d/d log p of mean_t w_t·(−log p_t): w is constant
    torch.testing.assert_close(logps.grad[:, 0], expected, rtol=1e-5, atol=1e-8)
    x = torch.randn(2, 5).clamp_max(-0.1).requires_grad_(True)
    assert prior_token_weights(x, None).grad_fn is None


def test_cache_reused_and_invalidated_by_reference_or_settings(tmp_path, data, reference):
    task, ref = _setup(tmp_path, data, reference, "prior.alpha=1.0")
    n = len(task.family.caption_dataset(task.cfg.data.train)[0])
    first = task.stage_data(MAIN).stats
    assert (first["prior/cache_hits"], first["prior/cache_computed"]) == (0, n)
    again = task.stage_data(MAIN).stats
    assert (again["prior/cache_hits"], again["prior/cache_computed"]) == (n, 0)
    changed = copy.deepcopy(ref)
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    stats = _setup(tmp_path, data, changed, "prior.alpha=1.0")[0].stage_data(MAIN).stats
    assert stats["prior/cache_computed"] == n  # another reference hash: nothing reused
    stats = _setup(tmp_path, data, ref, "prior.alpha=2.0")[0].stage_data(MAIN).stats
    assert stats["prior/cache_computed"] == n  # other weight settings: nothing reused
    stats = _setup(tmp_path, data, ref, "prior.alpha=1.0", "prior.normalize=none")[0].stage_data(MAIN).stats
    assert stats["prior/cache_hits"] == n  # batch and none share the raw per-caption weights
    assert len(list((tmp_path / "run" / "prior_cache").glob("prior-weights-*.pt"))) == 3


def test_eval_items_carry_their_own_weights_through_the_shared_collate(tmp_path, data, reference):
    """The loop collates eval items with ``StageData.collate`` (the train dataset's): weights must come with the
    items, not from the dataset that collates them."""
    eval_file = write_rows(tmp_path / "eval", n=4, seed=9)
    task, ref = _setup(tmp_path, data, reference, f"data.eval=[{eval_file}]", "prior.normalize=none")
    stage = task.stage_data(MAIN)
    batch = stage.collate([stage.eval[i] for i in range(len(stage.eval))])
    (_, text), = list(stage.eval.text_batches(len(stage.eval)))
    mask = text.completion_mask[:, 0].bool()
    fly = prior_token_weights(reference_token_logps(ref, text), mask, normalize="none")
    torch.testing.assert_close(batch.extras["prior_weights"][:, 0], fly)
