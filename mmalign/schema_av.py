"""The ``av:`` section of a run config (``modality: av``): the SF-CAVP-style audio-visual model and its clips.

Model and media keys build a **new** model (``model.name_or_path: tiny`` or ``new``); a saved SF-CAVP directory
carries its own media settings (sample rate, mel, fps, sizes), which then win (differing keys here are reported as
a warning). Loss weights live in ``loss.kwargs`` (``loss.name: cavp``; :mod:`mmalign.methods.av_losses`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def _h(text: str, default: Any = None, factory: Any = None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


# Keys that describe the media (stored in the saved model) rather than the run.
MEDIA_KEYS = ("sample_rate", "mel", "clip_seconds", "slow_fps", "fast_fps", "image_size", "fast_image_size",
              "image_mean", "image_std")


@dataclass
class AVConfig:
    """Slow/fast audio-visual contrastive model (MultiSoundGen-style SF-CAVP, arXiv 2509.19999; CAVP losses of
    Diff-Foley, arXiv 2306.17203)."""

    vision_tower: str = _h("slow image tower: a preset (tiny-vision, clip-vit-b16: random init) or a CLIP / "
                           "SigLIP checkpoint (directory or hub id) whose vision tower is loaded", "tiny-vision")
    audio_tower: str = _h("slow audio tower: a preset (tiny-audio, ast-base: random init) or an ASTModel "
                          "directory whose max_length / num_mel_bins match one clip's mel", "tiny-audio")
    embed_dim: int = _h("width of the slow and fast embeddings", 32)
    fast_channels: int = _h("channels of the fast streams' conv encoders and temporal heads", 32)
    fast_layers: int = _h("residual 1-D conv blocks of each fast temporal head", 2)
    fast_kernel: int = _h("kernel size (time steps) of the fast streams' 1-D convs (odd)", 3)
    sample_rate: int = _h("audio sample rate of the model (Hz)", 16000)
    mel: str | dict[str, Any] = _h("log-mel: 'tiny' (512/160/32 bands), a preset of mmalign.data.audio.MEL_PRESETS "
                                   "(diff_foley_16k, mmaudio_16k, mmaudio_44k) or a dict of MelConfig fields", "tiny")
    clip_seconds: float = _h("length of one clip (s)", 1.0)
    slow_fps: float = _h("frame rate of the slow (semantic) video stream", 4.0)
    fast_fps: float = _h("frame rate of the fast (dynamic) video stream; the audio is pooled to this grid", 16.0)
    image_size: int = _h("slow stream image size (the tower's)", 32)
    fast_image_size: int = _h("fast stream image size", 16)
    image_mean: list[float] | None = _h("slow stream normalisation mean (null: CLIP's; SigLIP: [0.5, 0.5, 0.5])")
    image_std: list[float] | None = _h("slow stream normalisation std (null: CLIP's; SigLIP: [0.5, 0.5, 0.5])")
    clips_per_video: int = _h("time-shifted clips cut from each video (Diff-Foley --intra_clip_num: 3)", 3)
    min_shift: float = _h("smallest gap between two clips' starts (s)", 0.25)
    random_starts: bool = _h("draw clip starts per video from (run.seed, index) (else evenly spread)", True)
    media_root: str | None = _h("folder relative media paths start from (default: the data file's folder)")
    convert_audio: bool = _h("resample audio at another rate and average multi-channel audio to mono (counted "
                             "in the data stats); false: refuse such files", True)
    check_media: bool = _h("decode every audio file when the data is loaded (silent / clipped / short files "
                           "become row errors or counted skips with data.skip_bad_rows)", True)
    silence_peak: float = _h("audio whose peak |sample| is below this is silent (a bad row)", 1e-3)
    max_clipped: float = _h("audio with more than this fraction of samples at full scale is clipped (a bad row)",
                            0.01)
    gather_with_grad: bool = _h("multi-process: all-gather slow embeddings with gradients (open_clip "
                                "--gather-with-grad)", True)

    def validate(self) -> list[str]:
        errs = []
        for name in ("embed_dim", "fast_channels", "fast_layers", "fast_kernel", "clips_per_video", "sample_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                errs.append(f"{name}={v!r} must be an int >= 1")
        if isinstance(self.fast_kernel, int) and self.fast_kernel % 2 == 0:
            errs.append(f"fast_kernel={self.fast_kernel} must be odd (same-length convs)")
        for name in ("clip_seconds", "slow_fps", "fast_fps"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                errs.append(f"{name}={v!r} must be a finite number > 0")
        if not (math.isfinite(self.min_shift) and self.min_shift >= 0):
            errs.append(f"min_shift={self.min_shift} must be a finite number >= 0")
        if not 0 <= self.max_clipped <= 1:
            errs.append(f"max_clipped={self.max_clipped} must lie in [0, 1]")
        if not (math.isfinite(self.silence_peak) and self.silence_peak >= 0):
            errs.append(f"silence_peak={self.silence_peak} must be a finite number >= 0")
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if v is not None and len(v) != 3:
                errs.append(f"{name}={v} must hold 3 numbers (R, G, B) or be null")
        return errs
