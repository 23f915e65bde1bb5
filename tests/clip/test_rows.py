"""The contrastive rows live in the one METHODS table and need paired embeddings: families without them refuse the
CLIP losses at config load, and the dual-encoder family refuses the rows that need candidate log-probs (it scores
one image–caption pair per example, with no likelihood), each naming the loss, the family and the reason."""

from __future__ import annotations

import pytest

from mmalign.adapters.contrastive_family import DualEncoderFamily
from mmalign.adapters.diffusion_family import DiffusionFamily
from mmalign.api import build_task, load_train_config
from mmalign.config import ConfigError
from mmalign.methods.table import METHODS

from .conftest import ASSETS

CONTRASTIVE = ["clip", "clip_refine", "siglip", "zscl"]


def _build(tmp_path, modality: str, loss: str):
    cfg = load_train_config(None, [], {"modality": modality, "model.name_or_path": "tiny", "loss.name": loss,
                                       "data.train": [str(ASSETS / "train.jsonl")],
                                       "run.output_dir": str(tmp_path / "run")})
    return build_task(cfg)


@pytest.mark.parametrize("name", CONTRASTIVE)
def test_contrastive_rows_need_embeddings_only(name):
    m = METHODS[name]
    assert m.needs == {"embeddings"} and not m.needs_reference and m.loss_fn is None and m.why
    assert DualEncoderFamily.refusal(m) is None
    why = DiffusionFamily.refusal(m)
    assert why == (f"loss {name!r} cannot run on the diffusion family: it needs paired embeddings for contrastive "
                   f"losses, Scores.embeddings (embeddings): {DiffusionFamily.cannot['embeddings']}")


def test_clip_refine_on_the_diffusion_family_is_refused_at_config_load(tmp_path):
    with pytest.raises(ConfigError) as e:
        _build(tmp_path, "diffusion", "clip_refine")
    (msg,) = e.value.errors
    assert msg.startswith("loss.name='clip_refine': loss 'clip_refine' cannot run on the diffusion family")
    assert "(embeddings): a denoiser produces no paired embeddings" in msg


@pytest.mark.parametrize("name", ["dpo", "kto", "sft", "rm", "tdpo"])
def test_text_rows_are_refused_on_the_dual_encoder_family(tmp_path, name):
    with pytest.raises(ConfigError) as e:
        _build(tmp_path, "clip", name)
    (msg,) = e.value.errors
    assert msg.startswith(f"loss.name={name!r}: loss {name!r} cannot run on the dual_encoder family: it needs ")
    for need in sorted(METHODS[name].needs):
        assert f"({need}): {DualEncoderFamily.cannot[need]}" in msg
    if "logps" in METHODS[name].needs:
        assert "there are no candidates with a log-likelihood" in msg


def test_family_config_errors_are_collected_before_building(tmp_path):
    """Every CLIP-specific problem of the run in one ConfigError, before the model is loaded."""
    cfg = load_train_config(None, [], {
        "modality": "clip", "model.name_or_path": "does/not/exist", "loss.name": "zscl",
        "loss.kwargs": {"l2_weight": 1.0, "betta": 2}, "data.train": [str(ASSETS / "train.jsonl")],
        "run.output_dir": str(tmp_path / "run"), "reference.strategy": "ema", "lora.enabled": True,
        "clip.weight_average": "sma"})
    with pytest.raises(ConfigError) as e:
        build_task(cfg)
    text = "\n".join(e.value.errors)
    assert "loss.kwargs.betta: not an option of loss 'zscl'" in text
    assert "reference.strategy='ema': zscl's teacher is the frozen initial model" in text
    assert "loss.name=zscl needs clip.ref_images" in text
    assert "lora.enabled=true cannot be combined with clip.weight_average=sma, loss.kwargs.l2_weight=1.0" in text
