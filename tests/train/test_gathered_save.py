"""The final save of a sharded run (FSDP / DeepSpeed ZeRO-3): the loop gathers the full state dict on every
rank (``gathered_state_dict``) and the task writes *those* tensors, not its model's (which hold one rank's
shards). No GPUs here, so: (1) the loop's gathered path, forced on one process, writes exactly what the direct
save writes; (2) each task writes the state dict it is given (perturbed tensors come back from disk)."""

from __future__ import annotations

import pytest
import torch

from mmalign.api import build_task, load_train_config, train
from mmalign.models.text import load_causal_lm
from mmalign.train import final_save, loop

from .conftest import config


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _perturbed(model) -> dict[str, torch.Tensor]:
    return {k: (v + 0.25 if v.is_floating_point() else v).detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", ["full", "lora", "rm"])
def test_forced_gathered_save_equals_direct_save(variant, data_dir, tokenizer_dir, tmp_path, monkeypatch):
    data = data_dir / ("pairs.jsonl")
    extra: dict = {"run": {"max_steps": 2, "save_final": True}}
    if variant == "lora":
        extra["lora"] = {"enabled": True, "r": 4, "alpha": 8}
    if variant == "rm":
        extra["loss"] = {"name": "rm"}
        extra["reference"] = {"strategy": "none"}
    saved = {}
    for forced in (False, True):
        monkeypatch.setattr(loop, "FORCE_GATHERED_SAVE", forced)
        cfg = config(tmp_path / str(forced), [data], tokenizer=tokenizer_dir, **extra)
        summary = train(cfg)
        saved[forced] = load_causal_lm(summary["final_model"], value_head=variant == "rm")
    direct, gathered = _weights(saved[False]), _weights(saved[True])
    assert direct.keys() == gathered.keys()
    assert all(torch.equal(direct[k], gathered[k]) for k in direct)


def test_text_task_writes_the_given_state_dict(data_dir, tokenizer_dir, tmp_path):
    """LoRA on a tiny in-memory base: the base (``final/base``) and the adapter both come from the state dict."""
    cfg = config(tmp_path, [data_dir / "pairs.jsonl"], tokenizer=tokenizer_dir, lora={"enabled": True, "r": 4})
    task = build_task(load_train_config(cfg))
    state = _perturbed(task.model)
    task.save_pretrained(task.model, tmp_path / "out", state_dict=state)
    loaded = _weights(load_causal_lm(tmp_path / "out"))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    own = _weights(task.model)
    assert not all(torch.equal(loaded[k], own[k]) for k in own)


def test_diffusion_task_writes_the_given_state_dict(tmp_path):
    from diffusers import UNet2DConditionModel

    from tests.diffusion import tiny_config

    cfg = tiny_config(tmp_path, lora={"enabled": False}, reference={"strategy": "copy"})
    task = build_task(load_train_config(cfg))
    state = _perturbed(task.model)
    task.save_pretrained(task.model, tmp_path / "out", state_dict=state)
    loaded = _weights(UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet"))
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_prior_task_writes_the_given_state_dict(tmp_path):
    from mmalign.models.lvlm import load_lvlm
    from tests.prior._tiny import config as prior_config
    from tests.prior._tiny import write_rows

    task = build_task(prior_config(tmp_path, write_rows(tmp_path), lvlm="patch"))
    state = _perturbed(task.model)
    task.save_pretrained(task.model, tmp_path / "out", state_dict=state)
    loaded = _weights(load_lvlm(tmp_path / "out")[0])
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


class _FakeAccelerator:
    """What gathered_state_dict / check_final_save read of accelerate's Accelerator under DeepSpeed."""

    def __init__(self, gather_flag: bool, state):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.DEEPSPEED
        self.deepspeed_config = {"zero_optimization": {"stage": 3,
                                                       "stage3_gather_16bit_weights_on_model_save": gather_flag}}
        self._state = state

    def get_state_dict(self, model):
        return self._state


def test_zero3_other_ranks_get_an_empty_dict_and_the_main_rank_strips_the_wrapper_prefix():
    # DeepSpeed consolidates on rank 0 only and returns None on the other ranks.
    assert loop.gathered_state_dict(_FakeAccelerator(True, None), torch.nn.Linear(1, 1)) == {}
    state = {"model.w": torch.ones(1), "model.sub.b": torch.zeros(1)}
    got = loop.gathered_state_dict(_FakeAccelerator(True, state), torch.nn.Linear(1, 1))
    assert set(got) == {"w", "sub.b"}


def test_zero3_without_16bit_gathering_fails_before_training(tmp_path):
    from mmalign.config import ConfigError

    cfg = load_train_config(config(tmp_path, ["unused.jsonl"], run={"save_final": True}))
    with pytest.raises(ConfigError, match="zero3_save_16bit_model: true"):
        final_save.check_final_save(_FakeAccelerator(False, None), cfg)
    final_save.check_final_save(_FakeAccelerator(True, None), cfg)  # the shipped zero3 config: fine
