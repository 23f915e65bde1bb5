"""The video-to-audio generator: an MMAudio-style conditional flow-matching model built from diffusers' audio classes.

MultiSoundGen's backbone is "MM-DiT trained with a CFM objective" and MMAudio (arXiv 2412.15322) is the public base
(research/video_audio_clip_prior.md §2.2, §2.5). diffusers 0.42.1 ships MMAudio's mel VAE (``MMAudioVAE``) and
BigVGAN vocoder (``MMAudioVocoder``) but not its MM-DiT, so the denoiser here is diffusers'
``LongCatAudioDiTTransformer``: an audio DiT with adaLN time conditioning, RoPE and cross-attention to a condition
sequence, trained in MMAudio's own flow convention (``x_t = (1−t)·noise + t·x1``, velocity ``x1 − noise``, t ∈
[0, 1]; the LongCat pipeline samples the same way). Parts:

- :class:`V2AConditioner` (``conditioner/``): per-frame video features → condition tokens through a small MLP, with
  a **learned null feature** standing in for the video under classifier-free guidance (MMAudio's ``empty_clip_feat``:
  a learnable ``[1, clip_dim]`` input feature, zero-initialised [recalled, unverified]). Deviation: MMAudio aligns
  its 8 fps CLIP tokens with the audio latents by scaling RoPE positions; here each frame token is repeated to the
  latent length (nearest frame), so LongCat's RoPE (same position = same time) aligns them.
- :class:`V2ADenoiser`: transformer + conditioner, the trainable module (full or LoRA).
- frame features: a frozen ``transformers.CLIPVisionModelWithProjection`` (MMAudio uses CLIP at 8 fps) or, with
  ``frame_encoder: pixels``, the resized frame's pixels (no weights: a tiny random CLIP tower would only add noise
  to the synthetic data's brightness/colour code).
- latents: ``vae`` = ``MMAudioVAE`` posterior × ``scaling_factor``, decoded by ``MMAudioVocoder``; ``mel`` = the
  log-mel spectrogram itself, standardised by fixed constants ``(mel − mel_mean)/mel_std``, decoded by inverse mel
  filtering + Griffin-Lim (torchaudio). The ``mel`` path exists for the **tiny** setting: a random tiny VAE + vocoder
  turn any latent into noise, so a tiny model trained on synthetic tones could never be heard or ranked; Griffin-Lim
  reconstructs the tones from a trained tiny model's mel. Real checkpoints use ``vae``.

Everything a sampler or a loader must know (sample rate, mel settings, latent kind and shape, frame rate, frame size
and encoder) is the :class:`V2ASpec` saved as ``v2a_config.json`` beside the weights (:func:`save_v2a`,
:func:`load_v2a`); the components load with their diffusers/transformers ``from_pretrained``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, LongCatAudioDiTTransformer, MMAudioVAE, MMAudioVocoder, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from ..data.audio import MelConfig, SequenceConfig, mel_spectrogram

__all__ = ["CONFIG_NAME", "V2AComponents", "V2AConditioner", "V2ADenoiser", "V2ASpec", "build_tiny_v2a", "load_v2a",
           "save_v2a"]

CONFIG_NAME = "v2a_config.json"
FORMAT = "mmalign-v2a/1"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP preprocessing
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class V2ASpec:
    """What the weights mean: audio format, mel settings, latent kind/shape, video sampling (saved with them)."""

    latent: str  # "mel" | "vae"
    sample_rate: int
    duration: float
    mel: dict  # MelConfig fields
    fps: float
    frame_size: int
    frame_encoder: str  # "pixels" | "clip"
    feature_dim: int
    latent_channels: int
    mel_mean: float = -4.0  # mel latents: (log-mel − mean) / std; ln(1e-5) = −11.5 (silence) maps to about −1.9
    mel_std: float = 4.0

    @property
    def mel_config(self) -> MelConfig:
        return MelConfig(**self.mel)

    @property
    def sequence(self) -> SequenceConfig:
        return SequenceConfig(self.duration, self.sample_rate, self.mel["hop_length"],
                              latent_downsample=2 if self.latent == "vae" else 1, clip_fps=self.fps)

    @property
    def num_samples(self) -> int:
        return self.sequence.num_audio_samples

    @property
    def num_frames(self) -> int:
        return self.sequence.clip_seq_len

    @property
    def latent_shape(self) -> tuple[int, int]:
        """``(channels, length)`` of one clip's latents."""
        return self.latent_channels, self.sequence.latent_seq_len

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict, path: str = "") -> V2ASpec:
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: not an mmalign v2a config (format {data.get('format')!r}, expected {FORMAT!r})")
        return cls(**{k: v for k, v in data.items() if k != "format"})


class V2AConditioner(ModelMixin, ConfigMixin):
    """Video features ``[N, T, F]`` → condition tokens ``[N, L, D]`` (repeated to the latent length L), with a
    learned null feature for classifier-free guidance."""

    @register_to_config
    def __init__(self, feature_dim: int, cond_dim: int):
        super().__init__()
        self.null_feature = nn.Parameter(torch.zeros(1, feature_dim))
        self.proj = nn.Sequential(nn.Linear(feature_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, features: Tensor, null: Tensor | None, length: int) -> Tensor:
        """``null [N]`` bool: rows that get the null condition (the whole video replaced, as in MMAudio)."""
        x = features.to(self.null_feature.dtype)
        if null is not None:
            x = torch.where(null.view(-1, 1, 1).to(x.device), self.null_feature.expand_as(x), x)
        tokens = self.proj(x)  # [N, T, D]; no input norm: a LayerNorm would erase a constant null feature
        idx = (torch.arange(length, device=x.device) * tokens.shape[1]) // length  # frame of each latent position
        return tokens[:, idx]


class V2ADenoiser(nn.Module):
    """The trainable generator: ``(x_t [N, C, L], t [N] ∈ [0, 1], features [N, T, F], null [N]) → velocity``
    ``[N, C, L]`` towards the data (MMAudio's ``x1 − x0``)."""

    def __init__(self, transformer: LongCatAudioDiTTransformer, conditioner: V2AConditioner):
        super().__init__()
        self.transformer, self.conditioner = transformer, conditioner

    @property
    def config(self):  # PEFT reads model.config
        return self.transformer.config

    def forward(self, hidden_states: Tensor, timestep: Tensor, features: Tensor, null: Tensor | None = None
                ) -> Tensor:
        dtype = self.transformer.dtype
        x = hidden_states.to(dtype).transpose(1, 2)  # LongCat works on [N, L, C]
        cond = self.conditioner(features, null, x.shape[1]).to(dtype)
        mask = torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device)
        out = self.transformer(hidden_states=x, encoder_hidden_states=cond, encoder_attention_mask=mask,
                               timestep=timestep.to(dtype), return_dict=False)[0]
        return out.transpose(1, 2)


@dataclass
class V2AComponents:
    """The generator and its frozen parts. ``vae``/``vocoder`` only for ``spec.latent == "vae"``, ``frame_encoder``
    only for ``spec.frame_encoder == "clip"``; ``source`` is ``"tiny"`` or the directory it was loaded from."""

    spec: V2ASpec
    denoiser: V2ADenoiser
    vae: MMAudioVAE | None = None
    vocoder: MMAudioVocoder | None = None
    frame_encoder: nn.Module | None = None
    source: str = "tiny"
    _griffin: dict = field(default_factory=dict, repr=False)

    def frozen(self) -> list[nn.Module]:
        return [m for m in (self.vae, self.vocoder, self.frame_encoder) if m is not None]

    def to(self, device) -> V2AComponents:
        for m in [self.denoiser, *self.frozen()]:
            m.to(device)
        return self

    # -- audio ↔ latents ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_audio(self, wave: Tensor) -> Tensor:
        """``[N, S]`` waves → ``[N, 2C, L]`` VAE posterior parameters (mean ‖ logvar), or ``[N, C, L]`` mel latents."""
        s = self.spec
        if s.latent == "vae":
            return self.vae.encode(wave.to(self.vae.device, self.vae.dtype)).latent_dist.parameters.float()
        mel = mel_spectrogram(wave.float(), s.mel_config)
        return (mel - s.mel_mean) / s.mel_std

    def latents(self, params: Tensor, noise: Tensor | None = None) -> Tensor:
        """Flow targets x1 ``[N, C, L]`` from :meth:`encode_audio`'s output; ``noise``: the posterior draw (VAE)."""
        if self.spec.latent != "vae":
            return params.float()
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(params.float())
        z = dist.mean if noise is None else dist.mean + dist.std * noise.to(params)
        return z * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """``[N, C, L]`` latents → ``[N, S]`` waves in [-1, 1] of ``spec.num_samples`` samples."""
        s = self.spec
        if s.latent == "vae":
            mel = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
            wave = self.vocoder(mel.to(self.vocoder.dtype)).sample[:, 0]
        else:
            wave = self._griffin_lim(latents.float() * s.mel_std + s.mel_mean)
        n = s.num_samples
        wave = wave[..., :n] if wave.shape[-1] >= n else F.pad(wave, (0, n - wave.shape[-1]))
        return wave.float().clamp(-1.0, 1.0)

    def _griffin_lim(self, log_mel: Tensor) -> Tensor:
        # Inverse of mel_spectrogram: exp, least-squares inverse filterbank, Griffin-Lim phase (torchaudio). The
        # "hifigan" reflect padding is not undone: the wave is offset by at most hop/2 samples.
        import torchaudio.transforms as T

        m = self.spec.mel_config
        key = str(log_mel.device)
        if key not in self._griffin:
            inv = T.InverseMelScale(n_stft=m.n_fft // 2 + 1, n_mels=m.n_mels, sample_rate=m.sample_rate,
                                    f_min=m.f_min, f_max=m.f_max, norm=m.norm, mel_scale=m.mel_scale)
            gl = T.GriffinLim(n_fft=m.n_fft, win_length=m.win_length, hop_length=m.hop_length, power=m.power,
                              n_iter=32, rand_init=False)  # zero initial phase: a seed fixes the wave
            self._griffin[key] = (inv.to(log_mel.device), gl.to(log_mel.device))
        inv, gl = self._griffin[key]
        return gl(inv(log_mel.exp()))

    # -- video -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_frames(self, frames: Tensor) -> Tensor:
        """uint8 frames ``[N, T, H, W, 3]`` → features ``[N, T, feature_dim]``."""
        n, t = frames.shape[:2]
        x = frames.flatten(0, 1).permute(0, 3, 1, 2).float() / 255.0  # [N·T, 3, H, W] in [0, 1]
        if self.spec.frame_encoder == "pixels":
            x = F.interpolate(x, size=(self.spec.frame_size,) * 2, mode="area")
            return (x * 2 - 1).reshape(n, t, -1)
        enc = self.frame_encoder
        x = F.interpolate(x, size=(enc.config.image_size,) * 2, mode="bicubic", align_corners=False).clamp(0, 1)
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
        x = ((x - mean) / std).to(enc.device, enc.dtype)
        return enc(pixel_values=x).image_embeds.float().reshape(n, t, -1)


# ------------------------------------------------------------------------------------------------ build / save


def tiny_frame_encoder(image_size: int = 16, hidden: int = 16, seed: int = 0) -> nn.Module:
    """A random tiny CLIP vision tower (transformers' real class) for CPU tests."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                           num_attention_heads=2, image_size=image_size, patch_size=max(2, image_size // 2),
                           projection_dim=hidden)
    return CLIPVisionModelWithProjection(cfg).eval()


def build_tiny_v2a(*, latent: str = "mel", sample_rate: int = 8000, duration: float = 1.0, mel: MelConfig,
                   fps: float = 8.0, frame_size: int = 8, frame_encoder: str = "pixels", frame_encoder_path=None,
                   hidden: int = 32, layers: int = 2, heads: int = 2, cond_dim: int = 32, latent_channels: int = 8,
                   vae_hidden: int = 8, vocoder_channels: int = 16, clip_hidden: int = 16, clip_image_size: int = 16,
                   seed: int = 0) -> V2AComponents:
    """Random components of the real classes; any size (tiny for CPU tests, MMAudio-small shapes for configs).

    ``vae``: ``MMAudioVAE`` over ``mel`` (its n_fft/hop/n_mels) and an ``MMAudioVocoder`` whose upsampling product is
    the hop (factors of 2 and 4/8 as in BigVGAN); ``mel``: the latents are the ``mel.n_mels`` mel bins."""
    if latent not in ("mel", "vae"):
        raise ValueError(f"latent={latent!r} must be 'mel' or 'vae'")
    if mel.sample_rate != sample_rate:
        raise ValueError(f"mel sample_rate {mel.sample_rate} != sample_rate {sample_rate}")
    torch.manual_seed(seed)
    vae = vocoder = enc = None
    if latent == "vae":
        vae = MMAudioVAE(mel_bins=mel.n_mels, latent_channels=latent_channels, hidden_channels=vae_hidden,
                         channel_multipliers=(1, 2), layers_per_block=1, sample_rate=sample_rate, n_fft=mel.n_fft,
                         hop_length=mel.hop_length, scaling_factor=1.0)
        rates = _upsample_rates(mel.hop_length)
        vocoder = MMAudioVocoder(num_mels=mel.n_mels, upsample_initial_channel=vocoder_channels,
                                 upsample_rates=rates, upsample_kernel_sizes=tuple(2 * r for r in rates),
                                 resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1,),))
    else:
        latent_channels = mel.n_mels
    if frame_encoder == "clip":
        if frame_encoder_path:
            from transformers import CLIPVisionModelWithProjection

            enc = CLIPVisionModelWithProjection.from_pretrained(frame_encoder_path).eval()
        else:
            enc = tiny_frame_encoder(clip_image_size, clip_hidden, seed)
        feature_dim = enc.config.projection_dim
    elif frame_encoder == "pixels":
        feature_dim = 3 * frame_size * frame_size
    else:
        raise ValueError(f"frame_encoder={frame_encoder!r} must be 'pixels' or 'clip'")
    transformer = LongCatAudioDiTTransformer(dit_dim=hidden, dit_depth=layers, dit_heads=heads, dit_text_dim=cond_dim,
                                             latent_dim=latent_channels, text_conv=False, use_latent_condition=False)
    spec = V2ASpec(latent, sample_rate, float(duration), asdict(mel), float(fps), frame_size, frame_encoder,
                   feature_dim, latent_channels)
    spec.sequence  # noqa: B018 -- validates duration / rates now, not at the first batch
    denoiser = V2ADenoiser(transformer, V2AConditioner(feature_dim, cond_dim))
    return V2AComponents(spec, denoiser, vae, vocoder, enc, "tiny")


def _upsample_rates(hop: int) -> tuple[int, ...]:
    """Vocoder upsampling factors whose product is ``hop`` (largest first, as BigVGAN's)."""
    rates, rest = [], hop
    for r in (8, 4, 2):
        while rest % r == 0 and rest >= r:
            rates.append(r)
            rest //= r
    if rest != 1 or not rates:
        raise ValueError(f"hop_length={hop} must be a power of two >= 2 for a built vocoder")
    return tuple(rates)


def save_v2a(components: V2AComponents, path: str | os.PathLike, denoiser: V2ADenoiser | None = None,
             info: dict | None = None) -> Path:
    """Write ``v2a_config.json`` (the :class:`V2ASpec` + ``info``), ``transformer/``, ``conditioner/`` and the
    frozen parts (``audio_vae/``, ``vocoder/``, ``frame_encoder/``) with ``save_pretrained``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    net = denoiser if denoiser is not None else components.denoiser
    net.transformer.save_pretrained(path / "transformer")
    net.conditioner.save_pretrained(path / "conditioner")
    for name, module in (("audio_vae", components.vae), ("vocoder", components.vocoder),
                         ("frame_encoder", components.frame_encoder)):
        if module is not None:
            module.save_pretrained(path / name)
    data = components.spec.to_json()
    if info:
        data["info"] = info
    (path / CONFIG_NAME).write_text(json.dumps(data, indent=1))
    return path


def load_v2a(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> V2AComponents:
    """Components of a directory written by :func:`save_v2a` (each part with its class's ``from_pretrained``)."""
    path = Path(path).expanduser()
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        what = "does not exist" if not path.exists() else f"has no {CONFIG_NAME}"
        raise FileNotFoundError(f"{path} {what}: a v2a model directory holds {CONFIG_NAME}, transformer/ and "
                                "conditioner/ (written by a v2a run's final/ or mmalign.models.v2a.save_v2a)")
    data = json.loads(cfg_file.read_text())
    spec = V2ASpec.from_json({k: v for k, v in data.items() if k != "info"}, str(cfg_file))
    transformer = LongCatAudioDiTTransformer.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
    conditioner = V2AConditioner.from_pretrained(path, subfolder="conditioner", torch_dtype=dtype)
    vae = vocoder = enc = None
    if spec.latent == "vae":
        vae = MMAudioVAE.from_pretrained(path, subfolder="audio_vae")
        vocoder = MMAudioVocoder.from_pretrained(path, subfolder="vocoder")
        _check_vae(spec, vae, path)
    if spec.frame_encoder == "clip":
        from transformers import CLIPVisionModelWithProjection

        enc = CLIPVisionModelWithProjection.from_pretrained(path / "frame_encoder").eval()
    return V2AComponents(spec, V2ADenoiser(transformer, conditioner), vae, vocoder, enc, str(path))


def _check_vae(spec: V2ASpec, vae: MMAudioVAE, path: Path) -> None:
    c, m = vae.config, spec.mel
    got = (c.sample_rate, c.n_fft, c.hop_length, c.mel_bins, c.latent_channels)
    want = (spec.sample_rate, m["n_fft"], m["hop_length"], m["n_mels"], spec.latent_channels)
    if got != want:
        raise ValueError(f"{path}/audio_vae (sample_rate, n_fft, hop, mel_bins, latent_channels) = {got} does not "
                         f"match {CONFIG_NAME}'s {want}")


def with_spec(components: V2AComponents, **changes) -> V2AComponents:
    """A copy whose spec has ``changes`` (e.g. a longer ``duration`` to sample; the weights do not depend on it)."""
    spec = replace(components.spec, **changes)
    if not math.isfinite(spec.duration):
        raise ValueError(f"duration={spec.duration} must be finite")
    return replace(components, spec=spec, _griffin={})
