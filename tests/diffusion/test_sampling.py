"""Sampling with NPO-guided CFG (mmalign.sample.diffusion) against the stock diffusers pipelines."""

from __future__ import annotations

import pytest
import torch

from mmalign.models import npo_weights as npo
from mmalign.models.diffusion_tiny import build_tiny_components
from mmalign.sample import diffusion as SD

from . import perturbed

PROMPTS = ["a red circle on a black background", "a blue square"]


def _stock(pipe, prompts, seeds, **kwargs):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, generator=gens, output_type="pt", **kwargs).images.float()


@pytest.mark.parametrize(("kind", "sampler"), [("unet", "euler"), ("sdxl", "ddim"), ("sd3", "ddim")])
def test_npo_cfg_with_alpha_one_beta_zero_reproduces_the_stock_pipeline(kind, sampler):
    """θ_neg = θ_base + 1·(θ_pos − θ_base) + 0·δ = θ_pos, so NPO-CFG is ordinary CFG: the image equals the stock
    ``Pipeline.__call__`` with the same seeds to ~1e-5 (two batch-B forwards vs one batch-2B forward). Euler
    exercises ``scale_model_input``; SD3 is flow matching with a transformer."""
    comps = build_tiny_components(kind, seed=0)
    pipe = SD.build_pipeline(comps, sampler=sampler)
    pos = getattr(pipe, SD.denoiser_name(pipe))
    base = perturbed(pos, 1, scale=0.05)
    delta = npo.weight_offset(perturbed(base, 2, scale=0.05), base)
    neg = npo.negative_model(base, positive=pos, alpha=1.0, npo_offset=delta, beta=0.0)
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0)
    expected = _stock(pipe, PROMPTS, [0, 1], **kwargs)
    got = SD.generate(pipe, PROMPTS, [0, 1], negative=neg, **kwargs)
    assert got.shape == expected.shape == (2, 3, 16, 16)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert getattr(pipe, SD.denoiser_name(pipe)) is pos  # restored after sampling


def test_npo_negative_changes_cfg_only_when_cfg_is_on():
    comps = build_tiny_components("unet", seed=0)
    pipe = SD.build_pipeline(comps, sampler="ddim")
    neg = perturbed(pipe.unet, 3, scale=0.2)
    plain = SD.generate(pipe, PROMPTS, [0, 1], num_inference_steps=3, guidance_scale=5.0)
    guided = SD.generate(pipe, PROMPTS, [0, 1], num_inference_steps=3, guidance_scale=5.0, negative=neg)
    assert (plain - guided).abs().max() > 1e-3
    # guidance_scale <= 1: the pipeline skips CFG, the negative model is never called
    no_cfg = SD.generate(pipe, PROMPTS, [0, 1], num_inference_steps=3, guidance_scale=1.0, negative=neg)
    torch.testing.assert_close(no_cfg, _stock(pipe, PROMPTS, [0, 1], num_inference_steps=3, guidance_scale=1.0))


def test_guided_denoiser_routes_the_cfg_halves():
    """[uncond; cond] batch: θ_neg on the first half, θ_pos on the second; any other batch size: θ_pos only."""
    comps = build_tiny_components("sdxl", seed=0)
    pos = comps.denoiser
    neg = perturbed(pos, 4, scale=0.2)
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 16, 32, generator=g)
    added = {"text_embeds": torch.randn(4, 16, generator=g), "time_ids": torch.rand(4, 6, generator=g) * 16}
    t = torch.tensor(500)
    wrapper = SD.GuidedDenoiser(pos, neg, cfg_batch=4)
    with torch.no_grad():
        got = wrapper(x, t, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)[0]

        def run(m, sl):
            return m(x[sl], t, encoder_hidden_states=emb[sl], added_cond_kwargs={k: v[sl] for k, v in added.items()},
                     return_dict=False)[0]

        torch.testing.assert_close(got, torch.cat([run(neg, slice(0, 2)), run(pos, slice(2, 4))]))
        half = wrapper(x[:2], t, encoder_hidden_states=emb[:2],
                       added_cond_kwargs={k: v[:2] for k, v in added.items()}, return_dict=False)[0]
        torch.testing.assert_close(half, run(pos, slice(0, 2)))
    assert wrapper.config is pos.config and wrapper.dtype == pos.dtype  # what pipelines read off their denoiser


def test_seeds_are_per_image_and_pixel_space_works():
    """Image i depends on (prompt i, seed i) only, not on the batch it was sampled in; pixel-space models
    (no VAE) sample too and come back in [0, 1]."""
    comps = build_tiny_components("unet", seed=0, pixel_space=True)
    pipe = SD.build_pipeline(comps, sampler="ddim")
    prompts, seeds = [PROMPTS[0], PROMPTS[1], PROMPTS[0]], [5, 6, 7]
    together = SD.generate(pipe, prompts, seeds, num_inference_steps=2, batch_size=3)
    alone = SD.generate(pipe, prompts, seeds, num_inference_steps=2, batch_size=1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert together.shape == (3, 3, 16, 16) and together.min() >= 0 and together.max() <= 1
    assert (together[0] - together[2]).abs().max() > 0  # same prompt, other seed


def test_sample_settings_and_labelled_grid(tmp_path):
    from PIL import Image

    comps = build_tiny_components("unet", seed=0)
    pipe = SD.build_pipeline(comps)
    settings = [SD.Setting("cfg", 5.0), SD.Setting("npo", 5.0, negative=perturbed(pipe.unet, 5, scale=0.05))]
    out = SD.sample_settings(pipe, settings, PROMPTS, [0, 1, 2], num_inference_steps=2)
    assert set(out) == {"cfg", "npo"} and out["cfg"].shape == (2, 3, 3, 16, 16)
    torch.testing.assert_close(out["cfg"][0, 0], SD.generate(pipe, PROMPTS[:1], [0], num_inference_steps=2)[0])
    rows, labels = SD.grid_rows(out)
    path = SD.save_grid(rows, tmp_path / "grid.png", row_labels=labels, col_labels=["s0", "s1", "s2"], title="t")
    img = Image.open(path)
    assert img.size[0] > 3 * 16 * 3 and img.size[1] > 4 * 16 * 3
    with pytest.raises(ValueError, match="one seed per image"):
        SD.generate(pipe, PROMPTS, [0], num_inference_steps=2)
    with pytest.raises(ValueError, match="unique"):
        SD.sample_settings(pipe, [settings[0], settings[0]], PROMPTS, [0])


def _lora_run_dir(base_dir, out_dir):
    """A LoRA run's final/ as the diffusion recipes write it (pytorch_lora_weights + mmalign_diffusion.json)."""
    import json

    from mmalign.models.diffusion import apply_lora, load_diffusion_components, save_lora

    peft_model = apply_lora(load_diffusion_components(base_dir).denoiser, r=2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_lora(peft_model, "unet", out_dir)
    (out_dir / "mmalign_diffusion.json").write_text(json.dumps({"kind": "unet", "format": "lora",
                                                                "base": str(base_dir)}))
    return peft_model


def test_lora_and_full_run_directories_load_like_a_user_would(tmp_path):
    """A LoRA run loads through ``pipe.load_lora_weights`` and computes what the trained PEFT model computed; a
    full-weight run loads with ``from_pretrained``; both resolve their base pipeline from the saved record."""
    import json

    from mmalign.models.diffusion_tiny import build_tiny_pipeline_dir

    base_dir = build_tiny_pipeline_dir(tmp_path / "base", "unet")
    peft_model = _lora_run_dir(base_dir, tmp_path / "lora")
    comps = SD.load_components(tmp_path / "lora")
    assert SD.base_pipeline_dir(tmp_path / "lora") == base_dir
    loaded = SD.load_denoiser(tmp_path / "lora", comps)
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 16, generator=g)
    with torch.no_grad():
        want = peft_model(x, torch.tensor([3, 700]), encoder_hidden_states=emb).sample
        got = loaded(x, torch.tensor([3, 700]), encoder_hidden_states=emb).sample
        plain = comps.denoiser(x, torch.tensor([3, 700]), encoder_hidden_states=emb).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-4  # the base itself is untouched
    full = perturbed(comps.denoiser, 7, scale=0.05)
    full.save_pretrained(str(tmp_path / "full" / "unet"))
    (tmp_path / "full" / "mmalign_diffusion.json").write_text(json.dumps({"kind": "unet", "format": "full",
                                                                          "base": str(base_dir)}))
    delta = SD.npo_offset_from(tmp_path / "full", comps)
    k = "conv_in.weight"
    torch.testing.assert_close(delta[k], full.state_dict()[k] - comps.denoiser.state_dict()[k], atol=1e-6, rtol=0)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        SD.base_pipeline_dir(tmp_path)


def test_cli_sample_diffusion_with_npo(tmp_path):
    import json

    from typer.testing import CliRunner

    from mmalign.cli import app
    from mmalign.models.diffusion_tiny import build_tiny_pipeline_dir

    base_dir = build_tiny_pipeline_dir(tmp_path / "base", "unet")
    _lora_run_dir(base_dir, tmp_path / "dpo")
    _lora_run_dir(base_dir, tmp_path / "npo")
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(app, [
        "sample", "diffusion", "--model", str(tmp_path / "dpo"), "--npo", str(tmp_path / "npo"), "--alpha", "0.5",
        "--beta", "1", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seeds", "0", "--seeds", "1",
        "--steps", "2", "--device", "cpu", "--out", str(out), "--save-offset", str(tmp_path / "offset")])
    assert result.exit_code == 0, result.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["settings"] == ["cfg w=5", "npo w=5 a=0.5 b=1"] and meta["npo_offset"]["l2_norm"] > 0
    assert out.is_file() and (tmp_path / "offset" / "npo_offset.safetensors").is_file()
    bad = CliRunner().invoke(app, ["sample", "diffusion", "--model", str(tmp_path / "nowhere"), "--prompt", "x"])
    assert bad.exit_code == 2 and "neither" in bad.output
