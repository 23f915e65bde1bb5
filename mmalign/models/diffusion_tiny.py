"""Tiny random-init diffusion components for CPU tests, demos and benchmarks (:func:`build_tiny_components`).

Split out of :mod:`mmalign.models.diffusion`, which still re-exports :func:`build_tiny_clip_tokenizer`,
:func:`build_tiny_components` and :func:`build_tiny_pipeline_dir`. Tiny tokenizers are real ``CLIPTokenizer`` s
built offline from the first merges of open_clip's bundled BPE table (no download). A tiny model may be *pixel
space* (``vae=None``): the "latents" are the images in [-1, 1].
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import torch

from .diffusion import KINDS, PREDICTION_TYPES, DiffusionComponents

# Real SD3 VAE latent normalisation (stabilityai/stable-diffusion-3.5-medium vae/config.json); tiny SD3 reuses it
# so that the shift path is exercised.
_SD3_VAE_SCALE, _SD3_VAE_SHIFT = 1.5305, 0.0609

__all__ = ["build_tiny_clip_tokenizer", "build_tiny_components", "build_tiny_pipeline_dir"]


def build_tiny_clip_tokenizer(num_merges: int = 744, max_length: int = 16):
    """A real :class:`CLIPTokenizer` with ``512 + num_merges + 2`` tokens, built offline.

    The vocabulary follows CLIP's construction (byte symbols, the same with ``</w>``, one token per merge,
    then ``<|startoftext|>``/``<|endoftext|>``) using the first ``num_merges`` merges of open_clip's bundled
    ``bpe_simple_vocab_16e6.txt.gz``, so common English words still become few tokens while the embedding
    table stays small (1258 rows by default).
    """
    from importlib.resources import files

    from transformers import CLIPTokenizer

    try:
        bpe_path = files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
        lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise RuntimeError("build_tiny_clip_tokenizer needs open_clip's bundled BPE table "
                           "(pip install open_clip_torch)") from e
    merges = [tuple(m.split()) for m in lines[1 : 1 + num_merges]]  # line 0 is a version header
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = max_length
    return tok


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's byte → printable-character table, in CLIP's vocabulary order (printable bytes first, then
    the remaining bytes mapped to code points 256, 257, ...)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def _clip_config(tokenizer, hidden: int, *, layers: int = 2, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=projection_dim or hidden,
    )


def _tiny_vae(latent_channels: int, channels: tuple[int, int], *, sd3: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=list(channels),
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1, norm_num_groups=min(channels), sample_size=32,
        scaling_factor=_SD3_VAE_SCALE if sd3 else 0.18215, shift_factor=_SD3_VAE_SHIFT if sd3 else None,
    )


def build_tiny_components(
    kind: str = "unet",
    *,
    prediction_type: str = "epsilon",
    pixel_space: bool = False,
    seed: int = 0,
    resolution: int = 16,
    channels: tuple[int, int] = (8, 16),
    text_hidden: int = 16,
    latent_channels: int = 4,
    text_max_length: int = 16,
    t5_length: int = 8,
) -> DiffusionComponents:
    """Random-init components small enough for CPU tests (≈50–150k parameters in the denoiser).

    Args:
        kind: ``unet`` (SD1.5-style), ``sdxl`` (two text encoders, ``added_cond_kwargs``) or ``sd3``
            (MMDiT + flow matching; no T5, the pipeline's zeros stand in, ``t5_length`` tokens).
        prediction_type: ε, v or x0 target of the DDPM scheduler (ignored for sd3).
        pixel_space: no VAE: the denoiser works on 3-channel images directly.
        resolution: the image size the denoiser's ``sample_size`` is set for (latents are half of it with
            the tiny 2-block VAE).
        channels: UNet/VAE block widths; ``text_hidden`` the CLIP width.
    """
    from diffusers import (
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {list(KINDS)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {list(PREDICTION_TYPES)}")
    tok = build_tiny_clip_tokenizer(max_length=text_max_length)
    torch.manual_seed(seed)
    vae = None if pixel_space else _tiny_vae(latent_channels, channels, sd3=kind == "sd3")
    lat_c = 3 if pixel_space else latent_channels
    sample = resolution if pixel_space else resolution // 2
    groups = min(4, min(channels))
    ddpm = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type=prediction_type, clip_sample=False, steps_offset=1)

    if kind == "unet":
        te = CLIPTextModel(_clip_config(tok, text_hidden))
        unet = UNet2DConditionModel(
            sample_size=sample, in_channels=lat_c, out_channels=lat_c, layers_per_block=1,
            block_out_channels=channels, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=text_hidden,
            attention_head_dim=2, norm_num_groups=groups,
        )
        return DiffusionComponents("unet", unet, DDPMScheduler(**ddpm), vae, [te], [tok])
    if kind == "sdxl":
        time_dim, proj = 4, text_hidden
        te1 = CLIPTextModel(_clip_config(tok, text_hidden))
        te2 = CLIPTextModelWithProjection(_clip_config(tok, text_hidden, projection_dim=proj))
        unet = UNet2DConditionModel(
            sample_size=sample, in_channels=lat_c, out_channels=lat_c, layers_per_block=1,
            block_out_channels=channels, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2 * text_hidden,
            attention_head_dim=2, norm_num_groups=groups, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + proj, transformer_layers_per_block=1,
        )
        return DiffusionComponents("sdxl", unet, DDPMScheduler(**ddpm), vae, [te1, te2], [tok, tok])
    proj = text_hidden
    te1 = CLIPTextModelWithProjection(_clip_config(tok, text_hidden, projection_dim=proj))
    te2 = CLIPTextModelWithProjection(_clip_config(tok, text_hidden, projection_dim=proj))
    heads, head_dim = 2, 8
    transformer = SD3Transformer2DModel(
        sample_size=sample, patch_size=1, in_channels=lat_c, out_channels=lat_c, num_layers=1,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=2 * text_hidden,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * proj, pos_embed_max_size=sample,
    )
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return DiffusionComponents("sd3", transformer, sched, vae, [te1, te2], [tok, tok], max_sequence_length=t5_length)


def build_tiny_pipeline_dir(path: str | os.PathLike, kind: str = "unet", **kwargs: Any) -> Path:
    """Save a tiny pipeline with ``Pipeline.save_pretrained`` so tests load it back the way a user would.

    ``kwargs`` go to :func:`build_tiny_components` (pixel-space models cannot be saved as a pipeline). The tiny
    SD3 pipeline has no T5: load it with ``StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None,
    tokenizer_3=None)`` (:func:`~mmalign.models.diffusion.load_diffusion_components` does this by itself)."""
    if kwargs.get("pixel_space"):
        raise ValueError("build_tiny_pipeline_dir: pixel-space models have no VAE; diffusers pipelines need one")
    comps = build_tiny_components(kind, **kwargs)
    out = Path(path)
    comps.pipeline().save_pretrained(str(out))
    if kind == "sd3":  # our tiny SD3 has no T5; record the short zero-T5 length for load_diffusion_components
        (out / "mmalign_tiny.json").write_text(json.dumps({"max_sequence_length": comps.max_sequence_length}))
    return out
