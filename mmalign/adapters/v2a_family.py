"""The v2a family: a video-conditioned flow-matching audio generator (:mod:`mmalign.models.v2a`), video → audio
rows (:mod:`mmalign.data.v2a`), scores in the losses' own units, the v2a save layout and LoRA merges.

**Units.** Exactly the diffusion family's (:mod:`mmalign.adapters.diffusion_family`, which this family extends):
:class:`~mmalign.adapters.v2a.V2AAdapter` returns the per-sample velocity MSE ``err`` (mean over C, L; noise and
flow time shared by an example's candidates) and a candidate scores ``logps = −c·err`` with c = ½
(``v2a.beta_convention: original``) or 1 (``diffusers``), so flow DPO (research/video_audio_clip_prior.md §2.2,
``L = −log σ(−β/2·[Δ_θ(a_w) − Δ_θ(a_l)])``) is the ``dpo`` row with the user's β, and KTO, Plackett–Luce, NPO and
every other sequence-score row read the same surrogate. ``extras["nll"] = err`` is the conditional flow-matching
loss: the ``sft`` row on ``{"video", "audio"}`` rows *is* MMAudio's pre-training objective (or SFT on the chosen
audio of pairs). Default β: 100 (original convention) for rows with a reference — flow_grpo's SD3.5 flow-DPO value,
the only published flow-matching β in research/diffusion.md §2; no V2A value is public (MultiSoundGen's β is not
retrievable, §2.1), so treat it as a starting point.

``model.name_or_path: tiny`` builds random components from the ``v2a:`` section and ``model.tiny`` sizes; any other
value is a v2a model directory (:func:`mmalign.models.v2a.load_v2a`), whose recorded spec is used. ``lora.enabled``
wraps the denoiser with PEFT LoRA on its attention projections (reference = adapters disabled); ``save`` always
writes full merged weights in the v2a layout, so ``final/`` loads with ``load_v2a`` and ``mmalign sample v2a``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from ..data.noise import NoiseSampler
from ..data.v2a import MediaOptions, V2ADataset, load_v2a_records
from ..schema_v2a import V2AConfig
from ..types import StageData
from .diffusion_family import DiffusionFamily
from .v2a import V2AAdapter

__all__ = ["DEFAULT_BETA", "V2AFamily", "build_v2a_components"]

log = logging.getLogger(__name__)

DEFAULT_BETA = {"original": 100.0, "diffusers": 50.0}


def mel_settings(vc):
    """The ``v2a:`` section's MelConfig: the preset, at ``v2a.sample_rate``, with ``v2a.mel`` overrides."""
    from ..data.audio import MelConfig, mel_config

    base = asdict(mel_config(vc.mel_preset))
    return MelConfig(**{**base, "sample_rate": vc.sample_rate, **vc.mel})


def build_v2a_components(cfg):
    """Tiny random components from the config, or a v2a model directory; frozen parts frozen."""
    from ..models.v2a import build_tiny_v2a, load_v2a

    vc, mc = cfg.v2a, cfg.model
    if mc.name_or_path == "tiny":
        bad = V2AConfig.tiny_problems(mc.tiny)  # checked at config load too; a hand-made config may skip that
        if bad:
            raise ConfigError(bad)
        comps = build_tiny_v2a(latent=vc.latent, sample_rate=vc.sample_rate, duration=vc.duration,
                               mel=mel_settings(vc), fps=vc.fps, frame_size=vc.frame_size,
                               frame_encoder=vc.frame_encoder, frame_encoder_path=vc.frame_encoder_path,
                               seed=cfg.run.seed, **mc.tiny)
    else:
        comps = load_v2a(mc.name_or_path, dtype=getattr(torch, mc.dtype))
        log.info("v2a model %s: its recorded spec is used (%s)", mc.name_or_path, comps.spec)
    for m in comps.frozen():
        m.requires_grad_(False).eval()
    return comps


class V2AFamily(DiffusionFamily):
    """Video-to-audio flow-matching generators. Prebuilt parts: ``components=`` (:class:`V2AComponents`)."""

    name = "v2a"
    modality = "v2a"

    def __init__(self, cfg, methods, *, components=None):  # noqa: D107 -- the diffusion family's init is for images
        from ..models.diffusion import apply_lora

        self.cfg = cfg
        self.components = components or build_v2a_components(cfg)
        net = self.components.denoiser
        if cfg.lora.enabled:
            lc = cfg.lora
            net = apply_lora(net, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules)
        else:
            net.requires_grad_(True)
        self.model = net
        self.adapter = V2AAdapter(self.components)
        self.convention = cfg.v2a.beta_convention
        self.logp_scale = 0.5 if self.convention == "original" else 1.0
        self._warned: set[float] = set()

    @classmethod
    def check(cls, cfg, uses) -> list[str]:
        errs = []
        vc = cfg.v2a
        if cfg.reference.strategy == "precomputed" and vc.noise != "fixed":
            errs.append("reference.strategy=precomputed caches one reference error per example, valid only if its "
                        "noise and flow time never change: set v2a.noise=fixed (or use adapter/copy)")
        for u in uses:
            conv = u.kwargs.get("beta_convention", vc.beta_convention)
            if conv != vc.beta_convention:
                errs.append(f"{u.where}.kwargs.beta_convention={conv!r} contradicts v2a.beta_convention="
                            f"{vc.beta_convention!r}; set only v2a.beta_convention")
            if u.method.aux == "retain" and cfg.retain is not None:
                errs.append(f"retain: {u.where}.name={u.method.name} on the v2a family reads no retain set; remove "
                            "the retain section")
        if cfg.model.name_or_path == "tiny":
            from ..data.audio import SequenceConfig

            try:
                mel = mel_settings(vc)
                SequenceConfig(vc.duration, vc.sample_rate, mel.hop_length, clip_fps=vc.fps)
            except (ConfigError, TypeError, KeyError) as e:
                errs += [f"v2a: {m}" for m in getattr(e, "errors", [str(e)])]
        if cfg.run.mixed_precision == "fp16" and cfg.model.dtype == "float16" and not cfg.lora.enabled:
            errs.append("full fine-tuning with fp16 weights cannot update them (no fp32 master copy); use "
                        "model.dtype=float32 with run.mixed_precision=fp16, or LoRA")
        return errs

    def loss_kwargs(self, method, kwargs: dict) -> dict:
        kw = dict(kwargs)
        if method.needs_reference and "beta" in method.options():
            kw.setdefault("beta", DEFAULT_BETA[self.convention])
        return super().loss_kwargs(method, kw)

    # -- data -----------------------------------------------------------------------------------------------------
    def media_options(self) -> MediaOptions:
        s, vc = self.components.spec, self.cfg.v2a
        enc = self.components.frame_encoder
        size = enc.config.image_size if enc is not None else s.frame_size
        return MediaOptions(sample_rate=s.sample_rate, num_samples=s.num_samples, fps=s.fps, num_frames=s.num_frames,
                            frame_size=size, resample=vc.resample, downmix=vc.downmix, min_rms=vc.min_rms,
                            max_clipped=vc.max_clipped, backend=vc.video_backend)

    def _dataset(self, sources, method, *, eval_split: bool):
        vc, data = self.cfg.v2a, self.cfg.data
        opts = self.media_options()
        fmt = data.format if data.format != "auto" else "auto"
        records, stats = load_v2a_records(sources, opts if vc.check_media else None, format=fmt,
                                          skip_bad_rows=data.skip_bad_rows, limit=data.limit)
        if stats["format"] not in method.formats:
            raise ConfigError(f"loss.name={method.name!r} needs {list(method.formats)} rows, but {list(sources)} "
                              f"holds {stats['format']!r} rows; e.g. sft rows (video, audio): sft; pairs: dpo, "
                              "npo_diffusion, sft, plackett_luce; unpaired: kto, bco; ranked: plackett_luce")
        if method.winners_only and stats["format"] == "pairs":
            for r in records:
                r.audios, r.labels, r.fields = r.audios[:1], [float("nan")], r.fields[:1]
        s = self.components.spec
        sampler = NoiseSampler(
            latent_shape=s.latent_shape, seed=self.cfg.run.seed + (104_729 if eval_split else 0), flow=True,
            flow_sigmas=_SIGMAS, flow_timesteps=_SIGMAS * 1000, weighting_scheme=vc.weighting_scheme,
            logit_mean=vc.logit_mean, logit_std=vc.logit_std, vae_sample=vc.vae_sample and s.latent == "vae",
            fixed=eval_split or vc.noise == "fixed",
            proportion_empty_prompts=0.0 if eval_split else vc.null_condition_probability)
        return V2ADataset(records, opts, sampler), stats

    def stage_data(self, stage, method) -> StageData:
        train, stats = self._dataset(stage.train or self.cfg.data.train, method, eval_split=False)
        eval_ds = self._dataset(self.cfg.data.eval, method, eval_split=True)[0] if self.cfg.data.eval else None
        log.info("v2a data: %s", stats)
        numeric = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        return StageData(train=train, collate=train.collate, eval=eval_ds, stats=numeric, key=train.content_key(),
                         eval_key=eval_ds.content_key() if eval_ds is not None else "")

    # -- model lifecycle ------------------------------------------------------------------------------------------
    def save(self, model: nn.Module, path: Path, state_dict: dict | None = None, method=None, *,
             info: dict | None = None) -> None:
        """Full merged weights in the v2a layout (:func:`mmalign.models.v2a.save_v2a`) + what was trained."""
        from ..models.v2a import save_v2a

        net = model
        if state_dict is not None or hasattr(net, "merge_and_unload"):
            net = copy.deepcopy(net)
            if state_dict is not None:
                net.load_state_dict(state_dict)
            if hasattr(net, "merge_and_unload"):
                net = net.merge_and_unload()
        if info is None:
            name = method.name if method is not None else self.cfg.loss.name
            info = {"method": name, "reversed_preferences": bool(method is not None and method.reverses_preferences),
                    "beta_convention": self.convention}
        save_v2a(self.components, path, net, info=info)


# The training σ grid of diffusers' FlowMatchEulerDiscreteScheduler (shift 1, 1000 steps: σ = 1 … 1/1000), the
# table the diffusion family's SD3 path indexes with a logit-normal u; t = 1 − σ is MMAudio's flow time.
_SIGMAS = torch.linspace(1.0, 1.0 / 1000, 1000)
