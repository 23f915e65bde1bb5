"""Sampling validation during training (``run.eval_prompts`` at every evaluation): text runs log reward,
win-rate and KL against the reference and write the samples; diffusion runs write
``validation/step_<n>.png`` and log it to TensorBoard; each evaluation prints one console line; training's
random stream is the same with or without it; bad settings are refused before training."""

from __future__ import annotations

import json

import pytest

from mmalign.api import load_train_config, train
from mmalign.config import ConfigError
from mmalign.train.metrics_log import read_metrics
from tests.train.conftest import config

PROMPTS = ["add: 3 4 =", "add: 10 2 ="]
SHAPES = ["a red circle on a black background", "a blue square on a white background"]


def _text_run(tmp_path, data_dir, tokenizer_dir, name="run", **run):
    cfg = config(tmp_path / name, [data_dir / "pairs.jsonl"], tokenizer=tokenizer_dir,
                 optim={"lr": 5e-2, "scheduler": "constant"},
                 run={"max_steps": 4, "eval_every": 2, "eval_prompts": PROMPTS, "eval_seeds": [0, 1],
                      "eval_reward": "tests.eval.test_eval_gen:length_reward",
                      "eval_generation": {"max_new_tokens": 6}, **run})
    return train(cfg)


def _validation_records(out):
    return [r for r in read_metrics(out) if "validation/reward" in r]


def test_text_run_logs_reward_win_rate_kl_and_prints_a_line(data_dir, tokenizer_dir, tmp_path, capsys):
    summary = _text_run(tmp_path, data_dir, tokenizer_dir)  # full fine-tune: a frozen copy is the reference
    out = tmp_path / "run"
    records = _validation_records(out)
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert {"validation/reward_reference", "validation/win_rate", "validation/kl", "validation/win_rate_std",
                "validation/reward_std"} <= set(r)
        assert 0.0 <= r["validation/win_rate"] <= 1.0
    # the frozen reference's samples are drawn once and reused: the same reference reward at every evaluation
    assert records[0]["validation/reward_reference"] == records[1]["validation/reward_reference"]
    assert records[1]["validation/kl"] != 0.0  # lr 5e-2 moved the policy away from the reference
    rows = [json.loads(line) for line in (out / "validation" / "step_4.jsonl").read_text().splitlines()]
    assert len(rows) == len(PROMPTS) * 2 and {"prompt", "seed", "policy", "reference", "reward", "kl"} <= set(rows[0])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[eval]")]
    assert len(printed) == 2 and printed[1].startswith("[eval] step 4 (stage main):")
    assert "validation/win_rate=" in printed[1] and str(out / "validation" / "step_4.jsonl") in printed[1]
    assert "validation/win_rate" in summary["stages"][0]["eval"]


def test_text_lora_run_compares_with_the_adapter_disabled_base(data_dir, tokenizer_dir, tmp_path):
    _text_run(tmp_path, data_dir, tokenizer_dir, max_steps=2, eval_seeds=[0])
    # same run with LoRA: the reference is the policy with its adapter off (no copy), still a win-rate and a KL
    cfg = config(tmp_path / "lora", [data_dir / "pairs.jsonl"], tokenizer=tokenizer_dir,
                 lora={"enabled": True, "r": 4, "alpha": 8}, optim={"lr": 5e-2, "scheduler": "constant"},
                 run={"max_steps": 2, "eval_every": 2, "eval_prompts": PROMPTS, "eval_seeds": [0],
                      "eval_reward": "tests.eval.test_eval_gen:length_reward",
                      "eval_generation": {"max_new_tokens": 6}})
    train(cfg)
    (full,), (lora,) = _validation_records(tmp_path / "run"), _validation_records(tmp_path / "lora")
    assert {"validation/win_rate", "validation/kl"} <= set(lora)
    # both references are the same initial model (seeded build): the same reference samples and reward
    assert lora["validation/reward_reference"] == full["validation/reward_reference"]


def test_diffusion_run_writes_validation_images_to_disk_and_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.diffusion import tiny_config

    run = {"max_steps": 2, "eval_every": 2, "eval_prompts": SHAPES, "eval_seeds": [0, 1], "eval_reward": "shapes",
           "eval_generation": {"steps": 2, "guidance_scale": 3}, "report_to": ["jsonl", "tensorboard"]}
    train(load_train_config(tiny_config(tmp_path / "run", run=run)))
    out = tmp_path / "run"
    png = out / "validation" / "step_2.png"
    assert png.is_file()
    (record,) = _validation_records(out)
    assert 0.0 <= record["validation/reward"] <= 1.0 and 0.0 <= record["validation/win_rate"] <= 1.0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "validation/images" in events.Tags()["images"]
    assert "validation/reward" in events.Tags()["scalars"]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[eval] step 2")]
    assert printed and str(png) in printed[0] and "validation/reward=" in printed[0]


def test_validation_leaves_training_unchanged(data_dir, tokenizer_dir, tmp_path):
    """Sampling runs under a forked RNG: the losses of a run that validates every step equal those of one that
    does not (LoRA dropout draws from the RNG at every training step, and generation draws from it too)."""
    losses = {}
    for name, run in (("plain", {}), ("validated", {"eval_every": 1, "eval_prompts": PROMPTS[:1],
                                                    "eval_generation": {"max_new_tokens": 3}})):
        cfg = config(tmp_path / name, [data_dir / "pairs.jsonl"], tokenizer=tokenizer_dir,
                     lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.5}, optim={"lr": 5e-2},
                     run={"max_steps": 3, **run})
        train(cfg)
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r and "event" not in r]
    assert (tmp_path / "validated" / "validation" / "step_1.jsonl").is_file()
    assert losses["validated"] == losses["plain"] and len(losses["plain"]) == 3


@pytest.mark.parametrize(("run", "match"), [
    ({"eval_prompts": PROMPTS, "eval_reward": "no_such_reward"}, "run.eval_reward='no_such_reward'"),
    ({"eval_prompts": PROMPTS, "eval_generation": {"max_tokens": 4}}, "run.eval_generation"),
    ({"eval_prompts": PROMPTS, "eval_seeds": []}, "run.eval_seeds is empty"),
    ({"eval_reward": "addition"}, "run.eval_prompts, which is empty"),
    ({"eval_prompts": "missing_prompts.txt"}, "no prompt file"),
])
def test_bad_validation_settings_are_refused_before_training(run, match, data_dir, tokenizer_dir, tmp_path):
    cfg = config(tmp_path / "run", [data_dir / "pairs.jsonl"], tokenizer=tokenizer_dir, run={"max_steps": 1, **run})
    with pytest.raises(ConfigError, match=match):
        train(cfg)
    assert not any("loss" in r for r in read_metrics(tmp_path / "run")) if (tmp_path / "run" / "metrics.jsonl")\
        .exists() else True


def test_validation_is_refused_for_a_modality_without_one(tmp_path):
    from mmalign.train.evaluate import Validation

    cfg = load_train_config({"modality": "clip", "run": {"eval_prompts": ["a cat"]}})
    with pytest.raises(ConfigError, match="sampling validation exists for modality"):
        Validation.build(cfg)
