"""Tiny diffusion builders and the real-checkpoint path (save a tiny pipeline, load it back like a user)."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.models.diffusion import (
    apply_lora,
    detect_kind,
    load_diffusion_components,
    pipeline_class,
    save_lora,
)
from mmalign.models.diffusion_tiny import build_tiny_clip_tokenizer, build_tiny_components, build_tiny_pipeline_dir


def test_tiny_tokenizer_is_a_real_clip_tokenizer():
    tok = build_tiny_clip_tokenizer(max_length=16)
    ids = tok(["a red circle", ""], padding="max_length", max_length=16, truncation=True).input_ids
    assert len(tok) == 512 + 744 + 2 and tok.bos_token_id == len(tok) - 2 and tok.eos_token_id == len(tok) - 1
    assert ids[0][0] == tok.bos_token_id and len(ids[0]) == 16
    assert len([i for i in ids[0] if i != tok.pad_token_id]) <= 8  # merges keep words to a few tokens
    assert tok.decode(ids[0], skip_special_tokens=True).strip() == "a red circle"


@pytest.mark.parametrize("kind", ["unet", "sdxl", "sd3"])
def test_tiny_components_forward(kind):
    comps = build_tiny_components(kind, seed=0)
    n = sum(p.numel() for p in comps.denoiser.parameters())
    assert 5_000 < n < 1_000_000
    assert comps.latent_shape(16) == (4, 8, 8)
    embeds, pooled = comps.encode_prompt(["a red circle", "a blue square"])
    assert (pooled is None) == (kind == "unet")
    params = comps.encode_images(torch.rand(2, 3, 16, 16) * 2 - 1)
    z = comps.latents_from_parameters(params, sample=False)
    assert params.shape == (2, 8, 8, 8) and z.shape == (2, 4, 8, 8)
    assert comps.decode_latents(z).shape == (2, 3, 16, 16)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        if kind == "sd3":
            out = comps.denoiser(hidden_states=z, timestep=t.float(), encoder_hidden_states=embeds,
                                 pooled_projections=pooled).sample
        else:
            added = None
            if kind == "sdxl":
                added = {"text_embeds": pooled, "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
            out = comps.denoiser(z, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    assert out.shape == z.shape and torch.isfinite(out).all()
    assert comps.prediction_type == ("flow" if kind == "sd3" else "epsilon")


def test_sd3_latents_use_shift_and_scale():
    comps = build_tiny_components("sd3", seed=0)
    params = comps.encode_images(torch.zeros(1, 3, 16, 16))
    mean = params[:, :4]
    cfg = comps.vae.config
    torch.testing.assert_close(comps.latents_from_parameters(params, sample=False),
                               (mean - cfg.shift_factor) * cfg.scaling_factor)


def test_pixel_space_has_no_vae():
    comps = build_tiny_components("unet", pixel_space=True, seed=0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert comps.vae is None and comps.latent_shape(16) == (3, 16, 16)
    assert torch.equal(comps.latents_from_parameters(comps.encode_images(x)), x)
    with pytest.raises(ValueError, match="pixel-space"):
        build_tiny_pipeline_dir("/nonexistent", "unet", pixel_space=True)


@pytest.mark.parametrize("kind", ["unet", "sdxl", "sd3"])
def test_pipeline_dir_round_trip(tmp_path, kind):
    """save_pretrained → load_diffusion_components: same kind, same weights, same prompt embeddings."""
    comps = build_tiny_components(kind, seed=0)
    path = build_tiny_pipeline_dir(tmp_path / kind, kind, seed=0)
    assert detect_kind(path) == kind
    loaded = load_diffusion_components(path)
    assert loaded.kind == kind and loaded.source == str(path)
    sd0, sd1 = comps.denoiser.state_dict(), loaded.denoiser.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    e0, p0 = comps.encode_prompt(["a green triangle"])
    e1, p1 = loaded.encode_prompt(["a green triangle"])
    torch.testing.assert_close(e0, e1)
    assert all(not p.requires_grad for m in [loaded.vae, *loaded.text_encoders] if m is not None
               for p in m.parameters())
    if kind == "unet":
        v = load_diffusion_components(path, prediction_type="v_prediction")
        assert v.prediction_type == "v_prediction"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no diffusers pipeline directory"):
        load_diffusion_components(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_diffusion_components(tmp_path / "empty")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(FileNotFoundError, match="lacks the subfolders"):
        load_diffusion_components(tmp_path / "partial")
    (tmp_path / "partial" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="set diffusion.kind"):
        detect_kind(tmp_path / "partial")


@pytest.mark.parametrize("kind", ["unet", "sd3"])
def test_saved_lora_loads_with_load_lora_weights(tmp_path, kind):
    """apply_lora → save_lora → Pipeline.load_lora_weights reproduces the PEFT model (alpha ≠ r included)."""
    path = build_tiny_pipeline_dir(tmp_path / "base", kind, seed=0)
    comps = load_diffusion_components(path)
    model = apply_lora(comps.denoiser, r=2, alpha=4)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)
    save_lora(model, kind, tmp_path / "lora")
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}  # tiny SD3 has no T5
    pipe = pipeline_class(kind).from_pretrained(path, **no_t5)
    pipe.load_lora_weights(tmp_path / "lora")
    net = pipe.transformer if kind == "sd3" else pipe.unet
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    e, p = comps.encode_prompt(["a red circle"])
    with torch.no_grad():
        if kind == "sd3":
            ours = model(hidden_states=x, timestep=t.float(), encoder_hidden_states=e, pooled_projections=p).sample
            theirs = net(hidden_states=x, timestep=t.float(), encoder_hidden_states=e, pooled_projections=p).sample
        else:
            ours, theirs = model(x, t, encoder_hidden_states=e).sample, net(x, t, encoder_hidden_states=e).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_pixel_space_pipeline_dir_loads_by_path_and_zero_snr_is_a_config_key(tmp_path):
    """A tiny pixel-space pipeline saved with ``save_pretrained`` (no VAE) loads back through
    ``model.name_or_path`` with the same UNet weights; ``diffusion.zero_terminal_snr`` rescales the schedule to
    ᾱ_T = 0 with trailing timesteps; mismatched or unsupported settings are config errors."""
    from mmalign.api import load_train_config
    from mmalign.config import ConfigError
    from mmalign.methods.diffusion import build_components

    comps = build_tiny_components("unet", pixel_space=True, seed=0, prediction_type="sample")
    comps.pipeline(comps.denoiser).save_pretrained(str(tmp_path / "px"))

    def cfg(*overrides):
        return load_train_config({"modality": "diffusion", "diffusion": {"resolution": 16},
                                  "data": {"train": ["unused.jsonl"]}}, list(overrides))

    loaded = build_components(cfg(f"model.name_or_path={tmp_path / 'px'}", "diffusion.pixel_space=true",
                                  "diffusion.prediction_type=sample", "diffusion.zero_terminal_snr=true"))
    assert loaded.vae is None and loaded.scheduler.config.prediction_type == "sample"
    want = comps.denoiser.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.denoiser.state_dict().items())
    assert float(loaded.scheduler.alphas_cumprod[-1]) < 1e-6 < float(comps.scheduler.alphas_cumprod[-1])
    assert loaded.scheduler.config.timestep_spacing == "trailing"
    with pytest.raises(ConfigError, match="pixel-space pipeline"):
        build_components(cfg(f"model.name_or_path={tmp_path / 'px'}"))
    with pytest.raises(ConfigError, match="zero_terminal_snr=true with prediction_type=epsilon"):
        cfg("diffusion.zero_terminal_snr=true", "diffusion.prediction_type=epsilon")
    with pytest.raises(ConfigError, match="predicts epsilon"):
        build_components(cfg("diffusion.zero_terminal_snr=true"))  # auto: the tiny default is ε-prediction
    with pytest.raises(ConfigError, match="flow matching"):
        build_components(cfg("diffusion.kind=sd3", "diffusion.zero_terminal_snr=true"))
