"""SF-CAVP-style audio-visual model: slow (semantic) and fast (dynamic) streams for video and audio.

**MultiSoundGen-style, not a reproduction**: MultiSoundGen (Yang et al., arXiv 2509.19999) describes SF-CAVP as "a
unified dual-stream architecture" aligning "core semantic representations and rapid dynamic features", with no
code, frame rates or layer sizes published (research/video_audio_clip_prior.md §2.1). The design here is the
note's §2.2 recommendation [inferred], on Diff-Foley's CAVP (arXiv 2306.17203) losses (§2.3):

- **slow video**: frames at ``slow_fps`` through a real transformers image tower (``CLIPVisionModel`` or
  ``SiglipVisionModel``; pooled output), a linear projection, mean over time → ``[B, D]``;
- **slow audio**: the clip's log-mel through a transformers ``ASTModel`` (pooled output: mean of its two
  distillation tokens), a linear projection → ``[B, D]``;
- **fast video**: a light per-frame conv encoder on each frame and its difference to the previous one (a SlowFast-
  like low-capacity pathway) at ``fast_fps``, then a 1-D residual conv head over time → ``[B, Tf, D]``;
- **fast audio**: a 1-D conv over the mel frames, average-pooled onto the fast video's time grid, then the same kind
  of temporal head → ``[B, Tf, D]``;
- two learnable logit scales (slow, fast), open_clip's init log(1/0.07).

Deviations from Diff-Foley's CAVP: its encoders are SlowOnly (video) and PANNs CNN14 (audio), one stream each, one
logit scale. Saved layout (:func:`save_sf_cavp`): ``sf_cavp_config.json`` (towers' configs, media settings: sample
rate, mel, fps, image sizes) + ``model.safetensors``; :func:`load_sf_cavp` needs nothing else (no tower
checkpoints, no network).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..data.av_media import AVMedia

__all__ = ["CONFIG_NAME", "SFCAVP", "SFCAVPConfig", "TOWER_PRESETS", "build_sf_cavp", "load_sf_cavp", "save_sf_cavp",
           "tower_config"]

CONFIG_NAME = "sf_cavp_config.json"
WEIGHTS_NAME = "model.safetensors"

# Tower shapes by name (random init): "tiny" for CPU tests; the real ones for shape checks and for training from
# scratch. CLIP ViT-B/16 and AST-base as published (openai/clip-vit-base-patch16, MIT/ast-finetuned-audioset-10-10)
# [shapes from their configs as recalled, unverified here]; AST's max_length and num_mel_bins always follow the
# media settings (one clip's mel), so a pretrained AST with another length cannot be loaded as is (its position
# embeddings would need interpolation, not implemented).
TOWER_PRESETS: dict[str, dict] = {
    "tiny-vision": {"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 8},
    "clip-vit-b16": {"model_type": "clip_vision_model", "hidden_size": 768, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "intermediate_size": 3072, "patch_size": 16},
    "tiny-audio": {"model_type": "audio-spectrogram-transformer", "hidden_size": 32, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 16, "frequency_stride": 8,
                   "time_stride": 8},
    "ast-base": {"model_type": "audio-spectrogram-transformer", "hidden_size": 768, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "intermediate_size": 3072, "patch_size": 16, "frequency_stride": 10,
                 "time_stride": 10},
}


@dataclass
class SFCAVPConfig:
    """Everything :class:`SFCAVP` needs to be rebuilt (what ``sf_cavp_config.json`` holds)."""

    vision: dict  # a transformers vision config as a dict (model_type + fields)
    audio: dict  # a transformers ASTConfig as a dict
    media: AVMedia = field(default_factory=AVMedia)
    embed_dim: int = 32
    fast_channels: int = 32
    fast_layers: int = 2
    fast_kernel: int = 3
    init_logit_scale: float = math.log(1 / 0.07)

    def to_dict(self) -> dict:
        return {"vision": self.vision, "audio": self.audio, "media": self.media.to_dict(), "embed_dim": self.embed_dim,
                "fast_channels": self.fast_channels, "fast_layers": self.fast_layers, "fast_kernel": self.fast_kernel,
                "init_logit_scale": self.init_logit_scale}

    @classmethod
    def from_dict(cls, d: dict) -> SFCAVPConfig:
        d = dict(d)
        d["media"] = AVMedia.from_dict(d.get("media", {}))
        return cls(**d)


def tower_config(spec: dict):
    """A transformers config object from a dict with ``model_type`` (CLIP/SigLIP vision or AST)."""
    from transformers import ASTConfig, CLIPVisionConfig, SiglipVisionConfig

    kinds = {"clip_vision_model": CLIPVisionConfig, "siglip_vision_model": SiglipVisionConfig,
             "audio-spectrogram-transformer": ASTConfig}
    d = dict(spec)
    kind = d.pop("model_type", None)
    if kind not in kinds:
        raise ConfigError(f"tower model_type={kind!r} is not one of {sorted(kinds)}")
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in ("transformers_version", "architectures")}
    return kinds[kind](**d)


class TemporalHead(nn.Module):
    """Residual 1-D conv blocks over time, then a projection: ``[B, C_in, T]`` → ``[B, T, D]``."""

    def __init__(self, channels: int, layers: int, kernel: int, dim: int):
        super().__init__()
        pad = kernel // 2
        self.blocks = nn.ModuleList([nn.Conv1d(channels, channels, kernel, padding=pad) for _ in range(layers)])
        self.norm = nn.LayerNorm(channels)
        self.proj = nn.Linear(channels, dim)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.blocks:
            x = x + F.gelu(conv(x))
        return self.proj(self.norm(x.transpose(1, 2)))


class FrameEncoder(nn.Module):
    """Low-capacity per-frame conv encoder on ``[frame, frame − previous frame]`` (6 channels): ``[N, T, 3, s, s]``
    → ``[N, C, T]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(6, channels, 3, stride=2, padding=1), nn.GELU(),
                                 nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GELU())

    def forward(self, frames: Tensor) -> Tensor:
        n, t = frames.shape[:2]
        diff = torch.cat([torch.zeros_like(frames[:, :1]), frames[:, 1:] - frames[:, :-1]], dim=1)
        x = self.net(torch.cat([frames, diff], dim=2).flatten(0, 1))  # [N·T, C, h, w]
        return x.mean((-2, -1)).view(n, t, -1).transpose(1, 2)


class SFCAVP(nn.Module):
    """The slow/fast audio-visual dual encoder (module docstring). ``vision_model``/``audio_model``: prebuilt
    transformers towers (``from_pretrained``), else built from the config with random weights."""

    def __init__(self, config: SFCAVPConfig, *, vision_model: nn.Module | None = None,
                 audio_model: nn.Module | None = None):
        super().__init__()
        from transformers import ASTModel, CLIPVisionModel, SiglipVisionModel

        self.config = config
        media = config.media
        vcfg = tower_config({**config.vision, "image_size": media.image_size})
        acfg = tower_config({**config.audio, "max_length": media.num_mel_frames, "num_mel_bins": media.mel.n_mels})
        vision_cls = CLIPVisionModel if vcfg.model_type == "clip_vision_model" else SiglipVisionModel
        self.vision_tower = vision_model if vision_model is not None else vision_cls(vcfg)
        self.audio_tower = audio_model if audio_model is not None else ASTModel(acfg)
        d, c = config.embed_dim, config.fast_channels
        self.vision_proj = nn.Linear(self.vision_tower.config.hidden_size, d)
        self.audio_proj = nn.Linear(self.audio_tower.config.hidden_size, d)
        self.fast_video = FrameEncoder(c)
        self.fast_video_head = TemporalHead(c, config.fast_layers, config.fast_kernel, d)
        self.fast_audio_in = nn.Conv1d(media.mel.n_mels, c, config.fast_kernel, padding=config.fast_kernel // 2)
        self.fast_audio_head = TemporalHead(c, config.fast_layers, config.fast_kernel, d)
        self.logit_scale_slow = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_scale_fast = nn.Parameter(torch.tensor(float(config.init_logit_scale)))

    @property
    def media(self) -> AVMedia:
        return self.config.media

    def encode_video(self, slow: Tensor, fast: Tensor) -> tuple[Tensor, Tensor]:
        """``slow [N, Ts, 3, S, S]``, ``fast [N, Tf, 3, s, s]`` → raw ``([N, D], [N, Tf, D])``."""
        n, ts = slow.shape[:2]
        dtype = self.vision_proj.weight.dtype
        pooled = self.vision_tower(pixel_values=slow.flatten(0, 1).to(dtype)).pooler_output  # [N·Ts, H]
        slow_emb = self.vision_proj(pooled).view(n, ts, -1).mean(1)
        fast_emb = self.fast_video_head(self.fast_video(fast.to(dtype)))
        return slow_emb, fast_emb

    def encode_audio(self, mel: Tensor) -> tuple[Tensor, Tensor]:
        """``mel [N, n_mels, F]`` → raw ``([N, D], [N, Tf, D])`` (Tf = the media's fast steps)."""
        dtype = self.audio_proj.weight.dtype
        mel = mel.to(dtype)
        pooled = self.audio_tower(input_values=mel.transpose(1, 2)).pooler_output  # AST takes [N, F, n_mels]
        x = F.gelu(self.fast_audio_in(mel))  # [N, C, F] at the mel frame rate
        x = F.adaptive_avg_pool1d(x, self.media.num_fast)  # onto the fast video grid
        return self.audio_proj(pooled), self.fast_audio_head(x)

    def logit_scales(self, max_log: float = math.log(100.0)) -> tuple[Tensor, Tensor]:
        """``(exp(slow), exp(fast))``, each clamped to ≤ 100 on read (open_clip's bound)."""
        return self.logit_scale_slow.clamp(max=max_log).exp(), self.logit_scale_fast.clamp(max=max_log).exp()


# -- build, save, load ---------------------------------------------------------------------------------------------
def _from_pretrained_vision(path: str, dtype):
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    cfg = AutoConfig.from_pretrained(path)
    kind = getattr(cfg, "model_type", "")
    if kind in ("clip", "clip_vision_model"):
        return CLIPVisionModel.from_pretrained(path, dtype=dtype)
    if kind in ("siglip", "siglip_vision_model"):
        return SiglipVisionModel.from_pretrained(path, dtype=dtype)
    raise ConfigError(f"av.vision_tower={path!r} is a {kind!r} checkpoint; expected a CLIP or SigLIP model "
                      "(its vision tower is used)")


def build_sf_cavp(*, vision_tower: str = "tiny-vision", audio_tower: str = "tiny-audio", media: AVMedia | None = None,
                  embed_dim: int = 32, fast_channels: int = 32, fast_layers: int = 2, fast_kernel: int = 3,
                  seed: int = 0, dtype: torch.dtype = torch.float32, pretrained: bool = True) -> SFCAVP:
    """A new model: towers by preset name (:data:`TOWER_PRESETS`, random init) or ``from_pretrained`` path (vision:
    CLIP/SigLIP; audio: an ``ASTModel`` directory whose max_length / num_mel_bins match the media settings).
    ``pretrained=False`` uses only a path's config (random weights; shape checks without loading)."""
    media = media or AVMedia()
    torch.manual_seed(seed)
    vision_model = audio_model = None
    if vision_tower in TOWER_PRESETS:
        vision = dict(TOWER_PRESETS[vision_tower])
    else:
        vision_model = _from_pretrained_vision(vision_tower, dtype) if pretrained else None
        if vision_model is None:
            from transformers import AutoConfig

            vc = AutoConfig.from_pretrained(vision_tower)
            vision = getattr(vc, "vision_config", vc).to_dict()
        else:
            vision = vision_model.config.to_dict()
        vision = {**vision, "model_type": vision.get("model_type", "clip_vision_model")}
        if vision["model_type"] in ("clip", "siglip"):
            vision["model_type"] += "_vision_model"
    if audio_tower in TOWER_PRESETS:
        audio = dict(TOWER_PRESETS[audio_tower])
    else:
        from transformers import ASTModel, AutoConfig

        audio_model = ASTModel.from_pretrained(audio_tower, dtype=dtype) if pretrained else None
        audio = (audio_model.config if audio_model is not None else AutoConfig.from_pretrained(audio_tower)).to_dict()
        want = (media.num_mel_frames, media.mel.n_mels)
        got = (audio.get("max_length"), audio.get("num_mel_bins"))
        if got != want:
            raise ConfigError(f"av.audio_tower={audio_tower!r} takes (max_length, num_mel_bins)={got}, the media "
                              f"settings give {want}; fix: match clip_seconds / mel to the checkpoint, or use "
                              "audio_tower=ast-base (random init)")
    for spec in (vision, audio):
        spec.pop("torch_dtype", None), spec.pop("dtype", None)
    cfg = SFCAVPConfig(vision=vision, audio=audio, media=media, embed_dim=embed_dim, fast_channels=fast_channels,
                       fast_layers=fast_layers, fast_kernel=fast_kernel)
    return SFCAVP(cfg, vision_model=vision_model, audio_model=audio_model).to(dtype)


def save_sf_cavp(model: SFCAVP, path: str | Path, state_dict: dict | None = None) -> Path:
    """``sf_cavp_config.json`` + ``model.safetensors`` (``state_dict``: weights to write, default the model's)."""
    from safetensors.torch import save_file

    model = getattr(model, "module", model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    save_file(state, str(path / WEIGHTS_NAME))
    (path / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=1, default=str))
    return path


def load_sf_cavp(path: str | Path, *, dtype: torch.dtype = torch.float32) -> SFCAVP:
    """A model saved by :func:`save_sf_cavp`; a directory without its files is a ConfigError naming the fix."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise ConfigError(f"{path} is not an SF-CAVP model directory (needs {CONFIG_NAME} and {WEIGHTS_NAME}); fix: "
                          "point to the final/ folder of a modality=av run, or use model.name_or_path=tiny")
    cfg = SFCAVPConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
    model = SFCAVP(cfg)
    missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS_NAME)), strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path / WEIGHTS_NAME}: weights do not match {CONFIG_NAME} (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}); fix: save the model again with save_sf_cavp")
    return model.to(dtype)
