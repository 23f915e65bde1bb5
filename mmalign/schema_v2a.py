"""The ``v2a:`` section of a run config (used when ``modality: v2a``): a video-to-audio flow-matching generator.

The checkpoint is ``model.name_or_path``: ``tiny`` builds random tiny components whose audio and video settings are
the fields below (sizes: ``model.tiny``); any other value is a directory written by a v2a run (or laid out the same
way: ``v2a_config.json``, ``transformer/``, ``conditioner/``, ``audio_vae/`` + ``vocoder/``, ``frame_encoder/``),
whose own recorded sample rate, mel settings, latent shape and frame settings are used (the
audio/video fields here then only describe tiny models).
β is ``loss.kwargs.beta``, read in ``v2a.beta_convention`` exactly as for ``modality: diffusion``
(:mod:`mmalign.schema_diffusion`). Sequence lengths follow MMAudio (research/video_audio_clip_prior.md §2.4):
``duration``·``fps`` conditioning frames, and one latent per mel frame (``latent: mel``) or per two mel frames
(``latent: vae``, MMAudio's VAE downsamples by 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def _h(text: str, default: Any = None, factory: Any = None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


MEL_KEYS = ("n_fft", "hop_length", "win_length", "n_mels", "f_min", "f_max")
TINY_KEYS = ("hidden", "layers", "heads", "cond_dim", "latent_channels", "vae_hidden", "vocoder_channels",
             "clip_hidden", "clip_image_size")


@dataclass
class V2AConfig:
    """Video-to-audio generation (MMAudio-style conditional flow matching; arXiv 2412.15322, 2509.19999)."""

    latent: Literal["mel", "vae"] = _h(
        "tiny models: what the flow runs on — mel (normalised log-mel, decoded by Griffin-Lim) or vae (diffusers "
        "MMAudioVAE latents, decoded by MMAudioVocoder); a checkpoint directory records its own", "mel")
    sample_rate: int = _h("audio sample rate the generator works at (MMAudio: 16000 or 44100)", 16000)
    duration: float = _h("clip length in seconds (MMAudio: 8)", 8.0)
    mel_preset: str = _h("mel settings (mmalign.data.audio.MEL_PRESETS: mmaudio_16k, mmaudio_44k, ...)", "mmaudio_16k")
    mel: dict[str, Any] = _h(f"overrides of the preset's fields ({', '.join(MEL_KEYS)}); tiny runs use smaller ones",
                             factory=dict)
    fps: float = _h("video frames per second fed to the conditioner (MMAudio's CLIP stream: 8)", 8.0)
    frame_size: int = _h("frames are resized to this square size before the frame encoder (CLIP: its image size)",
                         224)
    frame_encoder: Literal["clip", "pixels"] = _h(
        "per-frame video features: a frozen CLIP vision tower (transformers CLIPVisionModelWithProjection), or the "
        "resized frame's pixels flattened (no weights; the tiny default)", "pixels")
    frame_encoder_path: str | None = _h("CLIP vision directory for a tiny denoiser (null: a tiny random tower)", None)
    null_condition_probability: float = _h(
        "probability that an example is trained with the learned null condition (classifier-free guidance "
        "dropout; MMAudio 0.1 [recalled, unverified])", 0.1)
    beta_convention: Literal["original", "diffusers"] = _h(
        "how loss.kwargs.beta is read (as diffusion.beta_convention): original = −log σ(−β/2·Δ)", "original")
    noise: Literal["per_epoch", "fixed"] = _h(
        "per_epoch: fresh shared noise/time per example each epoch; fixed: the same every epoch (needed by "
        "reference.strategy=precomputed)", "per_epoch")
    weighting_scheme: Literal["logit_normal", "uniform", "mode"] = _h(
        "density of the flow time (MMAudio: logit-normal(0, 1))", "logit_normal")
    logit_mean: float = _h("logit-normal mean", 0.0)
    logit_std: float = _h("logit-normal std", 1.0)
    vae_sample: bool = _h("latent: vae — a posterior sample (MMAudio) instead of its mean", True)
    resample: bool = _h("resample audio at another rate to sample_rate (false: such a file is a data error)", False)
    downmix: bool = _h("average multi-channel audio to mono (false: such a file is a data error)", False)
    min_rms: float = _h("audio quieter than this RMS is a bad row (silent)", 1e-4)
    max_clipped: float = _h("audio with more than this fraction of samples at |x| >= 0.999 is a bad row (clipped)",
                            0.01)
    video_backend: Literal["auto", "decord", "av"] = _h("video decoder (mmalign.data.video)", "auto")
    check_media: bool = _h("open every video and audio file when the data is loaded, so bad ones are reported (or "
                           "skipped with data.skip_bad_rows) before training", True)
    steps: int = _h("sampling: Euler steps from noise (t=0) to data (t=1) (MMAudio: 25)", 25)
    guidance_scale: float = _h("sampling: classifier-free guidance scale with the learned null condition "
                               "(MMAudio cfg_strength 4.5)", 4.5)

    @staticmethod
    def tiny_problems(tiny: dict[str, Any]) -> list[str]:
        """``model.tiny`` of a tiny v2a model (read by :func:`mmalign.models.v2a.build_tiny_v2a`): known keys, ints
        >= 1, and a DiT width the heads divide."""
        errs = [f"model.tiny.{k}: unknown key for a tiny v2a model; allowed: {list(TINY_KEYS)}"
                for k in tiny if k not in TINY_KEYS]
        errs += [f"model.tiny.{k}={v!r}: must be an int >= 1" for k, v in tiny.items()
                 if k in TINY_KEYS and (isinstance(v, bool) or not isinstance(v, int) or v < 1)]
        if not errs and tiny.get("hidden", 32) % tiny.get("heads", 2):
            errs.append(f"model.tiny.hidden={tiny.get('hidden', 32)} must be divisible by heads={tiny.get('heads', 2)}")
        return errs

    def validate(self) -> list[str]:
        errs = []
        if self.sample_rate < 1:
            errs.append(f"sample_rate={self.sample_rate} must be >= 1")
        if not 0 < self.duration <= 3600:  # also refuses nan and inf (int(inf * fps) below would overflow)
            errs.append(f"duration={self.duration} must lie in (0, 3600] seconds")
        if not 0 < self.fps <= 1000:
            errs.append(f"fps={self.fps} must lie in (0, 1000]")
        elif 0 < self.duration <= 3600 and int(self.duration * self.fps + 1e-9) < 1:
            errs.append(f"duration={self.duration} s at fps={self.fps} gives no conditioning frame")
        bad = sorted(set(self.mel) - set(MEL_KEYS))
        if bad:
            errs.append(f"mel has unknown keys {bad}; allowed: {list(MEL_KEYS)}")
        if self.frame_size < 2 or self.frame_size % 2:
            errs.append(f"frame_size={self.frame_size} must be an even number >= 2")
        if not 0.0 <= self.null_condition_probability < 1.0:
            errs.append(f"null_condition_probability={self.null_condition_probability} must lie in [0, 1)")
        if self.logit_std <= 0:
            errs.append(f"logit_std={self.logit_std} must be > 0")
        if self.min_rms < 0:
            errs.append(f"min_rms={self.min_rms} must be >= 0")
        if not 0.0 < self.max_clipped <= 1.0:
            errs.append(f"max_clipped={self.max_clipped} must lie in (0, 1]")
        if self.steps < 1:
            errs.append(f"steps={self.steps} must be >= 1")
        if self.frame_encoder_path is not None and self.frame_encoder != "clip":
            errs.append("frame_encoder_path is a CLIP vision directory: set frame_encoder=clip")
        return errs
