"""2-step ``mmalign.train`` runs (modality=clip) for every method on the shipped synthetic assets: parameters change,
losses are finite, the final model loads back; the precomputed teacher gives the copy's losses."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.api import build_task, load_train_config, train
from mmalign.models.clip import load_clip

from .conftest import ASSETS

BASE = ["modality=clip", "model.name_or_path=tiny", f"data.train=[{ASSETS / 'train.jsonl'}]",
        f"data.eval=[{ASSETS / 'eval.jsonl'}]", "run.max_steps=2", "run.batch_size=8", "run.eval_batches=1",
        "run.resume=never", "run.report_to=[jsonl]", "run.progress=false", "optim.lr=1e-3"]
METHODS = {
    "clip": [],
    "siglip": ["clip.init_logit_bias=-10"],
    "clip_refine": [],
    "zscl": [f"clip.ref_images=[{ASSETS / 'ref_images'}]", f"clip.ref_texts=[{ASSETS / 'ref_texts.txt'}]",
             "clip.weight_average=sma", "clip.average_every=1"],
}


def _run(tmp_path, method: str, extra=()):
    cfg = load_train_config(None, [*BASE, f"loss.name={method}", f"run.output_dir={tmp_path / method}",
                                   *METHODS[method], *extra])
    task = build_task(cfg)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    summary = train(cfg, task=task)
    return task, before, summary


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_steps_change_params_and_losses_are_finite(tmp_path, method):
    task, before, summary = _run(tmp_path, method)
    final = summary["stages"][0]["final"]
    assert summary["global_step"] == 2 and math.isfinite(final["loss"])
    assert all(math.isfinite(v) for v in summary["stages"][0]["eval"].values())
    changed = [n for n, p in task.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) > 10 and any(n.startswith("visual.") for n in changed)
    assert any(n.startswith("transformer.") for n in changed)
    frozen = [n for n, p in task.model.named_parameters() if not p.requires_grad]
    assert all(torch.equal(task.model.get_parameter(n), before[n]) for n in frozen)
    if method == "clip_refine":
        assert final["loss/contrastive"] > 0 and "loss/rafa" in final and "loss/hycd" in final
    if method == "zscl":
        assert final["loss/zscl"] > 0 and "logit_scale" in frozen
    reloaded = load_clip(summary["final_model"])
    assert reloaded.model_cfg == task.bundle.model_cfg


def test_precomputed_teacher_equals_the_frozen_copy(tmp_path):
    cache = tmp_path / "cache"
    runs = {}
    for name, strategy in (("copy", "copy"), ("pre", "precomputed"), ("pre_again", "precomputed")):
        _, _, s = _run(tmp_path / name, "clip_refine", [f"reference.strategy={strategy}",
                                                        f"reference.cache_dir={cache}"])
        runs[name] = s["stages"][0]
    assert runs["pre"]["final"]["loss"] == pytest.approx(runs["copy"]["final"]["loss"], abs=1e-5)
    assert runs["pre"]["eval"]["eval/loss"] == pytest.approx(runs["copy"]["eval"]["eval/loss"], abs=1e-5)
    assert runs["pre_again"]["final"]["loss"] == runs["pre"]["final"]["loss"]
    assert sorted(p.name.split("-")[1] for p in cache.glob("teacher-*.pt")) == ["eval", "train"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["loss.name=clip_refine"],
                                   ["loss.name=clip", "loss.kwargs={}", "clip.local_loss=true",
                                    "clip.gather_with_grad=false", "clip.normalize=true"],
                                   ["loss.name=siglip", "loss.kwargs={}", "clip.init_logit_bias=-10",
                                    "clip.normalize=true"]])
def test_two_process_ddp_run(tmp_path, extra):
    """2 CPU processes (gloo) through scripts/train_clip.sh: features all-gathered, every rank finite."""
    import json
    import os
    import subprocess

    from .conftest import REPO

    out = subprocess.run(["bash", str(REPO / "scripts" / "train_clip.sh"), "configs/clip/tiny_clip_refine.yaml", "cpu",
                          "run.max_steps=2", f"run.output_dir={tmp_path}", "run.resume=never", "run.progress=false",
                          *extra], cwd=REPO, capture_output=True, text=True, env={**os.environ}, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    start = out.stdout.index("\n{") + 1  # after the launcher's command line; every rank prints a summary
    summary, _ = json.JSONDecoder().raw_decode(out.stdout[start:])
    assert summary["global_step"] == 2 and math.isfinite(summary["stages"][0]["final"]["loss"])


@pytest.mark.parametrize("family", ["tiny", "tiny-hf"])
@pytest.mark.parametrize("method", ["clip", "zscl"])
def test_lora_trains_only_adapters_and_saves_merged_weights(tmp_path, family, method):
    """LoRA on open_clip (its MLP linears: attention's out_proj is never called as a module) and HF CLIP: only
    LoRA factors (and the logit scale, where the method trains it) change; the saved model is the merged one,
    loadable without peft and giving the trained model's features."""
    extra = [f"model.name_or_path={family}", "lora.enabled=true", "lora.r=4", "lora.alpha=8", "optim.lr=5e-2"]
    if method == "zscl":
        extra.append("clip.weight_average=none")
    task, before, summary = _run(tmp_path, method, extra)
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("logit_") for n in trainable)
    if family == "tiny":
        assert not any(".attn.out_proj" in n for n in trainable)
    moved = {n for n, p in task.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable and any(".lora_B." in n for n in moved)
    reloaded = load_clip(summary["final_model"]).model.eval()
    assert not any(".lora_" in n for n, _ in reloaded.named_parameters())
    model = task.model.eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        if family == "tiny":
            want, got = model.encode_image(images), reloaded.encode_image(images)
        else:
            want, got = model.get_image_features(pixel_values=images), reloaded.get_image_features(pixel_values=images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_lora_refuses_weight_space_methods(tmp_path):
    from mmalign.config import ConfigError

    with pytest.raises(ConfigError, match="cannot be combined with clip.weight_average=sma"):
        _run(tmp_path, "zscl", ["lora.enabled=true"])


def test_lora_targets_that_never_run_are_refused(tmp_path):
    from mmalign.config import ConfigError

    for bad in ("out_proj", "conv1"):  # inside nn.MultiheadAttention (never called) / not a Linear
        with pytest.raises(ConfigError, match=f"target_modules \\['{bad}'\\] match no linear layer"):
            _run(tmp_path, "clip", ["lora.enabled=true", f"lora.target_modules=[{bad}]"])
    task, _, _ = _run(tmp_path / "ok", "clip", ["lora.enabled=true", "lora.target_modules=[c_fc]"])
    lora = {n.split(".lora_")[0] for n, _ in task.model.named_parameters() if ".lora_" in n}
    assert lora and all(n.endswith("c_fc") for n in lora)


def test_stages_switch_between_contrastive_rows(tmp_path):
    """One run, two rows: plain CLIP, then CLIP-Refine against the frozen initial model. Each stage's loss sets
    which logit parameters train (raw-feature HyCD with λ_cont = 0 reads no scale)."""
    stages = ("stages=[{name: clip, max_steps: 1, loss: {name: clip}}, "
              "{name: refine, max_steps: 1, loss: {name: clip_refine}}]")
    task, before, summary = _run(tmp_path, "clip", [stages])
    assert summary["global_step"] == 2 and task.teacher is not None
    assert "loss/clip" in summary["stages"][0]["final"] and "loss/hycd" in summary["stages"][1]["final"]
    assert not task.model.logit_scale.requires_grad and task.method.name == "clip_refine"


def test_save_writes_the_given_state_dict(tmp_path):
    """A sharded run's gathered weights (``state_dict=``) are what the final model holds."""
    cfg = load_train_config(None, [*BASE, "loss.name=clip", f"run.output_dir={tmp_path / 'run'}"])
    task = build_task(cfg)
    state = {k: (v + 0.25 if v.is_floating_point() else v).detach().clone() for k, v in task.model.state_dict().items()}
    task.save_pretrained(task.model, tmp_path / "out", state_dict=state)
    loaded = load_clip(str(tmp_path / "out")).model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
