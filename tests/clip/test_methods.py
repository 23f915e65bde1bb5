"""CLIP recipes without training: the method table, loss compositions, teacher wiring, trainable logit
parameters, weight averaging and WiSE-FT of the saved weights."""

from __future__ import annotations

import pytest
import torch

from mmalign.adapters.contrastive import score_contrastive
from mmalign.api import load_train_config
from mmalign.config import ConfigError
from mmalign.losses import clip_contrastive, hycd, rafa
from mmalign.methods.clip_losses import CLIP_METHODS, clip_method_loss, get_clip_method, resolve_kwargs
from mmalign.types import Scores

from .conftest import ASSETS


def _cfg(tmp_path, **extra):
    base = {"modality": "clip", "model.name_or_path": "tiny", "data.train": [str(ASSETS / "train.jsonl")],
            "run.output_dir": str(tmp_path / "run"), "run.batch_size": 8}
    return load_train_config(None, [], {**base, **extra})


def _scores(n=6, d=5, seed=0, teacher=True) -> Scores:
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(n, d, generator=g, requires_grad=True), torch.randn(n, d, generator=g, requires_grad=True)
    extras = {"logit_scale": torch.tensor(3.0)}
    if teacher:
        extras.update(teacher_image=torch.randn(n, d, generator=g), teacher_text=torch.randn(n, d, generator=g),
                      teacher_logit_scale=torch.tensor(3.0))
    return Scores(logps=torch.zeros(n, 1), embeddings={"image": img, "text": txt}, extras=extras)


def test_method_table_and_kwargs():
    assert sorted(CLIP_METHODS) == ["clip", "clip_refine", "siglip", "zscl"]
    with pytest.raises(ConfigError, match="valid: \\['clip', 'clip_refine', 'siglip', 'zscl'\\]"):
        get_clip_method("clip-refine")
    m = get_clip_method("clip_refine")
    assert m.defaults["contrastive_weight"] == 0.0 and not m.normalize and m.needs_teacher  # the released config
    with pytest.raises(ConfigError, match="does not take.*valid: \\['alpha'"):
        resolve_kwargs(m, {"beta": 1})
    assert resolve_kwargs(m, {"alpha": 0.2})["alpha"] == 0.2


def test_hycd_alpha1_t1_is_the_clip_loss(tiny_bundle):
    """HyCD with α=1, T=1 has one-hot targets: exactly CLIP InfoNCE on the same (adapter) features."""
    from .test_adapter_models import _batch

    s = score_contrastive(tiny_bundle.model, _batch(tiny_bundle, 6))
    img, txt, scale = s.embeddings["image"], s.embeddings["text"], s.extras["logit_scale"]
    h = hycd(img, txt, img.detach().flip(0), txt.detach(), scale, alpha=1.0, temperature=1.0)
    assert torch.allclose(h.loss, clip_contrastive(img, txt, scale).loss, atol=1e-6)


def test_rafa_zero_iff_both_features_equal_the_reference():
    r = torch.randn(4, 8)
    assert rafa(r.clone(), r.clone(), targets=r).loss.item() == 0.0
    assert rafa(r.clone(), r + 0.1, targets=r).loss.item() > 0
    assert rafa(r + 0.1, r.clone(), targets=r).loss.item() > 0


def test_clip_refine_composition_and_resampled_shared_targets():
    m = get_clip_method("clip_refine")
    kw = resolve_kwargs(m, {})
    s = _scores()
    gen = torch.Generator().manual_seed(7)
    out1 = clip_method_loss(m, s, kw, normalize=False, generator=gen)
    out2 = clip_method_loss(m, s, kw, normalize=False, generator=gen)
    assert out1.metrics["loss/rafa"] != out2.metrics["loss/rafa"]  # new targets every call (every step)
    assert torch.allclose(out1.loss, out1.metrics["loss/rafa"] + out1.metrics["loss/hycd"])  # λ_cont = 0
    assert "loss/contrastive" in out1.metrics and "geometry/modality_gap" in out1.metrics
    # raw HyCD (s = 1), as the reference code, and the shared target draw: re-create both terms by hand
    gen = torch.Generator().manual_seed(7)
    want_rafa = rafa(s.embeddings["image"], s.embeddings["text"], generator=gen).loss
    want_hycd = hycd(s.embeddings["image"], s.embeddings["text"], s.extras["teacher_image"],
                     s.extras["teacher_text"], None, alpha=0.5).loss
    assert torch.allclose(out1.loss, want_rafa + want_hycd, atol=1e-6)


def test_zscl_composition_with_reference_images():
    m = get_clip_method("zscl")
    kw = resolve_kwargs(m, {"l2_weight": 0.5})
    s = _scores(teacher=False)
    aux = Scores(logps=torch.zeros(6, 0), embeddings={"image": torch.randn(6, 5, requires_grad=True)},
                 extras={"teacher_image": torch.randn(6, 5), "teacher_anchors": torch.randn(9, 5)})
    out = clip_method_loss(m, s, kw, normalize=True, aux=aux, l2=torch.tensor(2.0))
    assert set(out.metrics) >= {"loss/contrastive", "loss/zscl", "loss/l2", "zscl/zscl/image"}
    total = out.metrics["loss/contrastive"] + out.metrics["loss/zscl"] + 0.5 * 2.0
    assert torch.allclose(out.loss, total, atol=1e-5)
    out.loss.backward()
    assert aux.embeddings["image"].grad is not None  # the policy's reference-image features are distilled
    no_aux = clip_method_loss(m, _scores(teacher=False), kw, normalize=True)  # the loop's evaluation: no aux
    assert "loss/zscl" not in no_aux.metrics


def test_task_teacher_and_trainable_logit_params(tmp_path):
    from mmalign.methods.clip import ClipTask
    from mmalign.methods.clip_teacher import CachedTeacher, CopyTeacher

    t = ClipTask(_cfg(tmp_path, **{"loss.name": "clip_refine"}))
    assert isinstance(t.teacher, CopyTeacher) and not t.normalize and t.needs_reference is False
    assert not t.model.logit_scale.requires_grad  # raw HyCD and λ_cont = 0: no term reads the scale
    t = ClipTask(_cfg(tmp_path, **{"loss.name": "clip_refine", "reference.strategy": "precomputed"}))
    assert isinstance(t.teacher, CachedTeacher)
    t = ClipTask(_cfg(tmp_path, **{"loss.name": "clip"}))
    assert t.teacher is None and t.normalize and t.model.logit_scale.requires_grad
    t = ClipTask(_cfg(tmp_path, **{"loss.name": "siglip", "clip.init_logit_bias": -5.0}))
    assert t.model.logit_bias.requires_grad and t.model.logit_scale.requires_grad
    with pytest.raises(ConfigError, match="use 'copy'"):
        ClipTask(_cfg(tmp_path, **{"loss.name": "zscl", "reference.strategy": "ema"}))
    with pytest.raises(ConfigError, match="needs clip.ref_images"):
        ClipTask(_cfg(tmp_path, **{"loss.name": "zscl"})).stage_data(_cfg(tmp_path).stages or _stage())


def _stage():
    from mmalign.schema import StageConfig

    return StageConfig()


def test_weight_average_sma_wise_and_final_wise_ft(tmp_path):
    """after_step every k steps keeps θ_avg = mean of the snapshots (ZSCL --we); the saved weights are the
    average; WiSE-FT mixes them with the initial weights; the logit scale is clamped at ln 100."""
    from mmalign.methods.clip import ClipTask

    t = ClipTask(_cfg(tmp_path, **{"loss.name": "clip", "clip.weight_average": "sma", "clip.average_every": 2}))
    p = t.model.visual.proj
    snaps = [p.detach().clone()]
    for step in range(1, 6):
        with torch.no_grad():
            p.add_(1.0)
            t.model.logit_scale.fill_(10.0)
        t.after_step(step)
        if (step - 1) % 2 == 0:
            snaps.append(p.detach().clone())
    assert t._avg_count == 3 and t.model.logit_scale.item() == pytest.approx(4.60517, abs=1e-4)
    assert torch.allclose(t._avg["visual.proj"], torch.stack(snaps).mean(0), atol=1e-5)
    assert torch.allclose(t.final_state_dict(t.model)["visual.proj"], torch.stack(snaps).mean(0), atol=1e-5)

    t = ClipTask(_cfg(tmp_path, **{"loss.name": "clip", "clip.final_wise_alpha": 0.25}))
    init = t.model.visual.proj.detach().clone()
    with torch.no_grad():
        t.model.visual.proj.add_(4.0)
    assert torch.allclose(t.final_state_dict(t.model)["visual.proj"], init + 1.0, atol=1e-5)

    t = ClipTask(_cfg(tmp_path, **{"loss.name": "clip", "clip.weight_average": "wise", "clip.wise_alpha": 1.0}))
    with torch.no_grad():
        t.model.visual.proj.add_(2.0)
    t.after_step(1)  # WiSE with α = 1 is the plain SMA: (θ_0 + θ_1) / 2
    assert torch.allclose(t._avg["visual.proj"], init + 1.0, atol=1e-5)
