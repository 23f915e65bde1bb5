"""CLIP recipes without training: the contrastive rows of the one METHODS table, loss compositions, teacher wiring,
trainable logit parameters, weight averaging and WiSE-FT of the saved weights, the resumable RaFA stream."""

from __future__ import annotations

import pytest
import torch

from mmalign.adapters.contrastive import score_contrastive
from mmalign.api import load_train_config
from mmalign.config import ConfigError
from mmalign.losses import clip_contrastive, hycd, rafa
from mmalign.methods.clip_losses import CLIP_REFINE_DEFAULTS, ZSCL_DEFAULTS, clip_refine_row, zscl_row
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


def _kw(defaults: dict, *, normalize: bool, gen=None, l2=None, **over) -> dict:
    """A row's kwargs as the dual-encoder family's loss_kwargs completes them."""
    return {**defaults, **over, "normalize": normalize, "local_loss": False, "rafa_generator": lambda device: gen,
            "l2": l2}


def test_rows_and_kwargs_checked_at_config_load(tmp_path):
    from mmalign.adapters.contrastive_family import DualEncoderFamily
    from mmalign.methods.clip import ClipTask
    from mmalign.methods.table import METHODS, valid_names

    assert valid_names(DualEncoderFamily) == ["clip", "clip_refine", "siglip", "zscl"]
    assert METHODS["clip_refine"].defaults["contrastive_weight"] == 0.0  # the released config
    assert METHODS["zscl"].aux == "scores" and all(METHODS[n].needs == {"embeddings"} for n in valid_names(
        DualEncoderFamily))
    with pytest.raises(ConfigError, match="valid: \\['clip', 'clip_refine', 'siglip', 'zscl'\\]"):
        ClipTask(_cfg(tmp_path, **{"loss.name": "clip-refine"}))
    with pytest.raises(ConfigError, match="loss.kwargs.beta: not an option of loss 'clip_refine'; valid: \\['alpha'"):
        ClipTask(_cfg(tmp_path, **{"loss.name": "clip_refine", "loss.kwargs": {"beta": 1}}))
    t = ClipTask(_cfg(tmp_path, **{"loss.name": "clip_refine", "loss.kwargs": {"alpha": 0.2}}))
    assert t.loss_kwargs["alpha"] == 0.2 and t.loss_kwargs["hycd_weight"] == 1.0 and t.loss_kwargs["normalize"] is False


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
    s = _scores()
    gen = torch.Generator().manual_seed(7)
    kw = _kw(CLIP_REFINE_DEFAULTS, normalize=False, gen=gen)
    out1 = clip_refine_row(s, None, None, kw)
    out2 = clip_refine_row(s, None, None, kw)
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
    kw = _kw(ZSCL_DEFAULTS, normalize=True, l2=lambda: torch.tensor(2.0), l2_weight=0.5)
    s = _scores(teacher=False)
    aux = Scores(logps=torch.zeros(6, 0), embeddings={"image": torch.randn(6, 5, requires_grad=True)},
                 extras={"teacher_image": torch.randn(6, 5), "teacher_anchors": torch.randn(9, 5)})
    out = zscl_row(s, None, None, kw, aux=aux)
    assert set(out.metrics) >= {"loss/contrastive", "loss/zscl", "loss/l2", "zscl/zscl/image"}
    total = out.metrics["loss/contrastive"] + out.metrics["loss/zscl"] + 0.5 * 2.0
    assert torch.allclose(out.loss, total, atol=1e-5)
    out.loss.backward()
    assert aux.embeddings["image"].grad is not None  # the policy's reference-image features are distilled
    no_aux = zscl_row(_scores(teacher=False), None, None, kw)  # the loop's evaluation: no aux
    assert "loss/zscl" not in no_aux.metrics


def test_task_teacher_and_trainable_logit_params(tmp_path):
    from mmalign.adapters.contrastive import CachedTeacher, CopyTeacher
    from mmalign.methods.clip import ClipTask

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


def test_task_state_resumes_the_average_and_the_rafa_stream(tmp_path):
    """state_dict / load_state_dict (the loop's checkpoint hooks) carry the weight average and the RaFA stream:
    a restored task draws the very targets the interrupted one would have drawn next."""
    from mmalign.methods.clip import ClipTask

    cfg = _cfg(tmp_path, **{"loss.name": "clip_refine", "clip.weight_average": "sma", "clip.average_every": 1})
    t = ClipTask(cfg)
    gen = t.loss_kwargs["rafa_generator"](torch.device("cpu"))
    torch.randn(3, generator=gen)
    t.after_step(1)
    state = t.state_dict()
    want = torch.randn(4, generator=gen)
    t2 = ClipTask(cfg)
    t2.load_state_dict(state)
    assert t2._avg_count == 1 and torch.equal(t2._avg["visual.proj"], t._avg["visual.proj"])
    assert torch.equal(torch.randn(4, generator=t2.loss_kwargs["rafa_generator"](torch.device("cpu"))), want)
