"""Unit tests of the loop's parts: batch order, atomic checkpoints, resume checks, schedules, evaluation RNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mmalign.config import ConfigError
from mmalign.methods.task import StageData
from mmalign.schema import OptimConfig, RunConfig, StageConfig, TrainConfig
from mmalign.train import checkpoint as ckpt
from mmalign.train.data_order import BatchOrder
from mmalign.train.loop import evaluate, fit
from mmalign.train.optim import build_optimizer, build_scheduler
from mmalign.train.reference import PrecomputedReference, Reference
from mmalign.train.run_state import check_resume

# -- batch order ------------------------------------------------------------------------------------------


def _take(order: BatchOrder, n: int) -> list[list[int]]:
    return [order.next_indices() for _ in range(n)]


def test_batch_order_is_deterministic_and_seeded():
    assert _take(BatchOrder(10, 3, seed=1), 8) == _take(BatchOrder(10, 3, seed=1), 8)
    assert _take(BatchOrder(10, 3, seed=1), 3) != _take(BatchOrder(10, 3, seed=2), 3)
    assert _take(BatchOrder(5, 5, seed=0, shuffle=False), 2) == [[0, 1, 2, 3, 4]] * 2


def test_batch_order_epochs_drop_the_ragged_tail_at_step_boundaries():
    order = BatchOrder(10, 2, seed=0, grad_accum=2)  # 4 samples per step: 2 steps per epoch, 2 rows dropped
    assert order.steps_per_epoch == 2 and order.batches_per_epoch == 4
    epoch0 = _take(order, 4)
    assert order.epoch == 0
    flat = [i for b in epoch0 for i in b]
    assert len(set(flat)) == 8  # no repeats inside an epoch
    order.next_indices()
    assert order.epoch == 1


def test_batch_order_state_dict_resumes_mid_epoch():
    a = BatchOrder(11, 2, seed=4, world_size=2, rank=1, grad_accum=2)
    _take(a, 5)  # mid-step too: micro index 1
    b = BatchOrder(11, 2, seed=4, world_size=2, rank=1, grad_accum=2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert _take(a, 9) == _take(b, 9)


@pytest.mark.parametrize("world,accum", [(2, 1), (1, 4), (4, 1), (2, 2)])
def test_batch_order_shards_equal_one_process_with_accumulation(world, accum):
    """N ranks × A micro-batches per step cover the same samples per step as one process with N·A micro-batches."""
    n, b = 23, 2
    single = BatchOrder(n, b, seed=9, grad_accum=world * accum)
    ranks = [BatchOrder(n, b, seed=9, world_size=world, rank=r, grad_accum=accum) for r in range(world)]
    for _ in range(7):
        want = [i for batch in _take(single, world * accum) for i in batch]
        got = [r.next_indices() for _ in range(accum) for r in ranks]
        # micro-batch j of rank r is slot j·world + r of the step
        assert [i for batch in got for i in batch] == want
        assert single.epoch == ranks[0].epoch


def test_batch_order_rejects_too_little_data():
    with pytest.raises(ValueError, match=r"12 examples.*needs 16.*grad_accum=2"):
        BatchOrder(12, 4, seed=0, world_size=2, grad_accum=2)


# -- checkpoints --------------------------------------------------------------------------------------------


@pytest.fixture
def acc():
    from accelerate import Accelerator

    accelerator = Accelerator()
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    accelerator.unit_model = model
    yield accelerator
    accelerator.free_memory()


def _save(accelerator, out: Path, step: int, keep_last: int = 2) -> Path:
    return ckpt.save_checkpoint(accelerator, out, step, {"global_step": step}, keep_last=keep_last,
                                extra={"scheduler": {"last_epoch": step}, "reference": {"w": torch.ones(2) * step}})


def test_save_is_atomic_and_keeps_last(acc, tmp_path):
    for step in (1, 2, 3, 4):
        _save(acc, tmp_path, step)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000003", "checkpoint-0000004"]
    assert not list(tmp_path.glob("*.tmp"))
    newest = ckpt.find_resume_checkpoint(tmp_path, "auto")
    assert ckpt.read_state(newest) == {"global_step": 4}
    extra = ckpt.read_extra(newest)  # weights_only load: plain values and tensors only
    assert extra["scheduler"] == {"last_epoch": 4} and torch.equal(extra["reference"]["w"], torch.full((2,), 4.0))


def test_load_checkpoint_restores_weights(acc, tmp_path):
    model = acc.unit_model
    path = _save(acc, tmp_path, 1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    extra = ckpt.load_checkpoint(acc, path)
    assert extra["scheduler"] == {"last_epoch": 1}
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_incomplete_checkpoints_are_ignored_refused_and_cleaned(acc, tmp_path):
    _save(acc, tmp_path, 2)
    (tmp_path / "checkpoint-0000005.tmp").mkdir()
    (tmp_path / "checkpoint-0000006").mkdir()  # no trainer_state.json
    assert ckpt.find_resume_checkpoint(tmp_path, "auto").name == "checkpoint-0000002"
    assert ckpt.find_resume_checkpoint(tmp_path, "never") is None
    assert ckpt.find_resume_checkpoint(tmp_path / "empty", "auto") is None
    with pytest.raises(FileNotFoundError, match=r"not a complete checkpoint.*checkpoint-0000002.*run.resume=auto"):
        ckpt.find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-0000005.tmp"))
    assert [p.name for p in ckpt.clean_incomplete(tmp_path)] == ["checkpoint-0000005.tmp"]
    assert not (tmp_path / "checkpoint-0000005.tmp").exists()


def test_saving_an_older_step_drops_the_abandoned_newer_checkpoints(acc, tmp_path):
    for step in (2, 4, 6):
        _save(acc, tmp_path, step, keep_last=5)
    _save(acc, tmp_path, 4, keep_last=5)  # a run resumed from checkpoint 2 reaches step 4 again
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000002", "checkpoint-0000004"]


def test_read_extra_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"loop_extra.pt.*run.resume=never"):
        ckpt.read_extra(tmp_path)


def test_resume_refuses_a_checkpoint_of_other_stages(tmp_path):
    stages = [StageConfig(name="a"), StageConfig(name="b")]
    check_resume({"stage_idx": 1, "stage_names": ["a", "b", "c"]}, stages, tmp_path)  # later stages may change
    with pytest.raises(ConfigError, match=r"stages \['x', 'b'\].*run.resume=never"):
        check_resume({"stage_idx": 1, "stage_names": ["x", "b"]}, stages, tmp_path)
    with pytest.raises(ConfigError, match="in stage 2 but this config has 2"):
        check_resume({"stage_idx": 2}, stages, tmp_path)


def test_fit_refuses_an_accelerator_with_other_accumulation():
    from accelerate import Accelerator

    cfg = TrainConfig(run=RunConfig(grad_accum=3))
    with pytest.raises(ValueError, match=r"accumulates 2 micro-batches but run.grad_accum=3"):
        fit(object(), cfg, accelerator=Accelerator(gradient_accumulation_steps=2))


def test_precomputed_reference_state_names_its_table(tmp_path):
    from mmalign.types import Scores

    path = tmp_path / "ref_scores-x.pt"
    torch.save({"logps": torch.arange(6.0).view(3, 2)}, path)
    ref = PrecomputedReference(tmp_path, data_key="k")
    ref.load_state_dict({"path": str(path)})
    assert ref.state_dict() == {"path": str(path)}
    assert isinstance(ref.table, Scores) and ref.table.logps.shape == (3, 2)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="reference scores .* are gone"):
        PrecomputedReference(tmp_path, data_key="k").load_state_dict({"path": str(path)})


# -- optimiser and schedules --------------------------------------------------------------------------------


def _lrs(cfg: OptimConfig, total: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules():
    assert _lrs(OptimConfig(scheduler="constant"), 3) == [1.0, 1.0, 1.0]
    assert _lrs(OptimConfig(scheduler="linear"), 4) == [1.0, 0.75, 0.5, 0.25]  # no zero-LR step
    assert _lrs(OptimConfig(scheduler="linear", warmup_steps=3), 5) == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.5])
    cos = _lrs(OptimConfig(scheduler="cosine", warmup_ratio=0.25), 8)
    assert cos[:2] == pytest.approx([1 / 3, 2 / 3]) and cos[2] == 1.0
    assert all(a > b for a, b in zip(cos[2:], cos[3:], strict=False))


def test_param_groups_and_no_trainable_params():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), lr=0.5)
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [(4, 4)] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0 and opt.defaults["lr"] == 0.5
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig())


# -- evaluation ---------------------------------------------------------------------------------------------


class _Batch:
    def __init__(self, x):
        self.x, self.extras = x, {}

    def to(self, device):
        return self


class _NoisyTask:
    """Scores with fresh noise, like a diffusion adapter's timesteps."""

    needs_reference = False

    def loss(self, policy, reference, batch, aux=None):
        from mmalign.losses import LossOutput

        return LossOutput(loss=policy.mean(), per_example=policy, metrics={"m": policy.max()})


def test_evaluation_does_not_touch_the_training_rng():
    from accelerate import Accelerator

    data = StageData(train=None, collate=lambda rows: _Batch(torch.tensor(rows)), eval=[1.0, 2.0, 3.0])
    model = nn.Module()
    model.forward = lambda batch: batch.x + torch.rand(len(batch.x))
    cfg = TrainConfig(run=RunConfig(batch_size=2))
    state = torch.get_rng_state()
    first = evaluate(_NoisyTask(), model, data, Reference(), cfg, Accelerator())
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)
    assert evaluate(_NoisyTask(), model, data, Reference(), cfg, Accelerator()) == first
    assert set(first) == {"eval/loss", "eval/m"}
