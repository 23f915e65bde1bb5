"""Feng et al. 2025 sequence-level contrastive training (mmalign.data.negatives + methods.seq_contrastive).

Negative generators keep their documented invariants (TN strict prefix + EOS; MN changes at most round(c·L)
positions and only where the teacher-forced prediction differs; BN never the row's own positive; AN are the
model's own samples, deterministic per seed/step); the loss is log K at policy == reference and sigmoid DPO for one
negative; a 3-step mmalign.train run changes every trainable weight with finite metrics; bad options are reported
together.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmalign import losses as L
from mmalign.api import build_task, load_train_config, train
from mmalign.config import ConfigError
from mmalign.data import negatives as N
from mmalign.data.synthetic import addition_rows, corpus, write_jsonl
from mmalign.types import Scores

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
        "initializer_range": 0.1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from mmalign.models.tokenizer import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("seqc")
    write_jsonl(addition_rows(16, format="sft", seed=5), d / "sft.jsonl")
    write_jsonl(addition_rows(8, format="sft", seed=6), d / "eval.jsonl")
    tok = train_bpe_tokenizer(corpus(addition_rows(64, format="sft", seed=0)), vocab_size=300)
    tok.save_pretrained(str(d / "tok"))
    return d


def _cfg(d, out, options=None, **loss):
    return {"modality": "text", "model": {"name_or_path": "tiny", "tiny": dict(TINY), "tokenizer": str(d / "tok")},
            "data": {"train": [str(d / "sft.jsonl")], "eval": [str(d / "eval.jsonl")], "max_length": 32},
            "loss": {"name": "seq_contrastive", "kwargs": {"beta": 0.1}, **loss},
            "options": {"negatives": ["autoregressive", "batch", "mean_field", "truncation"], "max_new_tokens": 6,
                        **(options or {})},
            "optim": {"lr": 1e-2, "scheduler": "constant", "max_grad_norm": None},
            "run": {"output_dir": str(out), "max_steps": 3, "batch_size": 4, "resume": "never",
                    "report_to": ["jsonl"], "progress": False, "save_final": False, "seed": 0}}


@pytest.fixture(scope="module")
def task_batch(files, tmp_path_factory):
    task = build_task(load_train_config(_cfg(files, tmp_path_factory.mktemp("run"))))
    data = task.stage_data(task.cfg.stages[0] if task.cfg.stages else _main_stage())
    batch = data.collate([data.train[i] for i in range(8)])
    batch.extras["index"] = torch.arange(8)
    return task, batch


def _main_stage():
    from mmalign.schema import StageConfig

    return StageConfig(name="main")


def test_truncation_is_strict_prefix_plus_eos():
    pos = [[5, 6, 7, 8, 2], [9, 2], [4, 4, 4]]  # EOS = 2; the last row has no EOS (cut by max_length)
    negs = N.truncation_negatives(pos, eos_id=2, num=20, generator=torch.Generator().manual_seed(0))
    for own, row in zip(pos, negs, strict=True):
        body = N.content(own, 2)
        assert len(row) == 20
        for neg in row:
            assert neg[-1] == 2 and len(neg) - 1 < len(body) and neg[:-1] == body[: len(neg) - 1]
    assert N.truncation_negatives([[2]], eos_id=2, num=3, generator=torch.Generator()) == [[]]  # no strict prefix


def test_mean_field_replaces_round_c_times_length_positions():
    pos = [[10 + t for t in range(20)] + [2]]  # 20 content tokens + EOS
    batch = _one_row_batch(pos[0])
    differ = torch.tensor(pos[0]).add(100).view(1, 1, -1).expand(4, 1, -1)  # predictions differ everywhere
    for rate, expect in [(0.1, 2), (0.25, 5), (0.5, 10), (0.01, 1)]:
        negs = N.mean_field_negatives(None, batch, rate=rate, num=4, eos_id=2, generator=torch.Generator(),
                                      predictions=differ)
        for neg in negs[0]:
            assert sum(a != b for a, b in zip(neg, pos[0], strict=True)) == expect and neg[-1] == 2


def _one_row_batch(ids):
    from mmalign.data.batches import TextBatch

    return TextBatch(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long),
                     torch.tensor([[ids]]), torch.ones(1, 1, len(ids), dtype=torch.long))


def test_batch_negatives_never_include_own_positive():
    pos = [[1, 2], [1, 2], [3, 2], [4, 2], [1, 2]]  # rows 0, 1, 4 share an answer
    for seed in range(5):
        negs = N.batch_negatives(pos, num=3, generator=torch.Generator().manual_seed(seed))
        for own, row in zip(pos, negs, strict=True):
            assert row and all(neg != own for neg in row) and len(row) <= 3
    assert N.batch_negatives([[1, 2], [1, 2]], num=2, generator=torch.Generator()) == [[], []]


@pytest.mark.parametrize("rate", [0.25, 1.0])
def test_mean_field_changes_at_most_c_and_only_where_prediction_differs(task_batch, rate):
    task, batch = task_batch
    logits = N.teacher_forced_logits(task.model, batch)
    preds = N.teacher_forced_predictions(logits, sample=False, temperature=1.0, generator=torch.Generator(), num=3)
    negs = N.mean_field_negatives(task.model, batch, rate=rate, num=3, eos_id=task.eos_id,
                                  generator=torch.Generator().manual_seed(1))
    for i, (own, row) in enumerate(zip(N.positives(batch), negs, strict=True)):
        n_content = len(N.content(own, task.eos_id))
        for neg in row:
            assert len(neg) == len(own) and neg[-1] == own[-1]  # EOS kept
            changed = [t for t in range(len(own)) if neg[t] != own[t]]
            assert len(changed) <= max(1, round(rate * n_content))
            assert all(neg[t] == preds[0, i, t] for t in changed)  # replaced by the model's prediction
            if rate == 1.0:  # every content position: exactly where the prediction differs
                assert changed == [t for t in range(n_content) if preds[0, i, t] != own[t]]


def test_autoregressive_negatives_come_from_the_model_and_are_deterministic(task_batch):
    task, batch = task_batch
    kw = dict(num=1, max_new_tokens=4, top_p=1.0, eos_id=task.eos_id, pad_id=task.pad_id)
    greedy = N.autoregressive_negatives(task.model, batch, temperature=0.0, seed=0, **kw)
    lm = task.model
    with torch.no_grad():  # greedy decoding by hand, one full forward per token
        for i in range(batch.batch_size):
            ids = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
            out = []
            for _ in range(4):
                nxt = int(lm(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
                out.append(nxt)
                if nxt == task.eos_id:
                    break
            assert greedy[i][0] == out
    a = N.autoregressive_negatives(task.model, batch, temperature=1.0, seed=7, **kw)
    assert a == N.autoregressive_negatives(task.model, batch, temperature=1.0, seed=7, **kw)
    b1, b2 = task.prepare_batch(task.model, batch, 3), task.prepare_batch(task.model, batch, 3)
    assert torch.equal(b1.completion_ids, b2.completion_ids) and torch.equal(b1.candidate_mask, b2.candidate_mask)
    b3 = task.prepare_batch(task.model, batch, 4)
    assert not torch.equal(b1.completion_ids, b3.completion_ids) or b1.completion_ids.shape != b3.completion_ids.shape


def test_candidates_layout_and_similarity_ranking(task_batch):
    task, batch = task_batch
    out = task.prepare_batch(task.model, batch, 0)
    assert N.positives(out) == N.positives(batch)
    assert (out.labels[:, 0] == 0).all() and torch.isnan(out.labels[:, 1:]).all()  # top-1 form
    kinds = out.extras["candidate_kind"]
    assert ((kinds >= 0) == out.candidate_mask).all() and (kinds[:, 0] == 0).all()
    for i in range(out.batch_size):  # no negative equals its positive
        pos = out.completion_ids[i, 0][out.completion_mask[i, 0].bool()].tolist()
        for k in range(1, out.num_candidates):
            if out.candidate_mask[i, k]:
                assert out.completion_ids[i, k][out.completion_mask[i, k].bool()].tolist() != pos
    assert N.lcs_ratio([1, 2, 3], [1, 2, 3]) == 1.0 and N.lcs_ratio([1, 2], [3]) == 0.0
    assert N.lcs_ratio([1, 2, 3, 4], [1, 3]) == pytest.approx(2 * 2 / 6)
    ranked = N.build_candidates(batch, [[("truncation", [9, task.eos_id]), ("batch", list(
        N.positives(batch)[0][:-1]) + [99, task.eos_id])]] + [[] for _ in range(batch.batch_size - 1)],
        pad_id=task.pad_id, eos_id=task.eos_id, rank_by_similarity=True)
    assert ranked.labels[0].tolist() == [0.0, 1.0, 2.0]  # the near-copy ranks above the unrelated one
    assert ranked.extras["candidate_kind"][0].tolist() == [0, N.KIND_CODES["batch"], N.KIND_CODES["truncation"]]


def test_loss_is_log_k_at_reference_and_dpo_with_one_negative(task_batch):
    task, batch = task_batch
    out_batch = task.prepare_batch(task.model, batch, 0)
    s = task.score(task.model, out_batch)
    at_ref = task.loss(s, s, out_batch)
    n_valid = out_batch.candidate_mask.sum(1).float()
    assert at_ref.per_example.tolist() == pytest.approx(torch.log(n_valid).tolist(), abs=1e-5)
    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(6, 2, generator=g) * 5, torch.randn(6, 2, generator=g) * 5
    two = type(out_batch)(batch.prompt_ids[:6], batch.prompt_mask[:6], batch.completion_ids[:6].expand(-1, 2, -1),
                          batch.completion_mask[:6].expand(-1, 2, -1), torch.ones(6, 2, dtype=torch.bool),
                          torch.tensor([[0.0, float("nan")]] * 6))
    ours = task.loss(Scores(logps=pol), Scores(logps=ref), two)
    dpo = L.dpo(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=0.1)
    assert ours.per_example.tolist() == pytest.approx(dpo.per_example.tolist(), abs=1e-6)


def test_three_step_train_changes_params_with_finite_loss(files, tmp_path):
    cfg = _cfg(files, tmp_path / "run", options={"rank_by_similarity": True, "num_per_kind": 2},
               sft_weight=0.5)
    task = build_task(load_train_config(cfg))
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    summary = train(cfg, task=task)
    assert summary["global_step"] == 3
    after = dict(task.model.named_parameters())
    assert [n for n, p in before.items() if torch.equal(p, after[n].detach())] == []
    stage = summary["stages"][-1]
    assert all(math.isfinite(v) for v in {**stage["final"], **stage["eval"]}.values()), stage
    assert "eval/seq_contrastive/rewards/accuracies" in stage["eval"] and stage["eval"]["eval/loss"] > 0
    assert {"eval/accuracy/autoregressive", "eval/accuracy/truncation"} <= set(stage["eval"])


def test_resume_is_exact(files, tmp_path):
    """Negatives depend only on (run seed, step, data indices) and the weights: 2 steps + resume + 2 steps ends
    with the same weights as 4 straight steps."""
    def go(out, **run):
        cfg = _cfg(files, out, options={"negatives": ["autoregressive", "mean_field", "truncation"]})
        cfg["data"]["eval"] = []
        cfg["run"].update(max_steps=4, save_every=2, keep_last=5, deterministic=True, **run)
        task = build_task(load_train_config(cfg))
        train(cfg, task=task)
        return {n: p.detach() for n, p in task.model.named_parameters()}

    straight = go(tmp_path / "a")
    resumed = go(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-0000002"))
    assert [n for n in straight if not torch.equal(straight[n], resumed[n])] == []
    from mmalign.train.metrics_log import read_metrics

    events = [r for r in read_metrics(tmp_path / "b") if r.get("event") == "resumed"]
    assert len(events) == 1 and events[0]["step"] == 2


def test_bad_options_are_reported_together(files, tmp_path):
    cfg = _cfg(files, tmp_path, options={"negatives": ["truncation", "sampled"], "mean_field_rate": 1.5,
                                         "nmu_per_kind": 2})
    cfg["reference"] = {"strategy": "precomputed"}
    cfg["loss"]["kwargs"] = {"betta": 0.1}
    with pytest.raises(ConfigError) as e:
        build_task(load_train_config(cfg))
    text = str(e.value)
    for needle in ("sampled", "nmu_per_kind", "precomputed", "betta"):
        assert needle in text, text


@pytest.mark.slow
def test_demo_runs(tmp_path):
    from mmalign.demos.seq_contrastive import run

    report = run(tmp_path, sft_steps=60, steps=20, n_eval=32)
    assert {"method", "metric", "before", "after", "higher_is_better"} <= set(report)
    assert (tmp_path / "report.md").is_file() and (tmp_path / report["plots"][0]).is_file()
