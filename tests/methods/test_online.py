"""Online DPO / XPO recipe (mmalign.methods.online): judging, ties, seeded generation, XPO's bonus, end-to-end runs
and the reward-model path. Tiny random models; the demo run itself is marked slow."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmalign.api import build_task, load_train_config, train
from mmalign.config import ConfigError
from mmalign.data.rows import DataError
from mmalign.data.synthetic import addition_rows, corpus, write_jsonl
from mmalign.methods.online import OnlineDPOTask, online_loss
from mmalign.schema import StageConfig
from mmalign.types import Scores

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
        "initializer_range": 0.1}
REWARD = "tests.methods.test_online:digit_reward"


def digit_reward(completion: str) -> float:
    """Number of digit characters: graded, so that random samples rarely tie."""
    return float(sum(ch.isdigit() for ch in completion))


def constant_reward(prompt: str, completion: str) -> float:
    return 0.5


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from mmalign.models.tokenizer import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("online")
    rows = addition_rows(16, format="sft", seed=0)
    write_jsonl([{"prompt": r["prompt"]} for r in rows], d / "prompts.jsonl")
    write_jsonl(addition_rows(8, format="pairs", seed=1), d / "pairs.jsonl")
    tok = train_bpe_tokenizer(corpus(addition_rows(64, format="pairs", seed=0)), vocab_size=300)
    tok.save_pretrained(str(d / "tok"))
    return {"prompts": d / "prompts.jsonl", "pairs": d / "pairs.jsonl", "tok": d / "tok", "dir": d}


def _cfg(files, out: Path, loss: str = "online_dpo", **options):
    kwargs = {"beta": 0.1, **({"alpha": options.pop("alpha")} if "alpha" in options else {})}
    return load_train_config({
        "model": {"name_or_path": "tiny", "tiny": dict(TINY), "tokenizer": str(files["tok"])},
        "data": {"train": [str(files["prompts"])], "max_length": 32},
        "loss": {"name": loss, "kwargs": kwargs},
        "options": {"reward_fn": REWARD, "max_new_tokens": 4, "temperature": 1.0, **options},
        "optim": {"lr": 1e-2, "scheduler": "constant", "max_grad_norm": None},
        "run": {"output_dir": str(out), "max_steps": 3, "batch_size": 8, "resume": "never", "report_to": ["jsonl"],
                "progress": False, "save_final": False, "seed": 0, "log_every": 1},
    })


def _batch(task: OnlineDPOTask, n: int = 8):
    data = task.stage_data(StageConfig(name="main"))
    batch = data.collate([data.train[i] for i in range(n)])
    batch.extras["index"] = torch.arange(n)
    return batch


def _decode(task, ids, mask) -> str:
    return task.tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)


def test_higher_reward_is_chosen(files, tmp_path):
    task = OnlineDPOTask(_cfg(files, tmp_path))
    b = task.prepare_batch(task.model, _batch(task), step=0)
    assert b.completion_ids.shape[:2] == (8, 2) and b.completion_mask[:, :, 0].all()
    r = b.extras["sample_rewards"]
    for i in range(8):  # stored rewards are the reward of what the batch holds, in chosen/rejected order
        got = [digit_reward(_decode(task, b.completion_ids[i, k], b.completion_mask[i, k])) for k in range(2)]
        assert got == r[i].tolist()
    assert (r[:, 0] >= r[:, 1]).all() and (r[:, 0] > r[:, 1]).any()
    assert b.extras["ties"].sum() == (r[:, 0] == r[:, 1]).sum()


def test_ties_keep_and_drop(files, tmp_path):
    spec = "tests.methods.test_online:constant_reward"
    keep = OnlineDPOTask(_cfg(files, tmp_path, reward_fn=spec))
    kb = keep.prepare_batch(keep.model, _batch(keep), step=0)
    pol, ref = keep.score(keep.model, kb), keep.score(keep.model, kb)
    out = keep.loss(pol, ref, kb)
    assert out.metrics["samples/ties"] == 8 and "sample_weight" not in kb.extras
    assert math.isclose(out.loss.item(), math.log(2), rel_tol=1e-6)  # policy == reference: ln 2, ties kept

    drop = OnlineDPOTask(_cfg(files, tmp_path, reward_fn=spec, ties="drop"), tokenizer=keep.tokenizer,
                         model=keep.model)
    db = drop.prepare_batch(drop.model, _batch(drop), step=0)
    assert torch.equal(db.completion_ids, kb.completion_ids)  # same seed, same model: same samples
    assert (db.extras["sample_weight"] == 0).all()
    pol = drop.score(drop.model, db)
    out = drop.loss(pol, pol.detach(), db)
    assert out.loss.item() == 0.0 and out.metrics["samples/ties"] == 8
    # partly tied: the dropped rows weigh nothing in the mean
    db.extras["sample_weight"] = torch.tensor([1.0, 0, 1, 0, 0, 0, 0, 0])
    lw = torch.randn(8, 2)
    scores = Scores(logps=lw, lengths=torch.full((8, 2), 3))
    zero = Scores(logps=torch.zeros(8, 2), lengths=torch.full((8, 2), 3))
    full = online_loss(scores, zero, db, {"beta": 0.1})
    expect = -torch.nn.functional.logsigmoid(0.1 * (lw[:, 0] - lw[:, 1]))[[0, 2]].mean()
    assert torch.allclose(full.loss, expect)


def test_generation_is_seeded_by_step_and_leaves_the_rng_alone(files, tmp_path):
    task = OnlineDPOTask(_cfg(files, tmp_path))
    batch = _batch(task)
    task.model.train()
    rng = torch.get_rng_state()
    a = task.prepare_batch(task.model, batch, step=5)
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is not shifted (exact resume)
    torch.manual_seed(1234)  # whatever the global RNG holds, (seed, step, examples) fixes the samples
    b = task.prepare_batch(task.model, batch, step=5)
    c = task.prepare_batch(task.model, batch, step=6)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert not (a.completion_ids.shape == c.completion_ids.shape and torch.equal(a.completion_ids, c.completion_ids))
    assert task.model.training  # train mode restored after generating


def test_xpo_alpha_zero_is_online_dpo_and_bonus_gradient_is_plus_alpha(files, tmp_path):
    task = OnlineDPOTask(_cfg(files, tmp_path, loss="xpo", alpha=0.5))
    b = task.prepare_batch(task.model, _batch(task), step=0)
    idx = b.extras["ref_sample_index"]
    # the reference sample is the rejected one exactly where the policy sample won (ties go to the policy)
    assert torch.equal(idx.bool(), b.extras["first_rewards"] >= b.extras["second_rewards"])
    logps = torch.randn(8, 2, requires_grad=True)
    pol = Scores(logps=logps, lengths=torch.full((8, 2), 4))
    ref = Scores(logps=torch.randn(8, 2), lengths=torch.full((8, 2), 4))
    kw = {"beta": 0.1}
    xpo0 = online_loss(pol, ref, b, kw, alpha=0.0, xpo=True)
    dpo = online_loss(pol, ref, b, kw, xpo=False)
    assert xpo0.loss.item() == dpo.loss.item()  # arXiv 2405.21046: XPO with α=0 is online DPO
    alpha = 0.5
    (g_x,) = torch.autograd.grad(online_loss(pol, ref, b, kw, alpha=alpha, xpo=True).loss, logps)
    (g_d,) = torch.autograd.grad(dpo.loss, logps)
    onehot = torch.nn.functional.one_hot(idx, 2).float()
    assert torch.allclose(g_x - g_d, alpha / 8 * onehot)  # ∂L/∂log π(ỹ) = +α (mean over the batch)

    # on the model: a step on the bonus alone lowers the policy's log-prob of the reference samples
    pol_scores = task.score(task.model, b)
    lp0 = pol_scores.logps.gather(1, idx[:, None]).sum()
    only_bonus = online_loss(pol_scores, pol_scores.detach(), b, kw, alpha=alpha, xpo=True).loss - \
        online_loss(pol_scores, pol_scores.detach(), b, kw, xpo=False).loss
    only_bonus.backward()
    with torch.no_grad():
        for p in task.model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    assert task.score(task.model, b).logps.gather(1, idx[:, None]).sum() < lp0


@pytest.mark.parametrize("loss", ["online_dpo", "xpo"])
def test_three_steps_change_params_with_finite_loss(files, tmp_path, loss):
    cfg = _cfg(files, tmp_path / loss, loss=loss, **({"alpha": 1e-3} if loss == "xpo" else {}))
    task = build_task(cfg)
    assert isinstance(task, OnlineDPOTask)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    summary = train(cfg, task=task)
    final = summary["stages"][-1]["final"]
    assert summary["global_step"] == 3 and all(math.isfinite(v) for v in final.values())
    assert {"samples/reward_chosen", "samples/reward_rejected", "samples/ties", "rewards/accuracies",
            "rewards/margins"} <= set(final)
    if loss == "xpo":
        assert {"loss/xpo", "xpo/ref_sample_logps", "samples/reward_ref"} <= set(final)
    changed = [n for n, p in task.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed


def test_resumed_run_regenerates_the_same_samples(files, tmp_path):
    """Exact resume: a run resumed from its step-2 checkpoint ends with the uninterrupted run's weights, which
    needs the same samples at steps 3-4 (generation seeded from (seed, step, examples), not the global RNG)."""
    def run(out, resume="never"):
        cfg = _cfg(files, out, loss="xpo", alpha=1e-3)
        cfg.run.max_steps, cfg.run.save_every, cfg.run.keep_last, cfg.run.deterministic = 4, 2, 10, True
        cfg.run.resume = resume
        task = build_task(cfg)
        train(cfg, task=task)
        return task

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-0000002"))
    for (n, p), q in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_xpo_with_lora_samples_the_reference_with_the_adapter_disabled(files, tmp_path):
    cfg = _cfg(files, tmp_path, loss="xpo")
    cfg.lora.enabled, cfg.reference.strategy = True, "adapter"
    task = OnlineDPOTask(cfg)
    assert task._ref_sampler is None  # no second copy of the weights
    b = task.prepare_batch(task.model, _batch(task), step=0)
    assert b.completion_ids.shape[:2] == (8, 2) and "ref_sample_index" in b.extras


def test_reward_model_path(files, tmp_path):
    from mmalign.methods.rewards import ModelReward
    from mmalign.models.text import ValueHeadModel, build_tiny_causal_lm, load_tokenizer

    tok = load_tokenizer(files["tok"])
    rm_dir = tmp_path / "rm"
    ValueHeadModel(build_tiny_causal_lm(len(tok), seed=3, **TINY)).save_pretrained(str(rm_dir))
    tok.save_pretrained(str(rm_dir))
    cfg = _cfg(files, tmp_path, reward_fn=None, reward_model=str(rm_dir))
    task = OnlineDPOTask(cfg)
    b = task.prepare_batch(task.model, _batch(task), step=0)
    texts = [_decode(task, b.completion_ids[i, k], b.completion_mask[i, k]) for i in range(8) for k in range(2)]
    prompts = [m["prompt"] for m in b.meta for _ in range(2)]
    direct = torch.tensor(ModelReward(rm_dir)(prompts, texts)).view(8, 2)
    assert torch.allclose(direct, b.extras["sample_rewards"], atol=1e-5)
    assert (direct[:, 0] >= direct[:, 1]).all() and (b.extras["ties"] == 0).all()  # real-valued: no ties
    (rm_dir / "value_head.safetensors").unlink()
    with pytest.raises(ConfigError, match="value_head"):
        OnlineDPOTask(cfg)


def test_bad_options_and_rows_are_reported(files, tmp_path):
    with pytest.raises(ConfigError) as e:
        OnlineDPOTask(_cfg(files, tmp_path, reward_model="x", temperature=0.0, bogus=1))
    assert "bogus" in str(e.value)
    with pytest.raises(ConfigError, match="exactly one of reward_fn"):
        OnlineDPOTask(_cfg(files, tmp_path, reward_model="x", temperature=0.5))
    with pytest.raises(ConfigError, match="cannot be imported"):
        OnlineDPOTask(_cfg(files, tmp_path, reward_fn="tests.methods.test_online:nope"))
    cfg = _cfg(files, tmp_path)
    cfg.reference.strategy = "precomputed"
    with pytest.raises(ConfigError, match="precomputed"):
        OnlineDPOTask(cfg)
    bad = files["dir"] / "bad.jsonl"
    write_jsonl([{"prompt": "add: 1 2 ="}, {"chosen": "x"}], bad)
    cfg = _cfg(files, tmp_path)
    cfg.data.train = [str(bad)]
    task = OnlineDPOTask(cfg)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'prompt'"):
        task.stage_data(StageConfig(name="main"))
    cfg.data.skip_bad_rows = True
    stats = OnlineDPOTask(cfg).stage_data(StageConfig(name="main")).stats
    assert stats["rows_used"] == 1 and stats["skipped/bad_prompt"] == 1


@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path):
    from mmalign.demos.online_dpo import run

    report = run(tmp_path, sft_steps=60, steps=10, n_eval=32, xpo=False)
    assert {"method", "metric", "before", "after", "higher_is_better"} <= set(report)
    assert (tmp_path / "report.md").is_file() and (tmp_path / "training_curves.png").is_file()
