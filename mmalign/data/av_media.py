"""Media settings and preprocessing of the SF-CAVP-style audio-visual model (``modality: av``).

MultiSoundGen (Yang et al., arXiv 2509.19999) names a slow (semantic) and a fast (dynamic) stream per modality but
publishes no code, frame rates or mel settings (research/video_audio_clip_prior.md §2.1); what is here is the
**MultiSoundGen-style** design of §2.2, with Diff-Foley's CAVP (arXiv 2306.17203) as the loss reference (§2.3):

- one clip = ``clip_seconds`` of video and the audio of the same interval;
- slow stream: ``round(clip_seconds·slow_fps)`` frames at ``image_size`` px, normalised with the image tower's
  mean/std (CLIP's by default);
- fast stream: ``round(clip_seconds·fast_fps)`` frames at ``fast_image_size`` px in [0, 1]; the audio's log-mel
  frames are pooled by the model onto the same time grid (one embedding per fast video frame);
- frame *i* of a stream sits at the centre of its interval, ``start + (i + ½)/fps``, and is read from video frame
  ``floor(t·video_fps)`` (nearest earlier decoded frame).

Every setting is stored in the saved model's config (:class:`AVMedia` ``to_dict``), so data, training, evaluation
and the reward function (:func:`mmalign.adapters.av.cavp_scores`) always agree on sample rate, mel and fps — the
§2.7 pitfall of components that silently differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError
from .audio import MEL_PRESETS, MelConfig, mel_spectrogram

__all__ = ["AVMedia", "CLIP_MEAN", "CLIP_STD", "TINY_MEL", "frame_indices", "prepare_frames", "stream_times"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# A small 16 kHz mel for tiny CPU models (10 ms hop, 32 bands); the real configs use MEL_PRESETS["diff_foley_16k"].
TINY_MEL = MelConfig(16000, 512, 160, 400, 32, 0.0, 8000.0, power=1.0, log="ln")


@dataclass(frozen=True)
class AVMedia:
    """Sample rate, mel, clip length, frame rates and image sizes of one SF-CAVP model (see the module docstring)."""

    sample_rate: int = 16000
    mel: MelConfig = TINY_MEL
    clip_seconds: float = 1.0
    slow_fps: float = 4.0
    fast_fps: float = 16.0
    image_size: int = 32
    fast_image_size: int = 16
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        errors = []
        if self.mel.sample_rate != self.sample_rate:
            errors.append(f"mel.sample_rate={self.mel.sample_rate} differs from sample_rate={self.sample_rate}; "
                          "fix: use one rate for both")
        for name in ("clip_seconds", "slow_fps", "fast_fps"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                errors.append(f"{name}={v!r} must be a finite number > 0")
        for name in ("image_size", "fast_image_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 8:
                errors.append(f"{name}={v!r} must be an int >= 8 (pixels)")
        if errors:
            raise ConfigError(errors)
        if self.num_slow < 1 or self.num_fast < 1:
            errors.append(f"clip_seconds={self.clip_seconds} gives {self.num_slow} slow and {self.num_fast} fast "
                          "frames; both need >= 1 (raise clip_seconds or the fps)")
        elif self.num_mel_frames < self.num_fast:
            errors.append(f"{self.num_mel_frames} mel frames per clip cannot be pooled onto {self.num_fast} fast "
                          f"steps; fix: a smaller mel hop_length or a lower fast_fps")
        if errors:
            raise ConfigError(errors)

    # -- derived sizes -------------------------------------------------------------------------------------------
    @property
    def num_slow(self) -> int:
        return round(self.clip_seconds * self.slow_fps)

    @property
    def num_fast(self) -> int:
        return round(self.clip_seconds * self.fast_fps)

    @property
    def num_samples(self) -> int:
        return round(self.clip_seconds * self.sample_rate)

    @property
    def num_mel_frames(self) -> int:
        return self.mel.num_frames(self.num_samples)

    # -- (de)serialisation (the saved model's config) ------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["mel"] = asdict(self.mel)
        out["image_mean"], out["image_std"] = list(self.image_mean), list(self.image_std)
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> AVMedia:
        d = dict(d)
        mel = d.pop("mel", TINY_MEL)
        if isinstance(mel, str):
            if mel not in MEL_PRESETS:
                raise ConfigError(f"mel={mel!r} is not a preset; valid: {sorted(MEL_PRESETS)}")
            mel = MEL_PRESETS[mel]
        elif isinstance(mel, Mapping):
            mel = MelConfig(**mel)
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ConfigError(f"unknown media keys {unknown}; valid: {sorted(valid)}")
        for k in ("image_mean", "image_std"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        return cls(mel=mel, **d)

    # -- preprocessing ---------------------------------------------------------------------------------------------
    def mel_of(self, wave: Tensor) -> Tensor:
        """Log-mel ``[..., n_mels, num_mel_frames]`` of waves ``[..., num_samples]`` (cropped / zero-padded to the
        clip length first, so a generated candidate of slightly different length still fits the tower)."""
        n = self.num_samples
        x = wave[..., :n] if wave.shape[-1] >= n else F.pad(wave, (0, n - wave.shape[-1]))
        return mel_spectrogram(x, self.mel)

    def slow_pixels(self, frames: Tensor) -> Tensor:
        return prepare_frames(frames, self.image_size, self.image_mean, self.image_std)

    def fast_pixels(self, frames: Tensor) -> Tensor:
        return prepare_frames(frames, self.fast_image_size, None, None)


def stream_times(start: float, seconds: float, fps: float, n: int | None = None) -> list[float]:
    """Centres of the ``n = round(seconds·fps)`` frame intervals of a stream starting at ``start`` (seconds)."""
    n = round(seconds * fps) if n is None else n
    return [start + (i + 0.5) / fps for i in range(n)]


def frame_indices(times: list[float], video_fps: float, num_frames: int) -> list[int]:
    """Video frame shown at each time: ``floor(t·video_fps)``, clamped to ``[0, num_frames − 1]``."""
    return [min(num_frames - 1, max(0, math.floor(t * video_fps + 1e-9))) for t in times]


def prepare_frames(frames: Tensor, size: int, mean, std) -> Tensor:
    """uint8 ``[..., T, H, W, 3]`` → float ``[..., T, 3, size, size]``: bilinear resize (antialiased), scaled to
    [0, 1], then ``(x − mean)/std`` when ``mean`` is given (the image tower's normalisation)."""
    if frames.dtype != torch.uint8 or frames.shape[-1] != 3 or frames.dim() < 4:
        raise ValueError(f"frames must be uint8 [..., T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    lead = frames.shape[:-3]
    x = frames.reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if mean is not None:
        m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x - m) / s
    return x.reshape(*lead, 3, size, size)
