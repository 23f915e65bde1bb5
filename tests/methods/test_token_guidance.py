"""Token-level guidance (Yang et al. 2023, arXiv 2306.00398): aggregates, ListMLE fitting, seeded tie-breaking,
WMLE reductions, and an end-to-end run through the one loop that trains both models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmalign.api import build_task, load_train_config, train
from mmalign.config import ConfigError
from mmalign.data.batches import TextBatch
from mmalign.data.synthetic import addition_rows, corpus, write_jsonl
from mmalign.losses import aggregate_token_values, listmle
from mmalign.methods.rewards import TokenRewardModel
from mmalign.methods.token_guidance import GUIDANCE, LM, TokenGuidanceTask
from mmalign.models.text import build_tiny_causal_lm, load_causal_lm
from mmalign.types import Scores

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
        "initializer_range": 0.1}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from mmalign.models.tokenizer import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("tg")
    rows = addition_rows(16, format="sft", seed=5)
    write_jsonl(rows, d / "sft.jsonl")
    tok = train_bpe_tokenizer(corpus(addition_rows(64, format="sft", seed=0)), vocab_size=300)
    tok.save_pretrained(str(d / "tok"))
    return {"sft": d / "sft.jsonl", "tok": d / "tok", "dir": d}


def _cfg(files, tmp_path: Path, *extra: str, **options):
    opts = {"num_samples": 3, "max_new_tokens": 3, "reward_fn": "addition", **options}
    return load_train_config(None, [*extra,
        "modality=text", "model.name_or_path=tiny", f"model.tokenizer={files['tok']}",
        f"data.train=[{files['sft']}]", "data.max_length=24", "loss.name=token_guidance", "reference.strategy=none",
        "optim.lr=1e-2", "optim.scheduler=constant", "run.batch_size=4", "run.max_steps=3", "run.log_every=1",
        "run.report_to=[jsonl]", "run.progress=false", f"run.output_dir={tmp_path / 'run'}", "run.resume=never",
    ], {"model.tiny": TINY, "options": opts})


def _toy_batch(k_lengths: list[int], vocab: int = 50, seed: int = 0) -> TextBatch:
    g = torch.Generator().manual_seed(seed)
    k, c = len(k_lengths), max(k_lengths)
    comp = torch.randint(3, vocab, (1, k, c), generator=g)
    mask = torch.zeros(1, k, c, dtype=torch.long)
    for i, n in enumerate(k_lengths):
        mask[0, i, :n] = 1
    return TextBatch(torch.randint(3, vocab, (1, 4), generator=g), torch.ones(1, 4, dtype=torch.long), comp, mask)


def test_aggregates_match_the_documented_formulas():
    r = torch.tensor([[[0.2, 0.5, 0.9, 0.0], [0.4, 0.1, 0.0, 0.0]]])
    m = torch.tensor([[[1, 1, 1, 0], [1, 1, 0, 0]]]).bool()
    list_len = (3 + 2) / 2
    t = 2.0
    expected = {
        "sum": [1.6, 0.5],
        "mean_list_len": [1.6 / 3 * list_len, 0.5 / 2 * list_len],
        "softmax": [t * math.log(sum(math.exp(x / t) for x in (0.2, 0.5, 0.9))) * list_len,
                    t * math.log(math.exp(0.2) + math.exp(0.05)) * list_len],
        "softmin": [-t * math.log(sum(math.exp(-x / t) for x in (0.2, 0.5, 0.9))) * list_len,
                    -t * math.log(math.exp(-0.2) + math.exp(-0.05)) * list_len],
    }
    for mode, want in expected.items():
        got = aggregate_token_values(r, m, mode=mode, temperature=t)
        torch.testing.assert_close(got, torch.tensor([want]), msg=mode)


def test_task_score_is_the_configured_aggregate_of_token_rewards(files, tmp_path):
    for mode in ("sum", "mean_list_len", "softmin"):
        task = build_task(_cfg(files, tmp_path, aggregate=mode, reward_backbone="tiny"))
        batch = _toy_batch([3, 2, 4], vocab=len(task.tokenizer))
        batch.extras["tg_phase"] = torch.tensor([GUIDANCE])
        s = task.score(task.model, batch)
        r = s.extras["token_rewards"]
        assert bool((r.detach()[batch.completion_mask.bool()] > 0).all()) and float(r.detach().max()) < 1  # sigmoid
        assert float(r.detach()[0, 1, 2:].abs().sum()) == 0.0  # masked tokens carry no reward
        torch.testing.assert_close(s.logps, aggregate_token_values(r, batch.completion_mask, mode=mode))


def test_listmle_fits_the_reward_model_to_a_fixed_ranking():
    torch.manual_seed(0)
    model = TokenRewardModel(build_tiny_causal_lm(50, seed=0, **TINY), squash="sigmoid")
    batch = _toy_batch([4, 3, 5, 2], seed=1)
    true = torch.tensor([[1.0, 3.0, 0.0, 2.0]])  # wanted order: 1, 3, 0, 2
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        agg = aggregate_token_values(model(batch), batch.completion_mask, mode="mean_list_len")
        out = listmle(agg, true)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    agg = aggregate_token_values(model(batch), batch.completion_mask, mode="mean_list_len")
    assert agg.argsort(descending=True)[0].tolist() == [1, 3, 0, 2]
    assert losses[-1] < losses[0] and losses[0] > 0.5 * math.log(24)


def test_tie_breaking_is_seeded_and_deterministic(files, tmp_path):
    task = build_task(_cfg(files, tmp_path, reward_backbone="tiny"))
    batch = _toy_batch([3, 3, 3, 3], vocab=len(task.tokenizer))
    batch.extras["seq_rewards"] = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # two ties
    scores = Scores(logps=torch.tensor([[0.3, -0.2, 0.5, 0.1]]), token_mask=batch.completion_mask.bool(),
                    extras={"token_rewards": torch.rand(1, 4, 3)})

    def loss_at(step: int) -> float:
        b = TextBatch(**{**batch.__dict__, "extras": {**batch.extras, "tg_phase": torch.tensor([GUIDANCE]),
                                                       "tg_step": torch.tensor([step])}})
        return task.loss(scores, None, b).loss.item()

    assert [loss_at(s) for s in range(8)] == [loss_at(s) for s in range(8)]
    assert len({round(loss_at(s), 6) for s in range(8)}) > 1  # ties do get broken differently across steps
    # The samples themselves are a function of (seed, step) too.
    data = task.stage_data(task.cfg.stages[0] if task.cfg.stages else _stage())
    raw = data.collate([data.train[i] for i in range(4)])
    a, b = task.prepare_batch(task.model, raw, 0), task.prepare_batch(task.model, raw, 0)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.extras["seq_rewards"],
                                                                          b.extras["seq_rewards"])
    assert a.completion_ids.shape[:2] == (4, 3)


def _stage():
    from mmalign.schema import StageConfig

    return StageConfig(name="main")


def test_wmle_with_constant_weights_is_plain_length_normalised_nll(files, tmp_path):
    task = build_task(_cfg(files, tmp_path, reward_backbone="tiny"))
    logps = -torch.rand(2, 1, 5) * 3
    mask = torch.tensor([[[1, 1, 1, 0, 0]], [[1, 1, 1, 1, 1]]]).bool()
    batch = _toy_batch([5], vocab=len(task.tokenizer))
    batch = TextBatch(batch.prompt_ids.repeat(2, 1), batch.prompt_mask.repeat(2, 1),
                      batch.completion_ids.repeat(2, 1, 1), mask.long(),
                      extras={"tg_phase": torch.tensor([LM, LM]), "tg_step": torch.tensor([1, 1])})
    const = Scores(logps=logps.sum(-1), token_logps=logps, token_mask=mask,
                   extras={"token_rewards": torch.full((2, 1, 5), 0.37)})
    out = task.loss(const, None, batch)
    plain = torch.stack([-logps[0, 0, :3].mean(), -logps[1, 0].mean()]).mean()
    torch.testing.assert_close(out.loss, plain)
    # Non-constant rewards re-weight the tokens (weights normalised per sequence, no grad into the rewards).
    r = torch.rand(2, 1, 5, requires_grad=True)
    out2 = task.loss(Scores(logps=logps.sum(-1), token_logps=logps, token_mask=mask,
                            extras={"token_rewards": r}), None, batch)
    assert not out2.loss.requires_grad
    w = r.detach()[0, 0, :3] / r.detach()[0, 0, :3].sum()
    torch.testing.assert_close(out2.per_example[0], -(w * logps[0, 0, :3]).sum())


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict, module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.named_parameters())


@pytest.mark.parametrize("options", [{}, {"lm_objective": "self_sample", "entropy_coef": 0.125,
                                          "aggregate": "softmax", "reward_backbone": "tiny", "head_hidden": 8}])
def test_three_steps_train_both_models_and_save_the_policy(files, tmp_path, options):
    from mmalign.train.metrics_log import read_metrics

    # The second run also evaluates (held-out completions, reward-weighted NLL) at the end of the stage.
    cfg = _cfg(files, tmp_path, *([f"data.eval=[{files['sft']}]"] if options else []), **options)
    task = build_task(cfg)
    assert isinstance(task, TokenGuidanceTask)
    pol, rew = _snapshot(task.model.policy), _snapshot(task.model.reward)
    summary = train(cfg, task=task)
    assert summary["global_step"] == 3
    assert _changed(pol, task.model.policy) and _changed(rew, task.model.reward)
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert "guidance/listmle" in rows[0] and "lm/weight_mean" in rows[1] and "guidance/listmle" in rows[2]
    if options:
        assert "lm/entropy/entropy/mean" in rows[1] and "lm/loss/entropy" in rows[1]
        assert math.isfinite(summary["stages"][0]["eval"]["eval/loss"])
    # The policy is what save_pretrained writes; the reward model sits beside it and reloads exactly.
    final = Path(summary["final_model"])
    lm = load_causal_lm(final)
    ids = torch.tensor([[1, 5, 7]])
    torch.testing.assert_close(lm(ids).logits, task.model.policy.eval()(ids).logits)
    rm = TokenRewardModel.from_pretrained(final / "token_reward_model").eval()
    batch = _toy_batch([3, 2], vocab=len(task.tokenizer))
    torch.testing.assert_close(rm(batch), task.model.reward.eval()(batch))


def test_bad_options_are_reported_together(files, tmp_path):
    with pytest.raises(ConfigError) as e:
        TokenGuidanceTask(_cfg(files, tmp_path, num_samples=1, aggregate="median", bogus=3))
    text = str(e.value)
    assert "aggregate" in text and "bogus" in text
    with pytest.raises(ConfigError, match="num_samples"):
        TokenGuidanceTask(_cfg(files, tmp_path, num_samples=1))
    with pytest.raises(ConfigError, match="reward_fn"):
        TokenGuidanceTask(_cfg(files, tmp_path, reward_fn="nope"))
    with pytest.raises(ConfigError, match="self_sample"):
        TokenGuidanceTask(_cfg(files, tmp_path, entropy_coef=0.1))


@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path):
    from mmalign.demos.token_guidance import run

    report = run(tmp_path / "demo", sft_steps=60, guidance_steps=20, n_eval=32)
    assert report["method"] == "token_guidance" and report["higher_is_better"] is True
    assert 0 <= report["before"] <= 1 and 0 <= report["after"] <= 1
    assert (tmp_path / "demo" / "report.md").exists() and (tmp_path / "demo" / report["plots"][0]).exists()


def test_reward_functions_and_weight_options():
    from mmalign.methods.rewards import load_reward_fn
    from mmalign.methods.token_guidance import token_weights

    add = load_reward_fn("mmalign.methods.rewards:_addition")  # the "module:function" form, batched
    assert add(["add: 3 5 ="] * 3, [" 8", " 10", " x"]) == [1.0, 1 / 3, 0]
    assert load_reward_fn("warm_colors")(["colors:"], [" red blue gold teal mint coral"]) == [0.5]
    r, m = torch.full((1, 4), 0.5), torch.tensor([[1, 1, 1, 0]]).bool()
    # reward-to-go of a constant c on n tokens is c·(n − t) (research note §2.4, invariant 5)
    torch.testing.assert_close(token_weights(r, m, use_reward_to_go=True), torch.tensor([[1.5, 1.0, 0.5, 0.0]]))
    torch.testing.assert_close(token_weights(r, m, exp_weights=True), torch.tensor([[math.exp(0.5)] * 3 + [0.0]]))


def test_reward_function_signatures_and_bad_outputs(tmp_path, monkeypatch):
    import sys
    import types

    from mmalign.config import ConfigError
    from mmalign.methods.rewards import load_reward_fn

    mod = types.ModuleType("user_rewards")
    mod.only_completions = lambda completions: [len(c) for c in completions]  # TRL form without prompts=
    mod.with_kwargs = lambda completions, **kw: [len(kw["prompts"][i]) for i in range(len(completions))]
    mod.varargs = lambda *args: len(args[0]) + len(args[1])  # (prompt, completion) through *args
    mod.short = lambda completions, prompts: [1.0]
    mod.not_a_function = 3
    monkeypatch.setitem(sys.modules, "user_rewards", mod)
    assert load_reward_fn("user_rewards:only_completions")(["p", "q"], ["ab", "c"]) == [2.0, 1.0]
    assert load_reward_fn("user_rewards:with_kwargs")(["p", "qq"], ["ab", "c"]) == [1.0, 2.0]
    assert load_reward_fn("user_rewards:varargs")(["p"], ["ab"]) == [3.0]
    with pytest.raises(ValueError, match="one finite number per completion"):
        load_reward_fn("user_rewards:short")(["p", "q"], ["a", "b"])
    with pytest.raises(ConfigError, match="not a function"):
        load_reward_fn("user_rewards:not_a_function")
    chat = [[{"role": "user", "content": "add: 3 5 ="}]]
    assert load_reward_fn("addition")(chat, [" 8"]) == [1.0]  # conversational prompts reach named rewards as text
