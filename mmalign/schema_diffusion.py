"""The ``diffusion:`` section of a run config (used when ``modality: diffusion``).

The checkpoint is ``model.name_or_path`` (a diffusers pipeline directory, or ``tiny`` for a random CPU model
whose sizes ``model.tiny`` overrides), its weights dtype ``model.dtype``; LoRA is the ``lora:`` section and
the reference the ``reference:`` section, as for every modality. β is ``loss.kwargs.beta``, read in
``diffusion.beta_convention`` (research/diffusion.md §1.2):

==============================  ====================  =====================================================
published config                β in its own code     ``original`` (mmalign default) / ``diffusers``
==============================  ====================  =====================================================
Salesforce DiffusionDPO SD1.5   5000 (−β/2 form)      5000 / 2500
diffusers SD1.5 DPO script      2500 (β·Δ form)       5000 / 2500
diffusers / Salesforce SDXL     5000 (−β/2 form)      5000 / 2500
Diffusion-NPO SD1.5             500 (β·Δ form)        1000 / 500
Diffusion-NPO SDXL              2000 (−β/2 form)      2000 / 1000
flow_grpo SD3.5-M DPO           100 (−β/2 form)       100 / 50
==============================  ====================  =====================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def _h(text: str, default: Any = None, factory: Any = None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


# model.tiny keys of a tiny diffusion model: (minimum, what is allowed); mmalign.adapters.diffusion_build.TINY_KEYS
# lists the same names (a test keeps them equal).
TINY_SIZES = {"channels": (2, "a list of two integers >= 2 (UNet/VAE block widths), e.g. [16, 32]"),
              "text_hidden": (2, "an even integer >= 2 (CLIP text width), e.g. 32"),
              "latent_channels": (1, "an integer >= 1, e.g. 4"),
              "text_max_length": (3, "an integer >= 3 (BOS, one token, EOS), e.g. 16"),
              "t5_length": (1, "an integer >= 1, e.g. 8")}


@dataclass
class DiffusionConfig:
    """Diffusion / flow-matching preference training (Diffusion-DPO, Diffusion-NPO, SFT, KTO, Plackett–Luce)."""

    kind: Literal["auto", "unet", "sdxl", "sd3"] = _h(
        "denoiser family: unet (SD1.5/2.x), sdxl (two text encoders, added_cond_kwargs), sd3 (MMDiT, flow "
        "matching); auto reads model_index.json (tiny: unet)", "auto")
    prediction_type: Literal["auto", "epsilon", "v_prediction", "sample"] = _h(
        "target of unet/sdxl models; auto keeps the scheduler's (tiny: epsilon); sd3 always uses the flow "
        "velocity noise − x0", "auto")
    pixel_space: bool = _h("tiny models only: no VAE, the denoiser works on images directly", False)
    resolution: int = _h("training image size (square; 512 SD1.5, 1024 SDXL/SD3.5)", 512)
    center_crop: bool = _h("centre-crop after resizing the short side (false: top-left crop)", True)
    random_flip: bool = _h("random horizontal flip, decided once per example for all its images", False)
    data_format: Literal["auto", "pickapic", "pairs", "unpaired", "ranked", "sft"] = _h(
        "image row format (auto: from the columns; see mmalign.data.image)", "auto")
    drop_ties: bool = _h("Pick-a-Pic: drop label_0 = 0.5 rows (Salesforce code); false keeps them in file order "
                         "(diffusers scripts)", True)
    verify_images: bool = _h("decode every image before training so bad ones are reported (or skipped with "
                             "data.skip_bad_rows) up front; turn off for very large data", True)
    beta_convention: Literal["original", "diffusers"] = _h(
        "how loss.kwargs.beta is read: original = −log σ(−β/2·Δ) (Salesforce, SDXL scripts), diffusers = "
        "−log σ(β·Δ) (diffusers SD1.5 script; β_original = 2·β_diffusers)", "original")
    reverse_preferences: bool = _h("train on reversed preferences: Diffusion-NPO's negative model "
                                   "(same as loss.name=npo_diffusion)", False)
    noise: Literal["per_epoch", "fixed"] = _h(
        "per_epoch: fresh shared noise/timestep per example each epoch; fixed: the same every epoch (needed by "
        "reference.strategy=precomputed)", "per_epoch")
    min_timestep: int = _h("unet/sdxl: timesteps are drawn uniformly from [min_timestep, max_timestep)", 0)
    max_timestep: int | None = _h("unet/sdxl: upper bound (null: num_train_timesteps)", None)
    weighting_scheme: Literal["logit_normal", "uniform", "mode"] = _h(
        "sd3: density of the flow σ (diffusers' compute_density_for_timestep_sampling)", "logit_normal")
    logit_mean: float = _h("sd3 logit-normal mean", 0.0)
    logit_std: float = _h("sd3 logit-normal std", 1.0)
    mode_scale: float = _h("sd3 'mode' scheme scale", 1.29)
    zero_terminal_snr: bool = _h(
        "unet/sdxl: rescale the noise schedule to zero terminal SNR with 'trailing' timesteps (Lin et al., "
        "arXiv 2305.08891; diffusers' rescale_betas_zero_snr), kept in the saved scheduler config; use with "
        "v-prediction or x0 ('sample') prediction, since ε-prediction is undefined at zero SNR", False)
    snr_gamma: float | None = _h("Min-SNR-γ weighting of the errors (unet/sdxl; none in reference DPO code)", None)
    vae_sample: bool = _h("latents are a VAE posterior sample (reference scripts) instead of its mean", True)
    proportion_empty_prompts: float = _h("probability of training an example with an empty caption "
                                         "(Salesforce DiffusionDPO default 0.2; diffusers 0)", 0.0)
    sdxl_time_ids: Literal["from_image", "fixed"] = _h(
        "sdxl: time_ids from each image's original size and crop (diffusers SDXL script) or fixed "
        "(res, res, 0, 0, res, res) (Salesforce)", "from_image")
    max_sequence_length: int = _h("sd3: T5 sequence length (zeros stand in when T5 is not loaded)", 256)
    load_t5: bool = _h("sd3: load text_encoder_3 (T5-XXL); off: zeros, as the SD3 pipeline allows", False)
    vae_dtype: Literal["float32", "bfloat16", "float16"] = _h("VAE weights dtype (fp32 avoids SDXL VAE NaNs)",
                                                              "float32")
    cache_latents: bool = _h("encode every image once with the VAE and reuse the cached posterior", False)
    cache_text_embeddings: bool = _h("encode every caption once and reuse the cached embeddings", False)
    cache_dir: str | None = _h("where cached latents/embeddings live (default: <output_dir>/diffusion_cache)", None)
    cache_batch_size: int = _h("images/captions per forward when filling the caches", 8)

    @staticmethod
    def tiny_problems(tiny: dict[str, Any]) -> list[str]:
        """``model.tiny`` of a tiny diffusion model (read by :func:`mmalign.models.diffusion_tiny.
        build_tiny_components`): known keys, sizes >= 1, widths the UNet's and the VAE's group norms divide
        (groups: min(4, min(channels)) and min(channels)) and the two attention heads split evenly."""
        errs = [f"model.tiny.{k}: unknown key for a tiny diffusion model; allowed: {sorted(TINY_SIZES)}"
                for k in tiny if k not in TINY_SIZES]
        for key, (low, what) in TINY_SIZES.items():
            if key not in tiny:
                continue
            value = tiny[key]
            items = value if key == "channels" and isinstance(value, (list, tuple)) else [value]
            if (key == "channels" and len(items) != 2) or any(
                    isinstance(v, bool) or not isinstance(v, int) or v < low for v in items):
                errs.append(f"model.tiny.{key}={value!r}: must be {what}")
        chans = tiny.get("channels")
        if not errs and chans is not None:
            groups = {min(4, min(chans)), min(chans)}
            if any(c % g for c in chans for g in groups):
                errs.append(f"model.tiny.channels={list(chans)}: each width must be divisible by the smallest one "
                            "and by min(4, smallest) (group norms), e.g. [16, 32]")
        if not errs and tiny.get("text_hidden", 16) % 2:
            errs.append(f"model.tiny.text_hidden={tiny['text_hidden']}: must be even (2 attention heads), e.g. 32")
        return errs

    def validate(self) -> list[str]:
        errs = []
        if self.resolution < 8 or self.resolution % 8:
            errs.append(f"resolution={self.resolution} must be a positive multiple of 8")
        if self.random_flip and self.cache_latents:
            errs.append("random_flip=true cannot be combined with cache_latents=true (cached latents are unflipped)")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            errs.append(f"proportion_empty_prompts={self.proportion_empty_prompts} must lie in [0, 1]")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            errs.append("zero_terminal_snr=true with prediction_type=epsilon: at zero SNR the noise cannot be "
                        "predicted from pure noise; use v_prediction or sample (Lin et al. §3.2)")
        if self.min_timestep < 0:
            errs.append(f"min_timestep={self.min_timestep} must be >= 0")
        if self.max_timestep is not None and self.max_timestep <= self.min_timestep:
            errs.append(f"max_timestep={self.max_timestep} must be > min_timestep={self.min_timestep}")
        if self.logit_std <= 0:
            errs.append(f"logit_std={self.logit_std} must be > 0")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            errs.append(f"snr_gamma={self.snr_gamma} must be > 0 (or null)")
        if self.max_sequence_length < 1:
            errs.append(f"max_sequence_length={self.max_sequence_length} must be >= 1")
        if self.cache_batch_size < 1:
            errs.append(f"cache_batch_size={self.cache_batch_size} must be >= 1")
        return errs
