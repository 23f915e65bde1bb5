"""The diffusion recipe: a diffusers denoiser, image preference rows, the diffusion adapter and a loss from
:data:`DIFFUSION_METHODS`, packaged as a :class:`~mmalign.train.loop.Task` for ``modality: diffusion``.

Scores are ``logps = −err`` (per-sample denoising MSE, shared noise and timestep per example), so the
pairwise, unpaired and listwise losses of :mod:`mmalign.losses` apply unchanged. β is ``loss.kwargs.beta``
in ``diffusion.beta_convention`` (table in :mod:`mmalign.schema_diffusion`); default 5000 original
convention (the Salesforce SD1.5/SDXL launchers). Losses see the pseudo log-probs ``−err/2`` with the
original-convention β, so that for K = 2 the Plackett–Luce and KTO rewards equal Diffusion-DPO's
``−(β/2)(m − r)``.

``model.name_or_path: tiny`` builds random tiny components (CPU, seconds); any other value is a diffusers
pipeline directory loaded with ``from_pretrained``. ``lora.enabled`` wraps the denoiser with PEFT LoRA
(reference = adapters disabled, the diffusers DPO scripts' design); otherwise the whole denoiser trains and
``reference.strategy: copy`` keeps a frozen copy (the Salesforce / align-anything design).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .. import losses as L
from ..adapters.diffusion import DiffusionAdapter, make_noise_sampler
from ..config import ConfigError
from ..data.batches import ImageBatch
from ..losses import LossOutput
from ..schema import StageConfig, TrainConfig
from ..train.loop import StageData
from ..types import Scores
from .text_losses import ranking_order

log = logging.getLogger(__name__)

DEFAULT_BETA = {"original": 5000.0, "diffusers": 2500.0}
_TINY_KEYS = {"channels", "text_hidden", "latent_channels", "text_max_length", "t5_length"}


# ------------------------------------------------------------------------------------------------ losses


def _errs(s: Scores) -> torch.Tensor:
    return -s.logps  # adapter: logps = −err; a precomputed reference only stores logps


def _beta(kw: dict, convention: str) -> tuple[dict, float]:
    kw = dict(kw)
    conv = kw.pop("beta_convention", convention)
    if conv != convention:
        raise ConfigError(f"loss.kwargs.beta_convention={conv!r} contradicts diffusion.beta_convention="
                          f"{convention!r}; set only diffusion.beta_convention")
    beta = float(kw.pop("beta", DEFAULT_BETA[convention]))
    return kw, L.convert_beta(beta, convention, "original")


def _ties_half(out: LossOutput, mw, ml, rw, rl, beta: float) -> LossOutput:
    """Add the diffusers scripts' implicit accuracy (a tie s = 0 counts ½) next to ``rewards/accuracies``
    (ties count 0: Salesforce, TRL)."""
    s = -(beta / 2) * ((mw - rw) - (ml - rl))
    out.metrics["rewards/accuracies_ties_half"] = ((s > 0).float() + 0.5 * (s == 0).float()).mean().detach()
    return out


def _dpo(p: Scores, r: Scores, batch: ImageBatch, kw: dict, convention: str, *, npo: bool = False) -> LossOutput:
    kw, beta = _beta(kw, convention)
    m, ref = _errs(p), _errs(r)
    fn = L.diffusion_npo if npo else L.diffusion_dpo
    out = fn(m[:, 0], m[:, 1], ref[:, 0], ref[:, 1], beta=beta, beta_convention="original", **kw)
    if npo:
        return _ties_half(out, m[:, 1], m[:, 0], ref[:, 1], ref[:, 0], beta)
    return _ties_half(out, m[:, 0], m[:, 1], ref[:, 0], ref[:, 1], beta)


def _npo(p: Scores, r: Scores, batch: ImageBatch, kw: dict, convention: str) -> LossOutput:
    return _dpo(p, r, batch, kw, convention, npo=True)


def _sft(p: Scores, r, batch: ImageBatch, kw: dict, convention: str) -> LossOutput:
    if kw:
        raise ConfigError(f"loss.name=sft (the plain denoising loss on preferred images) takes no loss.kwargs; "
                          f"got {sorted(kw)}: remove them")
    return L.diffusion_sft(_errs(p)[:, 0])


def _kto(p: Scores, r: Scores, batch: ImageBatch, kw: dict, convention: str) -> LossOutput:
    """Diffusion-KTO (Li et al., arXiv 2404.04465) on pseudo log-probs −err/2, so β·(L − R) is Diffusion-DPO's
    implicit reward −(β/2)(m − r). z0 = max(0, batch mean of L − R), detached: TRL's fallback without
    mismatched pairs. The Diffusion-KTO code's exact reference point was not read (unverified)."""
    kw, beta = _beta(kw, convention)
    lp, ref = -0.5 * _errs(p)[:, 0], -0.5 * _errs(r)[:, 0]
    labels = batch.labels[:, 0] > 0.5
    return L.kto(lp, ref, labels, kl_ref_point=L.kto_reference_point(lp, ref), beta=beta, **kw)


def _plackett_luce(p: Scores, r: Scores, batch: ImageBatch, kw: dict, convention: str) -> LossOutput:
    """Plackett–Luce over the K images of a ranked list (DPO paper App. A.3) with scores −(m − r)/2 and the
    original-convention β; K = 2 is exactly sigmoid Diffusion-DPO."""
    kw, beta = _beta(kw, convention)
    scores = -0.5 * (_errs(p) - _errs(r))
    order = ranking_order(batch.labels, batch.candidate_mask)
    return L.plackett_luce(scores, order, candidate_mask=batch.candidate_mask, beta=beta, **kw)


@dataclass(frozen=True)
class DiffusionMethod:
    name: str
    formats: tuple[str, ...]  # accepted data formats
    needs_reference: bool
    fn: Callable[..., LossOutput]
    winners_only: bool = False  # load only candidate 0 (the preferred image) of pairs
    citation: str = ""


_PAIRS = ("pickapic", "pairs")
DIFFUSION_METHODS: dict[str, DiffusionMethod] = {
    m.name: m
    for m in [
        DiffusionMethod("dpo", _PAIRS, True, _dpo,
                        citation="Diffusion-DPO, arXiv 2311.12908 Eq. 14 (+ every dpo loss_type)"),
        DiffusionMethod("npo_diffusion", _PAIRS, True, _npo, citation="Diffusion-NPO, arXiv 2505.11245"),
        DiffusionMethod("sft", (*_PAIRS, "sft"), False, _sft, winners_only=True,
                        citation="SFT-on-winners baseline, arXiv 2311.12908 §5"),
        DiffusionMethod("kto", ("unpaired",), True, _kto, citation="Diffusion-KTO, arXiv 2404.04465"),
        DiffusionMethod("plackett_luce", ("ranked", *_PAIRS), True, _plackett_luce,
                        citation="Plackett–Luce DPO, arXiv 2305.18290 App. A.3"),
    ]
}
# Recipes of ``modality: diffusion`` that are not preference losses over Scores: ``DiffusionTask(cfg)`` builds
# these instead, since :data:`mmalign.api.TASKS` maps a modality to one class.
OTHER_RECIPES = {"self_npo": "mmalign.methods.self_npo:SelfNPOTask"}
ALIASES = {"diffusion_dpo": "dpo", "diffusion_npo": "npo_diffusion", "diffusion_sft": "sft", "diffusion_kto": "kto",
           "listwise": "plackett_luce"}


def get_diffusion_method(name: str) -> DiffusionMethod:
    name = ALIASES.get(name, name)
    if name in OTHER_RECIPES:
        raise ConfigError(f"loss.name={name} is the {OTHER_RECIPES[name]} recipe, not a preference loss of "
                          "DiffusionTask (build it through mmalign.api.build_task)")
    if name not in DIFFUSION_METHODS:
        raise ConfigError(f"loss.name={name!r} is not a diffusion method; valid: "
                          f"{sorted([*DIFFUSION_METHODS, *ALIASES])}")
    return DIFFUSION_METHODS[name]


# ------------------------------------------------------------------------------------------------ model


def build_components(cfg: TrainConfig):
    """The configured components: tiny random ones, or a diffusers pipeline directory."""
    from ..models.diffusion import load_diffusion_components
    from ..models.diffusion_tiny import build_tiny_components

    dc, mc = cfg.diffusion, cfg.model
    if mc.name_or_path == "tiny":
        bad = sorted(set(mc.tiny) - _TINY_KEYS)
        if bad:
            raise ConfigError(f"model.tiny has unknown keys {bad} for a diffusion model; allowed: {sorted(_TINY_KEYS)}")
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
    _freeze(comps)
    return comps


def _freeze(comps) -> None:
    for m in [comps.vae, *comps.text_encoders]:
        if m is not None:
            m.requires_grad_(False).eval()


def build_denoiser(cfg: TrainConfig, comps) -> nn.Module:
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


# ------------------------------------------------------------------------------------------------ task


class DiffusionTask:
    """Method recipe for diffusion / flow-matching generators (see the module docstring).

    ``loss.name`` in :data:`OTHER_RECIPES` (Self-NPO) constructs that recipe's task instead."""

    def __new__(cls, cfg: TrainConfig, **kwargs):
        target = OTHER_RECIPES.get(cfg.loss.name)
        if target is None:
            return super().__new__(cls)
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)(cfg, **kwargs)

    def __init__(self, cfg: TrainConfig, *, components=None):
        self.cfg = cfg
        dc = cfg.diffusion
        self.method = get_diffusion_method(cfg.loss.name)
        self._check(cfg)
        self.needs_reference = self.method.needs_reference
        self.loss_kwargs = dict(cfg.loss.kwargs)
        self.components = components or build_components(cfg)
        _freeze(self.components)
        # a tiny base cannot be rebuilt from a path: keep its initial weights to save beside the result
        self._tiny_base = copy.deepcopy(self.components.denoiser) if self.components.source == "tiny" else None
        if self.components.kind == "sd3" and dc.snr_gamma is not None:
            raise ConfigError("diffusion.snr_gamma is for unet/sdxl (ε/v) models, not sd3 flow matching")
        self.model = build_denoiser(cfg, self.components)
        self.adapter = DiffusionAdapter(self.components, snr_gamma=dc.snr_gamma,
                                        fixed_time_ids=dc.sdxl_time_ids == "fixed", resolution=dc.resolution)
        beta = self.loss_kwargs.get("beta")
        if beta is not None and float(beta) < 10 and self.method.name != "sft":
            log.warning("loss.kwargs.beta=%s looks like an LLM β; Diffusion-DPO β multiplies a per-element mean "
                        "MSE difference and is 1000s for ε models (100 for SD3 flow)", beta)

    def _check(self, cfg: TrainConfig) -> None:
        errs = []
        dc = cfg.diffusion
        if cfg.reference.strategy == "precomputed" and dc.noise != "fixed":
            errs.append("reference.strategy=precomputed caches one reference error per example, valid only if the "
                        "example's noise and timestep never change: set diffusion.noise=fixed (or use adapter/copy)")
        if dc.reverse_preferences and self.method.name == "npo_diffusion":
            errs.append("loss.name=npo_diffusion already reverses the preferences; with diffusion."
                        "reverse_preferences=true they would be reversed twice")
        if cfg.run.mixed_precision == "fp16" and cfg.model.dtype == "float16" and not cfg.lora.enabled:
            errs.append("full fine-tuning with fp16 weights cannot update them (no fp32 master copy); use "
                        "model.dtype=float32 with run.mixed_precision=fp16, or LoRA")
        if errs:
            raise ConfigError(errs)

    # -- data -----------------------------------------------------------------------------------------------
    def _format(self) -> str:
        dc = self.cfg.diffusion
        if dc.data_format != "auto":
            return dc.data_format
        return self.cfg.data.format if self.cfg.data.format != "auto" else "auto"

    def _dataset(self, sources, *, eval_split: bool):
        from ..data.image import ImageDataset, load_image_records

        dc, data = self.cfg.diffusion, self.cfg.data
        records, stats = load_image_records(sources, format=self._format(), drop_ties=dc.drop_ties,
                                            skip_bad_rows=data.skip_bad_rows, verify_images=dc.verify_images,
                                            limit=data.limit)
        fmt = stats["format"]
        if fmt not in self.method.formats:
            raise ConfigError(f"loss.name={self.method.name!r} needs {list(self.method.formats)} data, but "
                              f"{list(sources)} is {fmt!r}; pick a matching method (pairs: dpo, npo_diffusion, sft, "
                              "plackett_luce; unpaired: kto; ranked: plackett_luce; sft: sft)")
        if self.method.winners_only:
            records = [replace(r, images=r.images[:1], labels=[float("nan")]) for r in records]
        elif dc.reverse_preferences:
            records = [_reversed(r) for r in records]
        sampler = make_noise_sampler(
            self.components, dc.resolution, seed=self.cfg.run.seed + (104_729 if eval_split else 0),
            fixed=eval_split or dc.noise == "fixed", min_timestep=dc.min_timestep, max_timestep=dc.max_timestep,
            weighting_scheme=dc.weighting_scheme, logit_mean=dc.logit_mean, logit_std=dc.logit_std,
            mode_scale=dc.mode_scale, vae_sample=dc.vae_sample,
            proportion_empty_prompts=0.0 if eval_split else dc.proportion_empty_prompts)
        ds = ImageDataset(records, resolution=dc.resolution, center_crop=dc.center_crop,
                          random_flip=dc.random_flip and not eval_split, seed=self.cfg.run.seed,
                          noise_sampler=sampler)
        return ds, stats

    def stage_data(self, stage: StageConfig) -> StageData:
        from ..adapters.diffusion import build_latent_cache, build_text_cache

        dc = self.cfg.diffusion
        train, stats = self._dataset(stage.train or self.cfg.data.train, eval_split=False)
        eval_ds = self._dataset(self.cfg.data.eval, eval_split=True)[0] if self.cfg.data.eval else None
        cache_dir = Path(dc.cache_dir or Path(self.cfg.run.output_dir) / "diffusion_cache")
        datasets = [d for d in (train, eval_ds) if d is not None]
        if dc.cache_latents:
            for d in datasets:
                stats.update(build_latent_cache(d, self.components, cache_dir, batch_size=dc.cache_batch_size,
                                                device=_device()))
        if dc.cache_text_embeddings:
            stats.update(build_text_cache(datasets, self.components, cache_dir, batch_size=dc.cache_batch_size,
                                          device=_device()))
        log.info("diffusion data: %s format, %s", stats["format"], {k: v for k, v in stats.items() if k != "format"})
        numeric = {k: v for k, v in stats.items() if isinstance(v, (int, float))}  # the loop logs numbers
        return StageData(train=train, collate=train.collate, eval=eval_ds, stats=numeric, key=_content_key(train))

    def configure_stage(self, stage: StageConfig) -> None:
        kwargs = dict(self.cfg.loss.kwargs)
        if stage.loss:
            extra = dict(stage.loss)
            kwargs.update(extra.pop("kwargs", {}))
            if extra:
                raise ConfigError(f"stage {stage.name!r}: diffusion loss overrides may set only kwargs; got {extra}")
        self.loss_kwargs = kwargs

    # -- scores and loss ------------------------------------------------------------------------------------
    def score(self, model: nn.Module, batch: ImageBatch) -> Scores:
        return self.adapter.score(model, batch)

    def loss(self, policy: Scores, reference: Scores | None, batch: ImageBatch, aux: Scores | None = None):
        out = self.method.fn(policy, reference, batch, self.loss_kwargs, self.cfg.diffusion.beta_convention)
        t = policy.extras.get("timesteps")
        if t is not None:
            out.metrics["diffusion/timestep"] = t.float().mean().detach()
        return out

    # -- model lifecycle ------------------------------------------------------------------------------------
    def save_pretrained(self, model: nn.Module, path: Path, state_dict: dict | None = None) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` for ``Pipeline.load_lora_weights(path)``; full: the denoiser
        as a diffusers subfolder (``unet/`` or ``transformer/``) for ``from_pretrained(path, subfolder=...)``.
        A tiny base is saved beside it (``base_pipeline/``) since it cannot be rebuilt from a hub id."""
        from ..models.diffusion import save_denoiser_run

        reversed_ = self.method.name == "npo_diffusion" or self.cfg.diffusion.reverse_preferences
        save_denoiser_run(self.components, model, path, tiny_base=self._tiny_base, state_dict=state_dict,
                          info={"method": self.method.name, "reversed_preferences": reversed_})

    def merge_lora(self) -> None:
        from ..models.diffusion import apply_lora

        if not hasattr(self.model, "merge_and_unload"):
            raise ConfigError("stage.merge_lora needs lora.enabled=true")
        lc = self.cfg.lora
        self.model = apply_lora(self.model.merge_and_unload(), r=lc.r, alpha=lc.alpha, dropout=lc.dropout,
                                target_modules=lc.target_modules)


def _reversed(rec):
    """Diffusion-NPO data: the preference reversed (pairs swapped, ranks mirrored; kept ties unchanged)."""
    k = len(rec.labels)
    if any(math.isnan(x) for x in rec.labels) or k == 1:
        return rec
    if k == 2:
        return replace(rec, images=rec.images[::-1], labels=list(rec.labels))
    return replace(rec, labels=[float(k - 1) - x for x in rec.labels])


def _content_key(ds) -> str:
    """Data + noise key for reference-score caches: rows, captions, labels, sizes/mtimes of the source files."""
    h = hashlib.sha256()
    files = sorted({r.origin[0] for r in ds.records})
    for f in files:
        p = Path(f)
        st = p.stat() if p.exists() else None
        h.update(f"{f}:{st.st_size if st else 0}:{st.st_mtime_ns if st else 0}".encode())
    for r in ds.records:
        h.update(repr((r.origin, r.caption, r.labels, [i.field_name for i in r.images])).encode())
    h.update(f"{ds.resolution}:{ds.center_crop}:{ds.noise_sampler.key()}".encode())
    return h.hexdigest()


def _device() -> torch.device:
    try:
        from accelerate import PartialState

        return PartialState().device
    except Exception:  # accelerate not initialised / unavailable: CPU
        return torch.device("cpu")
