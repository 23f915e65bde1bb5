"""Builders of the diffusion family: the configured components (tiny random ones or a diffusers pipeline
directory, frozen VAE / text encoders, optional zero-terminal-SNR schedule) and the trainable denoiser (full or
PEFT LoRA). Also used by recipes that build their own diffusion task (Self-NPO)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError

__all__ = ["TINY_KEYS", "build_components", "build_denoiser", "freeze"]

TINY_KEYS = {"channels", "text_hidden", "latent_channels", "text_max_length", "t5_length"}


def build_components(cfg):
    """The configured components: tiny random ones, or a diffusers pipeline directory."""
    from ..models.diffusion import load_diffusion_components
    from ..models.diffusion_tiny import build_tiny_components

    dc, mc = cfg.diffusion, cfg.model
    if mc.name_or_path == "tiny":
        bad = sorted(set(mc.tiny) - TINY_KEYS)
        if bad:
            raise ConfigError(f"model.tiny has unknown keys {bad} for a diffusion model; allowed: {sorted(TINY_KEYS)}")
        tiny = dict(mc.tiny)
        if "channels" in tiny:
            tiny["channels"] = tuple(tiny["channels"])
        comps = build_tiny_components("unet" if dc.kind == "auto" else dc.kind,
                                      prediction_type="epsilon" if dc.prediction_type == "auto" else dc.prediction_type,
                                      pixel_space=dc.pixel_space, seed=cfg.run.seed, resolution=dc.resolution, **tiny)
    else:
        from ..models.diffusion import is_pixel_space_dir

        if dc.pixel_space != is_pixel_space_dir(Path(mc.name_or_path).expanduser()):
            raise ConfigError(f"diffusion.pixel_space={str(dc.pixel_space).lower()} but model.name_or_path="
                              f"{mc.name_or_path!r} is {'not ' if dc.pixel_space else ''}a pixel-space pipeline "
                              "(no VAE; written by a tiny pixel-space run); set diffusion.pixel_space accordingly")
        comps = load_diffusion_components(
            mc.name_or_path, kind=dc.kind, dtype=mc.dtype, vae_dtype=dc.vae_dtype,
            prediction_type=None if dc.prediction_type == "auto" else dc.prediction_type, load_t5=dc.load_t5,
            max_sequence_length=dc.max_sequence_length)
    if dc.zero_terminal_snr:
        if comps.kind == "sd3":
            raise ConfigError("diffusion.zero_terminal_snr applies to DDPM schedules (unet/sdxl); flow matching "
                              "already reaches pure noise at σ = 1")
        if comps.prediction_type == "epsilon":  # prediction_type=auto kept an ε-prediction scheduler
            raise ConfigError("diffusion.zero_terminal_snr=true but the model predicts epsilon, which is undefined "
                              "at zero SNR; set diffusion.prediction_type=v_prediction or sample (Lin et al. §3.2)")
        from diffusers import DDPMScheduler

        comps.scheduler = DDPMScheduler.from_config(comps.scheduler.config, rescale_betas_zero_snr=True,
                                                    timestep_spacing="trailing")
    freeze(comps)
    return comps


def freeze(comps) -> None:
    for m in [comps.vae, *comps.text_encoders]:
        if m is not None:
            m.requires_grad_(False).eval()


def build_denoiser(cfg, comps) -> nn.Module:
    from ..models.diffusion import apply_lora

    net = comps.denoiser
    if cfg.model.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    if not cfg.lora.enabled:
        net.requires_grad_(True)
        return net
    lc = cfg.lora
    model = apply_lora(net, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules)
    for p in model.parameters():  # LoRA weights train in fp32 under a half-precision base (diffusers scripts)
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model
