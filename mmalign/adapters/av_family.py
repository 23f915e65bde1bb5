"""The audio-visual family (``modality: av``): the SF-CAVP-style slow/fast model (:mod:`mmalign.models.cavp`),
video rows cut into time-shifted clips (:mod:`mmalign.data.av_clips`), contrastive Scores
(:func:`~mmalign.adapters.av.score_av`), the ``sf_cavp_config.json`` + safetensors layout.

It feeds the ``cavp`` row of the one METHODS table (:mod:`mmalign.methods.av_losses`), whose only need is
``embeddings``; the row is a recipe of this family (its task :class:`mmalign.methods.av.AVTask`), so another
family refuses it at config load, and this family refuses every other row (their losses read other embeddings).
There are no candidates with a likelihood, so the sequence, token and value rows are refused too.

Model source: ``model.name_or_path: tiny`` (or ``new``) builds a new model from the ``av:`` section (towers by
preset or ``from_pretrained`` path); any other value is a directory saved by this family, whose stored media
settings then drive the data (``av:`` media keys that differ are warned about, never silently mixed).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from ..data.audio import MEL_PRESETS
from ..data.av_clips import AVCollator, AVDataset, AVOptions, load_av_records
from ..data.av_media import CLIP_MEAN, CLIP_STD, TINY_MEL, AVMedia
from ..losses import LossOutput
from ..models.cavp import SFCAVP, build_sf_cavp, load_sf_cavp, save_sf_cavp
from ..types import Scores, StageData
from .av import SEMANTIC, score_av
from .family import ModelFamily

__all__ = ["AVFamily", "media_from_config", "options_from_config"]

log = logging.getLogger(__name__)
NEW_MODEL = ("tiny", "new")
ROWS = frozenset({"cavp"})
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def media_from_config(av) -> AVMedia:
    """The :class:`AVMedia` a new model gets from the ``av:`` section (raises ConfigError on bad values)."""
    if isinstance(av.mel, dict):
        mel = av.mel
    elif av.mel == "tiny":
        mel = TINY_MEL
    elif av.mel in MEL_PRESETS:
        mel = MEL_PRESETS[av.mel]
    else:
        raise ConfigError(f"av.mel={av.mel!r} is not 'tiny', a preset {sorted(MEL_PRESETS)} or a dict of MelConfig "
                          "fields")
    siglip = "siglip" in av.vision_tower.lower()  # only picks the default normalisation; null mean/std override
    default = (0.5, 0.5, 0.5) if siglip else None
    return AVMedia.from_dict({"sample_rate": av.sample_rate, "mel": mel, "clip_seconds": av.clip_seconds,
                              "slow_fps": av.slow_fps, "fast_fps": av.fast_fps, "image_size": av.image_size,
                              "fast_image_size": av.fast_image_size,
                              "image_mean": av.image_mean or default or CLIP_MEAN,
                              "image_std": av.image_std or default or CLIP_STD})


def options_from_config(cfg) -> AVOptions:
    av = cfg.av
    return AVOptions(clips_per_video=av.clips_per_video, min_shift=av.min_shift, media_root=av.media_root,
                     convert_audio=av.convert_audio, check_media=av.check_media, silence_peak=av.silence_peak,
                     max_clipped=av.max_clipped, skip_bad_rows=cfg.data.skip_bad_rows, limit=cfg.data.limit)


def build_model(cfg) -> SFCAVP:
    """A new model from the ``av:`` section, or a saved one from ``model.name_or_path``."""
    dtype = _DTYPES[cfg.model.dtype]
    if cfg.model.name_or_path in NEW_MODEL:
        av = cfg.av
        return build_sf_cavp(vision_tower=av.vision_tower, audio_tower=av.audio_tower, media=media_from_config(av),
                             embed_dim=av.embed_dim, fast_channels=av.fast_channels, fast_layers=av.fast_layers,
                             fast_kernel=av.fast_kernel, seed=cfg.run.seed, dtype=dtype)
    model = load_sf_cavp(cfg.model.name_or_path, dtype=dtype)
    try:
        differ = [k for k, v in media_from_config(cfg.av).to_dict().items() if model.media.to_dict()[k] != v]
    except ConfigError:
        differ = ["(invalid av media keys)"]
    if differ:
        log.warning("model %s stores its own media settings; av.%s differ and are ignored", cfg.model.name_or_path,
                    ", av.".join(differ))
    return model


class AVFamily(ModelFamily):
    """The SF-CAVP-style audio-visual dual encoder. Prebuilt part: ``model=`` (an :class:`SFCAVP`)."""

    name = "av_contrastive"
    modality = "av"
    provides = frozenset({"embeddings"})
    cannot = {
        "logps": "an audio-visual encoder scores a video's own audio by embedding similarity; there are no "
                 "candidates with a log-likelihood",
        "lengths": "an audio-visual encoder has no scored candidate lengths",
        "nll": "an audio-visual encoder has no per-candidate training loss",
        "token_logps": "an audio-visual encoder has no tokens",
        "token_kl": "an audio-visual encoder has no next-token distribution",
        "values": "an audio-visual encoder has no value head",
    }

    def __init__(self, cfg, methods, *, model: SFCAVP | None = None):
        self.cfg = cfg
        self.model = model if model is not None else build_model(cfg)

    @classmethod
    def check(cls, cfg, uses) -> list[str]:
        errors = []
        for u in uses:
            m = u.method
            if m.name not in ROWS:
                errors.append(f"{u.where}.name={m.name!r}: the {cls.name} family trains {sorted(ROWS)} only (the "
                              f"{m.name} loss reads embeddings this family does not make)")
                continue
            kw = {**m.defaults, **u.kwargs}
            errors += [f"{u.where}.kwargs.{k}: not an option of loss {m.name!r}; valid: {sorted(m.defaults)}"
                       for k in u.kwargs if k not in m.defaults]
            if kw.get("semantic") not in SEMANTIC:
                errors.append(f"{u.where}.kwargs.semantic={kw.get('semantic')!r} is not one of {list(SEMANTIC)}")
            weights = {k: kw[k] for k in ("slow_weight", "intra_weight", "temporal_weight") if k in kw}
            bad = {k: v for k, v in weights.items() if not isinstance(v, int | float) or v < 0}
            errors += [f"{u.where}.kwargs.{k}={v!r} must be a number >= 0" for k, v in bad.items()]
            if not bad and weights and not any(weights.values()):
                errors.append(f"{u.where}.kwargs: slow_weight, intra_weight and temporal_weight are all 0 (nothing "
                              "to train); set one > 0")
        if cfg.lora.enabled:
            errors.append("lora.enabled=true is not supported for modality=av (the fast streams are small convs "
                          "trained in full); set lora.enabled=false")
        if any(s.merge_lora for s in cfg.stages):
            errors.append("stage.merge_lora is not supported for modality=av (no LoRA)")
        if cfg.model.name_or_path in NEW_MODEL:
            try:
                media_from_config(cfg.av)
            except ConfigError as e:
                errors += [f"av: {err}" for err in e.errors]
        elif not Path(cfg.model.name_or_path).is_dir():
            errors.append(f"model.name_or_path={cfg.model.name_or_path!r} is neither 'tiny'/'new' (a new model from "
                          "the av: section) nor a saved SF-CAVP directory; fix: one of them")
        return list(dict.fromkeys(errors))

    # -- per stage ------------------------------------------------------------------------------------------------
    @property
    def media(self) -> AVMedia:
        return getattr(self.model, "module", self.model).media

    def dataset(self, sources, *, random_starts: bool | None = None) -> tuple[AVDataset, dict]:
        opts = options_from_config(self.cfg)
        records, stats = load_av_records(sources, self.media, opts)
        rs = self.cfg.av.random_starts if random_starts is None else random_starts
        return AVDataset(records, self.media, opts, seed=self.cfg.run.seed, random_starts=rs), stats

    def _key(self, ds: AVDataset) -> str:
        """Content key of a dataset: media files (path, size, mtime), media and clip settings, seed."""
        h = hashlib.sha256(repr((self.media.to_dict(), ds.opts, ds.seed, ds.random_starts)).encode())
        for r in ds.records:
            for p in dict.fromkeys((r.video, r.audio)):
                st = os.stat(p)
                h.update(f"{p}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()

    def stage_data(self, stage, method) -> StageData:
        train, stats = self.dataset(stage.train or self.cfg.data.train)
        eval_ds = None
        if self.cfg.data.eval:
            eval_ds, eval_stats = self.dataset(self.cfg.data.eval, random_starts=False)
            stats.update({f"eval/{k}": v for k, v in eval_stats.items()})
        return StageData(train=train, collate=AVCollator(), eval=eval_ds, stats=stats, key=self._key(train),
                         eval_key=self._key(eval_ds) if eval_ds is not None else "")

    # -- per batch ------------------------------------------------------------------------------------------------
    def score(self, model: nn.Module, batch, method) -> Scores:
        return score_av(model, batch, gather_with_grad=self.cfg.av.gather_with_grad)

    def add_metrics(self, out: LossOutput, policy: Scores, reference, batch, method, kwargs: dict) -> None:
        out.metrics["reward/pair"] = policy.logps.detach().float().mean()

    # -- model lifecycle ------------------------------------------------------------------------------------------
    def save(self, model: nn.Module, path: Path, state_dict: dict | None = None, method=None) -> None:
        save_sf_cavp(model, path, state_dict=state_dict)

    def merge_lora(self) -> None:
        raise ConfigError("stage.merge_lora is not supported for modality=av (no LoRA)")
