"""Self-NPO (mmalign.methods.self_npo): re-noising statistics, the truncated rollout, and training through the loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from mmalign.methods import self_npo as S
from mmalign.methods.self_npo import SelfNPOOptions, SelfNPOTask
from mmalign.train.loop import resolve_stages


def _ddpm():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("scheduler", [_ddpm(), FlowMatchEulerDiscreteScheduler(shift=3.0)], ids=["ddpm", "flow"])
@pytest.mark.parametrize(("t", "s"), [(100, 900), (500, 501), (799, 999)])
def test_renoise_has_the_stated_mean_and_variance(scheduler, t, s):
    """x_s = (α_s/α_t)x_t + sqrt(σ_s² − σ_t²α_s²/α_t²)ε: over 400k draws the mean is (α_s/α_t)x_t and the
    variance σ_s² − σ_t²α_s²/α_t² (tolerances ≈ 5 standard errors); and if x_t = α_t x0 + σ_t ε' the result has
    the level-s marginal: mean α_s x0, variance σ_s²."""
    lv = S.noise_levels(scheduler)
    g = torch.Generator().manual_seed(0)
    n = 400_000
    a_t, s_t = (v.double() for v in lv.at(torch.tensor([t]), torch.zeros(1, 1)))
    a_s, s_s = (v.double() for v in lv.at(torch.tensor([s]), torch.zeros(1, 1)))
    x_t = torch.full((n, 1), 0.7, dtype=torch.float64)
    x_s = S.renoise(x_t, a_t, s_t, a_s, s_s, torch.randn(n, 1, generator=g, dtype=torch.float64))
    mean, var = (a_s / a_t * 0.7).item(), (s_s**2 - s_t**2 * a_s**2 / a_t**2).item()
    assert abs(x_s.mean().item() - mean) < 5 * (var / n) ** 0.5 + 1e-12
    assert abs(x_s.var().item() - var) < 5 * var * (2 / n) ** 0.5 + 1e-12
    # marginal: start from a noised x0
    x0 = 0.3
    x_t = a_t * x0 + s_t * torch.randn(n, 1, generator=g, dtype=torch.float64)
    x_s = S.renoise(x_t, a_t, s_t, a_s, s_s, torch.randn(n, 1, generator=g, dtype=torch.float64))
    assert abs(x_s.mean().item() - (a_s * x0).item()) < 5 * s_s.item() / n**0.5
    assert abs(x_s.var().item() - (s_s**2).item()) < 5 * (s_s**2).item() * (2 / n) ** 0.5


def test_noise_levels_match_the_schedulers():
    ddpm = _ddpm()
    lv = S.noise_levels(ddpm)
    x0, eps, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0, 400, 999])
    a, s = lv.at(t, x0)
    torch.testing.assert_close(a * x0 + s * eps, ddpm.add_noise(x0, eps, t), atol=1e-6, rtol=1e-5)
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    fl = S.noise_levels(flow)
    assert fl.prediction_type == "flow" and fl.sigma[-1] == 1.0 and torch.all(fl.sigma.diff() > 0)
    assert torch.allclose(fl.model_t, flow.timesteps.flip(0))
    # clean level
    a, s = lv.at(torch.tensor([-1]), x0[:1])
    assert a.item() == 1.0 and s.item() == 0.0


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample", "flow"])
def test_x0_eps_conversions_invert_the_targets(pred):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    if pred == "flow":
        sigma = torch.rand(4, 1, generator=g) * 0.9 + 0.05
        alpha = 1 - sigma
        out = eps - x0
    else:
        ac = torch.rand(4, 1, generator=g) * 0.9 + 0.05
        alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
        out = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[pred]
    x = alpha * x0 + sigma * eps
    got_x0, got_eps = S.to_x0_eps(out, x, alpha, sigma, pred)
    torch.testing.assert_close(got_x0, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_eps, eps, atol=1e-4, rtol=1e-4)


def test_truncated_rollout_with_an_oracle_teacher_recovers_x0():
    """A teacher that knows x0 makes DDIM steps exact: x_{t_K} = α x0 + σ ε (deterministic), target = x0;
    rollouts that run past level 0 end clean (t = −1) with the clean sample as target."""
    lv = S.noise_levels(_ddpm())
    grid = S.ddim_grid(1000, 25)
    assert grid[0] == 999 and grid[-1] == 39 and len(grid) == 25
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)

    def oracle(x, t):
        a, s = lv.at(t, x)
        return x0, (x - a * x0) / s

    start = torch.tensor([0, 10, 23])
    a, s = lv.at(grid[start], x0)
    x_end, t_end, target = S.truncated_rollout(oracle, a * x0 + s * eps, start, grid, lv, k_steps=5)
    assert t_end.tolist() == [999 - 200, 599 - 200, -1]
    torch.testing.assert_close(target, x0)
    a, s = lv.at(t_end, x0)
    torch.testing.assert_close(x_end, a * x0 + s * eps, atol=1e-4, rtol=1e-4)
    levels = S.higher_levels(t_end, torch.rand(3, generator=torch.Generator().manual_seed(0)), 1000)
    assert levels[0] > 799 and levels[1] > 399 and 0 <= levels[2] <= 999


# ------------------------------------------------------------------------------------------------ the task


def _cfg(tmp_path, *extra: str):
    from mmalign.api import load_train_config

    return load_train_config(None, [
        "modality=diffusion", "loss.name=self_npo", "diffusion.pixel_space=true", "diffusion.resolution=16",
        "model.tiny={text_max_length: 20}", f"run.output_dir={tmp_path / 'run'}", "run.resume=never",
        "run.report_to=[jsonl]", "run.progress=false", "run.batch_size=4", "optim.scheduler=constant",
        "optim.lr=1e-3", *extra])


def _kwargs(**kw) -> str:
    base = {"k_steps": 2, "grid_steps": 10, "prompts": ["a red circle on a black background", "a blue square"]}
    base.update(kw)
    return "loss.kwargs=" + json.dumps(base)


def test_self_npo_loss_falls_on_a_fixed_batch(tmp_path):
    """The regression is learnable: with the draws fixed (they ride on the batch) and the teacher frozen, ten Adam
    steps on one batch lower the student's pseudo-Huber loss steadily (it is ≈ |x̂0_θ − x̂0_teacher| here, and x0
    errors are ε errors amplified by σ/α ≈ 5–15 at the high levels a from-noise rollout trains, so it falls slowly)."""
    cfg = _cfg(tmp_path, _kwargs())
    task = SelfNPOTask(cfg)
    batch = task.collate([(i, 0) for i in range(4)])
    opt = torch.optim.Adam([p for p in task.model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(10):
        out = task.loss(task.score(task.model.train(), batch), None, batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= 8, losses
    assert set(out.metrics) >= {"self_npo/mse", "self_npo/t_end", "self_npo/level_s"}


def test_self_npo_trains_through_the_loop(tmp_path):
    """Data-free training through mmalign.train.fit: on a batch it never saw (fresh draws every visit) the loss
    drops; the result is saved like any diffusion run and gives a nonzero δ = θ_selfnpo − θ_base."""
    from mmalign.sample import diffusion as SD
    from mmalign.train.loop import fit

    cfg = _cfg(tmp_path, _kwargs(loss="l2", num_samples=8), "run.max_steps=12")
    task = SelfNPOTask(cfg)
    data = task.stage_data(resolve_stages(cfg)[0])
    assert len(data.train) == 8
    batch = data.collate([(i, 0) for i in range(4)])
    with torch.no_grad():
        before = task.loss(task.score(task.model.eval(), batch), None, batch).loss.item()
        again = task.loss(task.score(task.model, batch), None, batch).loss.item()
    assert before == pytest.approx(again, rel=1e-6)  # the draws ride on the batch: scoring is deterministic
    out = fit(task, cfg)
    with torch.no_grad():
        after = task.loss(task.score(task.model.eval(), batch), None, batch).loss.item()
    assert after < before, (before, after)
    final = Path(out["final_model"])
    info = json.loads((final / "mmalign_diffusion.json").read_text())
    assert info["method"] == "self_npo" and info["format"] == "full" and (final / "unet").is_dir()
    comps = SD.load_components(final)
    delta = SD.npo_offset_from(final, comps)
    assert max(v.abs().max() for v in delta.values()) > 0


def test_ema_teacher_follows_the_student_after_each_step_and_is_checkpointed(tmp_path):
    """teacher=ema: the loop's after_step hook applies θ_T ← d·θ_T + (1 − d)·θ; state_dict carries θ_T."""
    cfg = _cfg(tmp_path, _kwargs(teacher="ema", ema_decay=0.75))
    task = SelfNPOTask(cfg)
    teacher0 = {k: v.clone() for k, v in task._teacher.state_dict().items()}
    with torch.no_grad():  # "the optimizer step"
        for p in task.model.parameters():
            p.add_(0.1)
    task.after_step(1)
    student = dict(task.model.named_parameters())
    for name, p in task._teacher.named_parameters():
        torch.testing.assert_close(p, 0.75 * teacher0[name] + 0.25 * student[name].detach())
    state = task.state_dict()
    fresh = SelfNPOTask(cfg)
    fresh.load_state_dict(state)
    assert all(torch.equal(v, task._teacher.state_dict()[k]) for k, v in fresh._teacher.state_dict().items())
    frozen = SelfNPOTask(_cfg(tmp_path, _kwargs()))
    frozen.after_step(1)
    assert frozen.state_dict() == {}


def test_code_variant_from_data_with_guided_teacher_and_lora(tmp_path):
    """start=data (noised dataset images at a random grid index), teacher guidance w = −1 (pure unconditional,
    the SD1.5 code), LoRA student whose frozen teacher is the base with the adapter disabled."""
    from mmalign.data import shapes
    from mmalign.sample import diffusion as SD
    from mmalign.train.loop import fit

    samples = shapes.shape_samples(6, seed=0, size=16)
    paths = shapes.write_images(samples, tmp_path / "img")
    rows = [{"caption": s.caption, "image": str(p)} for s, p in zip(samples, paths, strict=True)]
    shapes.write_jsonl(rows, tmp_path / "rows.jsonl")
    cfg = _cfg(tmp_path, _kwargs(start="data", teacher_guidance=-1.0, prompts=None), "run.max_steps=2",
               f"data.train=[{tmp_path / 'rows.jsonl'}]", "lora.enabled=true", "lora.r=2", "optim.lr=1e-2")
    task = SelfNPOTask(cfg)
    assert task._teacher is None  # LoRA: no copy, the adapter-disabled base is the teacher
    out = fit(task, cfg)
    final = out["stages"][-1]["final"]
    assert 0 <= final["self_npo/t_end"] < 999 and final["self_npo/level_s"] > final["self_npo/t_end"]
    info = json.loads((Path(out["final_model"]) / "mmalign_diffusion.json").read_text())
    assert info["format"] == "lora"
    delta = SD.npo_offset_from(out["final_model"], SD.load_components(out["final_model"]))
    assert max(v.abs().max() for v in delta.values()) > 0


def test_options_are_validated(tmp_path):
    from mmalign.config import ConfigError

    with pytest.raises(ConfigError, match="k_stepz.*valid"):
        SelfNPOTask(_cfg(tmp_path, "loss.kwargs={k_stepz: 3}"))
    with pytest.raises(ConfigError, match="start"):
        SelfNPOOptions.from_kwargs({"start": "images", "teacher": "ema", "ema_decay": 1.0})
    task = SelfNPOTask(_cfg(tmp_path, _kwargs(start="data", prompts=None)))
    with pytest.raises(ConfigError, match="needs images"):
        task.stage_data(resolve_stages(task.cfg)[0])
