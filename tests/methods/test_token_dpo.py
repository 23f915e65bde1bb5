"""Token-level DPO (TDPO1/TDPO2, arXiv 2404.11999) and SparsePO (arXiv 2410.05102) wired end to end: the
adapter's chunked per-token KL against full logits, the papers' invariants through TextTask (the causal-LM
family's ``finish_scores`` forms the per-token KL and masks), SparsePO's mask heads, 3-step runs through
``mmalign.train``, and the refusal of the precomputed reference."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from mmalign.adapters.causal_lm import score_batch, token_kl_from_states
from mmalign.adapters.sparse_masks import SparseMaskHeads
from mmalign.api import build_task, load_train_config, train
from mmalign.config import ConfigError
from mmalign.data.batches import TextBatch
from mmalign.data.synthetic import addition_rows, corpus, write_jsonl
from mmalign.methods.table import METHODS
from mmalign.methods.text import MASK_HEADS
from mmalign.models.text import apply_lora, build_tiny_causal_lm, load_causal_lm
from mmalign.train.metrics_log import read_metrics
from mmalign.types import Scores

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
        "initializer_range": 0.1}
VOCAB = 300


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from mmalign.models.tokenizer import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("tdpo")
    write_jsonl(addition_rows(8, format="pairs", seed=1), d / "pairs.jsonl")
    tok = train_bpe_tokenizer(corpus(addition_rows(64, format="pairs", seed=0)), vocab_size=VOCAB)
    tok.save_pretrained(str(d / "tok"))
    return {"pairs": d / "pairs.jsonl", "tok": d / "tok"}


def _cfg(files, out: Path, loss: str, *overrides: str, kwargs: dict | None = None, options: dict | None = None):
    return load_train_config(None, [
        "modality=text", "model.name_or_path=tiny", f"model.tokenizer={files['tok']}",
        f"data.train=[{files['pairs']}]", "data.max_length=24", f"loss.name={loss}", "optim.lr=1e-2",
        "optim.scheduler=constant", "optim.max_grad_norm=null", "run.batch_size=4", "run.max_steps=3",
        "run.log_every=1", "run.report_to=[jsonl]", "run.progress=false", f"run.output_dir={out}",
        "run.resume=never", "run.save_final=false", *overrides,
    ], {"model.tiny": TINY, "loss.kwargs": kwargs or {}, "options": options or {}})


def _batch(task, n: int = 4) -> TextBatch:
    data = task.stage_data(task.cfg.stages[0] if task.cfg.stages else _main_stage(task.cfg))
    return data.collate([data.train[i] for i in range(n)])


def _main_stage(cfg):
    from mmalign.train.loop import resolve_stages

    return resolve_stages(cfg)[0]


def _scores(task, ref_model, batch):
    policy = task.score(task.model, batch)
    with torch.no_grad():
        ref = task.score(ref_model, batch).detach()
    return policy, ref


# -- adapter ----------------------------------------------------------------------------------------------------
def _naive_logps(model, batch: TextBatch, b: int, k: int) -> torch.Tensor:
    """Full-vocabulary log-probs at the completion positions of candidate (b, k), from the model's forward."""
    prompt = batch.prompt_ids[b][batch.prompt_mask[b].bool()]
    comp = batch.completion_ids[b, k][batch.completion_mask[b, k].bool()]
    logits = model(input_ids=torch.cat([prompt, comp])[None]).logits.float()
    return logits.log_softmax(-1)[0, len(prompt) - 1 : -1]


@pytest.mark.parametrize("reference", ["copy", "adapter"])
@pytest.mark.parametrize("direction", ["ref_policy", "policy_ref"])
def test_adapter_per_token_kl_equals_full_logits_kl(reference, direction):
    torch.manual_seed(0)
    policy = build_tiny_causal_lm(VOCAB, **TINY)
    if reference == "adapter":
        policy = apply_lora(policy, r=4, alpha=8)
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        ref_model = None
    else:
        ref_model = build_tiny_causal_lm(VOCAB, **{**TINY, "initializer_range": 0.1}, seed=1)
    g = torch.Generator().manual_seed(0)
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    comp_mask = torch.tensor([[[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]])
    batch = TextBatch(torch.randint(3, VOCAB, (2, 4), generator=g) * prompt_mask, prompt_mask,
                      torch.randint(3, VOCAB, (2, 2, 5), generator=g) * comp_mask, comp_mask)
    pol = score_batch(policy, batch, return_states=True, return_layer_states=True)
    with torch.no_grad():
        if ref_model is None:
            with policy.disable_adapter():
                ref = score_batch(policy, batch, return_states=True)
        else:
            ref = score_batch(ref_model, batch, return_states=True)
    kl = token_kl_from_states(policy, ref_model, pol.extras["states"], ref.extras["states"], pol.token_mask,
                              chunk_size=3, direction=direction)
    assert kl.shape == (2, 2, 5) and kl[~pol.token_mask].abs().sum() == 0
    for b in range(2):
        for k in range(2):
            n = int(comp_mask[b, k].sum())
            logp = _naive_logps(policy, batch, b, k)
            with torch.no_grad():
                if ref_model is None:
                    with policy.disable_adapter():
                        ref_logp = _naive_logps(policy, batch, b, k)
                else:
                    ref_logp = _naive_logps(ref_model, batch, b, k)
            p, q = (logp, ref_logp) if direction == "policy_ref" else (ref_logp, logp)
            torch.testing.assert_close(kl[b, k, :n], (p.exp() * (p - q)).sum(-1), atol=1e-5, rtol=0)
    assert (kl[pol.token_mask] > 0).all()
    # Layer states: the decoder layers' outputs at the positions that predict each completion token.
    layers = pol.extras["layer_states"]
    assert layers.shape == (2, 2, 5, TINY["num_layers"], TINY["hidden_size"])
    prompt = batch.prompt_ids[0][prompt_mask[0].bool()]
    ids = torch.cat([prompt, batch.completion_ids[0, 0, :3]])[None]
    hidden = policy(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(layers[0, 0, :3, 0], hidden[1][0, 2:5], atol=1e-5, rtol=0)
    kl.sum().backward()  # differentiable w.r.t. the policy only
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    if ref_model is not None:
        assert all(p.grad is None for p in ref_model.parameters())


# -- TDPO through TextTask ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_at_policy_equal_reference_is_ln2_with_zero_kl(files, tmp_path, variant):
    task = build_task(_cfg(files, tmp_path, "tdpo", kwargs={"variant": variant}))
    batch = _batch(task)
    policy, ref = _scores(task, copy.deepcopy(task.model).eval(), batch)
    out = task.loss(policy, ref, batch)
    assert math.isclose(out.loss.item(), math.log(2), abs_tol=1e-6)
    assert abs(out.metrics["kl/chosen"].item()) < 1e-6 and abs(out.metrics["kl/rejected"].item()) < 1e-6


def _token_scores(lr: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor) -> tuple[Scores, Scores]:
    p = Scores(logps=lr.sum(-1), token_logps=lr, token_mask=mask, extras={"token_kl": kl})
    r = Scores(logps=torch.zeros_like(lr.sum(-1)), token_logps=torch.zeros_like(lr), token_mask=mask)
    return p, r


def test_tdpo2_stops_the_chosen_kl_gradient_and_scales_the_rejected_one_by_alpha():
    """TDPO2 (paper Eq. for L_TDPO2): sg on D(y_w), alpha on the KL margin; TDPO1: both KLs get gradient."""
    g = torch.Generator().manual_seed(0)
    lr = torch.randn(3, 2, 4, generator=g)
    mask = torch.ones(3, 2, 4, dtype=torch.bool)
    mask[1, 1, 2:] = False
    beta, alpha = 0.5, 0.3
    grads = {}
    for variant in ("tdpo1", "tdpo2"):
        kl = (torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(1)) * 0.5).requires_grad_(True)
        p, r = _token_scores(lr, kl, mask)
        out = METHODS["tdpo"].fn(p, r, None, {"beta": beta, "alpha": alpha, "variant": variant})
        out.loss.backward()
        grads[variant] = (kl.grad.clone(), out)
    g1, out1 = grads["tdpo1"]
    g2, out2 = grads["tdpo2"]
    assert g2[:, 0].abs().sum() == 0 and g1[:, 0][mask[:, 0]].abs().min() > 0  # sg(D(y_w)) only in TDPO2
    assert g1[:, 1][~mask[:, 1]].abs().sum() == 0 and g2[:, 1][~mask[:, 1]].abs().sum() == 0
    # d/dD_l of softplus(-beta*z), z = u - alpha*(D_l - sg(D_w)): alpha*beta*sigmoid(-beta*z), batch mean.
    d = lambda t: (t * mask).sum(-1)  # noqa: E731
    kl = torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(1)) * 0.5
    z2 = d(lr)[:, 0] - d(lr)[:, 1] - alpha * (d(kl)[:, 1] - d(kl)[:, 0])
    z1 = d(lr)[:, 0] - d(lr)[:, 1] - (d(kl)[:, 1] - d(kl)[:, 0])
    expect2 = alpha * beta * torch.sigmoid(-beta * z2) / 3
    expect1 = beta * torch.sigmoid(-beta * z1) / 3
    torch.testing.assert_close(g2[:, 1], expect2[:, None] * mask[:, 1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g1[:, 1], expect1[:, None] * mask[:, 1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g1[:, 0], -expect1[:, None] * mask[:, 0], atol=1e-6, rtol=1e-5)


def test_tdpo_gradient_reaches_the_policy_through_the_kl(files, tmp_path):
    """Away from the reference, TDPO1's policy gradient differs from DPO's on the same batch and reference: the
    per-token KL term (formed from both models' hidden states) reaches the policy's weights."""
    task = build_task(_cfg(files, tmp_path, "tdpo", kwargs={"variant": "tdpo1"}))
    ref_model = copy.deepcopy(task.model).eval()
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = _batch(task)

    def grads(name):
        task.method = METHODS[name]
        task.loss_kwargs = {"beta": 0.1} if name == "dpo" else {"beta": 0.1, "variant": "tdpo1"}
        task.model.zero_grad(set_to_none=True)
        policy, ref = _scores(task, ref_model, batch)
        task.loss(policy, ref, batch).loss.backward()
        return torch.cat([p.grad.flatten() for p in task.model.parameters() if p.grad is not None])

    g_dpo, g_tdpo = grads("dpo"), grads("tdpo")
    assert torch.isfinite(g_tdpo).all() and not torch.allclose(g_dpo, g_tdpo, atol=1e-7)


# -- SparsePO ------------------------------------------------------------------------------------------------------
def test_sparsepo_learned_masks_are_in_unit_interval_and_trained_only_through_the_heads(files, tmp_path):
    task = build_task(_cfg(files, tmp_path, "sparsepo", kwargs={"beta": 0.1}, options={"mask_dropout": 0.0}))
    assert isinstance(getattr(task.model, MASK_HEADS), SparseMaskHeads)
    batch = _batch(task)
    policy, ref = _scores(task, copy.deepcopy(task.model).eval(), batch)
    assert "layer_states" in ref.extras and not ref.extras["layer_states"].requires_grad
    assert "layer_states" not in policy.extras  # the policy's activations are not needed (grad-enabled pass)
    task.model.zero_grad(set_to_none=True)
    masks = task.family.finish_scores(policy, ref, task.method).extras["reward_mask"]
    valid = policy.token_mask
    assert masks.requires_grad and ((masks >= 0) & (masks <= 1)).all() and masks[~valid].abs().sum() == 0
    assert masks[valid].min() < masks[valid].max()  # token-dependent, not a constant
    masks.sum().backward()  # the masks' graph reaches the heads only, never the policy or the reference
    head_params = {id(p) for p in task.mask_heads.parameters()}
    for n, p in task.model.named_parameters():
        if id(p) in head_params:
            assert p.grad is not None, n
        else:
            assert p.grad is None or p.grad.abs().sum() == 0, n


def test_sparsepo_l1_term_pushes_the_masks_down(files, tmp_path):
    task = build_task(_cfg(files, tmp_path, "sparsepo", kwargs={"beta": 0.1, "l1_reward": 1.0, "l1_kl": 1.0},
                           options={"mask_dropout": 0.0}))
    batch = _batch(task)
    ref_model = copy.deepcopy(task.model).eval()
    opt = torch.optim.SGD(task.mask_heads.parameters(), lr=0.05)
    means = []
    for _ in range(4):
        policy, ref = _scores(task, ref_model, batch)
        policy = Scores(policy.logps.detach(), policy.token_logps.detach(), policy.token_mask, policy.lengths,
                        extras={k: v.detach() for k, v in policy.extras.items()})
        out = task.loss(policy, ref, batch)
        masks = task.family.finish_scores(policy, ref, task.method).extras["reward_mask"]
        means.append(masks[policy.token_mask].mean().item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert means[-1] < means[0] - 0.01, means


def test_sparse_mask_heads_independent_masks_and_unbounded_option():
    heads = SparseMaskHeads(8, 3, n_masks=2, dropout=0.0, max_value=None, init=2.0)
    out = heads(torch.randn(5, 7, 3, 8))
    assert out.shape == (5, 7, 2) and (out >= 0).all() and out.max() > 1  # the repo's unbounded ReLU
    with pytest.raises(ValueError, match="layers"):
        heads(torch.randn(5, 7, 2, 8))


def test_sparsepo_activation_masks_are_detached_and_rescaled_per_sequence(files, tmp_path):
    task = build_task(_cfg(files, tmp_path, "sparsepo_activation", kwargs={"beta": 0.1}))
    assert task.mask_heads is None
    batch = _batch(task)
    policy, ref = _scores(task, copy.deepcopy(task.model).eval(), batch)
    masks = task.family.finish_scores(policy, ref, task.method).extras["reward_mask"]
    valid = policy.token_mask
    assert not masks.requires_grad and ((masks >= 0) & (masks <= 1)).all() and masks[~valid].abs().sum() == 0
    multi = valid.sum(-1) > 1
    assert torch.allclose(masks.amax(-1)[multi], torch.ones(())), "each sequence's most active token gets 1"
    out = task.loss(policy, ref, batch)
    assert torch.isfinite(out.loss)


# -- end to end through the loop --------------------------------------------------------------------------------
@pytest.mark.parametrize("loss,kwargs,extra", [
    ("tdpo", {"variant": "tdpo1"}, []),
    ("tdpo", {"variant": "tdpo2", "alpha": 0.5}, []),
    ("tdpo", {"variant": "tdpo2"}, ["lora.enabled=true", "lora.r=4", "reference.strategy=adapter"]),
    ("sparsepo", {"l1_reward": 0.001, "l1_kl": 0.001}, ["run.save_final=true"]),
    ("sparsepo", {}, ["reference.strategy=ema"]),
    ("sparsepo_activation", {}, []),
])
def test_three_steps_through_mmalign_train_change_params_with_finite_losses(files, tmp_path, loss, kwargs, extra):
    cfg = _cfg(files, tmp_path / "run", loss, *extra, kwargs={"beta": 0.1, **kwargs},
               options={"independent_masks": "ema" in " ".join(extra)})
    task = build_task(cfg)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters() if p.requires_grad}
    summary = train(cfg, task=task)
    assert summary["global_step"] == 3
    after = dict(task.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, unchanged
    steps = [r for r in read_metrics(summary["metrics_file"]) if "loss" in r and "event" not in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) for r in steps)
    assert all(math.isfinite(r["kl/chosen"]) and r["kl/chosen"] >= 0 for r in steps)
    if "run.save_final=true" in extra:
        final = Path(summary["final_model"])
        state = torch.load(final / f"{MASK_HEADS}.pt", weights_only=True)
        assert state["num_layers"] == TINY["num_layers"]
        loaded = load_causal_lm(final)  # the HF checkpoint holds the LM only
        assert not any(MASK_HEADS in n for n, _ in loaded.named_parameters())


def test_precomputed_reference_is_refused_with_the_fix(files, tmp_path):
    with pytest.raises(ConfigError, match="precomputed.*per-token") as err:
        build_task(_cfg(files, tmp_path, "tdpo", "reference.strategy=precomputed"))
    assert "reference.strategy=copy" in str(err.value)
    with pytest.raises(ConfigError, match="mask_dropout"):
        build_task(_cfg(files, tmp_path, "sparsepo", options={"mask_dropout": 1.5}))
    with pytest.raises(ConfigError, match="options"):
        build_task(_cfg(files, tmp_path, "tdpo", options={"kl_chunk": 4}))


@pytest.mark.slow
def test_demo_runs_and_reports_reward_and_kl(tmp_path):
    from mmalign.demos import token_dpo

    report = token_dpo.run(tmp_path / "demo", sft_steps=60, steps=20, n_eval=32)
    assert set(report["runs"]) == {"dpo", "tdpo2"}
    for r in report["runs"].values():
        assert math.isfinite(r["reward"]) and math.isfinite(r["kl"])
    assert (tmp_path / "demo" / "report.md").exists() and (tmp_path / "demo" / "tradeoff.png").exists()
