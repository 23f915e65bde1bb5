"""The diffusion family: a diffusers denoiser (UNet, SDXL UNet, SD3 transformer; ε, v, x0 or flow targets), image
preference rows, scores in the losses' own units, the diffusers save layout and LoRA merges.

**Units.** :class:`~mmalign.adapters.diffusion.DiffusionAdapter` returns the per-sample denoising error ``err``
(mean over C, H, W; shared noise and timestep per example). The family scores a candidate as

    logps = −c · err,   c = ½ with ``diffusion.beta_convention: original``,   c = 1 with ``diffusers``

so the user's β goes straight into :func:`mmalign.losses.dpo` / ``kto`` / ``plackett_luce``: with c = ½,
``β·((logps_w − ref_w) − (logps_l − ref_l)) = −(β/2)·((m_w − r_w) − (m_l − r_l))`` is Diffusion-DPO's logit in the
original convention (Salesforce ``train.py``, research/diffusion.md §1.1); with c = 1 it is the diffusers SD1.5
script's ``β·(ref_diff − model_diff)``, and ``β_original = 2·β_diffusers`` (§1.2). This is the only place the
convention is applied: no row converts β or flips a sign. For K = 2, Plackett–Luce and KTO rewards then equal
Diffusion-DPO's implicit reward. (Loss types whose formula is not a function of β·logit alone, e.g. IPO's
``(logit − 1/(2β))²``, read the logit in the configured convention's own units.)

``Scores.lengths`` are ones (an error is already a per-element mean: nothing to length-normalise) and
``extras["nll"]`` is ``err``, the per-candidate training loss of SFT rows and of the ``sft_weight`` term.
Defaults: β 5000 (original) / 2500 (diffusers) for the rows that need a reference; a β below 10 draws a warning
(it looks like an LLM β). Family metrics: ``diffusion/timestep``; for DPO rows also Salesforce's
``diffusion/{model,ref}_mse*`` / ``*_diff`` and the diffusers scripts' ``rewards/accuracies_ties_half``.

``model.name_or_path: tiny`` builds random tiny components (CPU, seconds); any other value is a diffusers
pipeline directory loaded with ``from_pretrained``. ``lora.enabled`` wraps the denoiser with PEFT LoRA
(reference = adapters disabled, the diffusers DPO scripts' design); otherwise the whole denoiser trains and
``reference.strategy: copy`` keeps a frozen copy (the Salesforce / align-anything design).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .. import losses as L
from ..config import ConfigError
from ..data.batches import ImageBatch
from ..losses import LossOutput
from ..types import Scores, StageData
from .diffusion import DiffusionAdapter, build_latent_cache, build_text_cache, make_noise_sampler
from .diffusion_build import build_components, build_denoiser, freeze
from .family import ModelFamily

__all__ = ["DEFAULT_BETA", "LOGP_SCALE", "DiffusionFamily", "build_components", "build_denoiser"]

log = logging.getLogger(__name__)

DEFAULT_BETA = {"original": 5000.0, "diffusers": 2500.0}
LOGP_SCALE = {"original": 0.5, "diffusers": 1.0}  # c in logps = −c·err; exact powers of two
_PAIR_FORMATS = {"pairs", "pickapic"}


def _beta_rows(method) -> bool:
    """Rows whose ``beta`` is Diffusion-DPO's: an inverse temperature on policy/reference log-ratios."""
    return method.needs_reference and "beta" in method.options()


class DiffusionFamily(ModelFamily):
    """Diffusion / flow-matching generators. Prebuilt parts: ``components=`` (a ``DiffusionComponents``)."""

    name = "diffusion"
    modality = "diffusion"
    provides = frozenset({"logps", "lengths", "nll"})
    cannot = {
        "token_logps": "a denoiser scores a whole sample with one denoising error; there are no tokens",
        "token_kl": "a denoiser has no next-token distribution to compare",
        "values": "a denoiser has no value head (train a reward model on another family)",
        "embeddings": "a denoiser produces no paired embeddings",
    }
    extra_kwargs = frozenset({"beta_convention"})

    def __init__(self, cfg, methods, *, components=None):
        self.cfg = cfg
        dc = cfg.diffusion
        self.components = components or build_components(cfg)
        freeze(self.components)
        # a tiny base cannot be rebuilt from a path: keep its initial weights to save beside the result
        self._tiny_base = copy.deepcopy(self.components.denoiser) if self.components.source == "tiny" else None
        if self.components.kind == "sd3" and dc.snr_gamma is not None:
            raise ConfigError("diffusion.snr_gamma is for unet/sdxl (ε/v) models, not sd3 flow matching")
        self.model = build_denoiser(cfg, self.components)
        self.adapter = DiffusionAdapter(self.components, snr_gamma=dc.snr_gamma,
                                        fixed_time_ids=dc.sdxl_time_ids == "fixed", resolution=dc.resolution)
        self.convention = dc.beta_convention
        self.logp_scale = LOGP_SCALE[self.convention]
        self._warned: set[float] = set()

    @classmethod
    def check(cls, cfg, uses) -> list[str]:
        errs = []
        dc = cfg.diffusion
        if cfg.reference.strategy == "precomputed" and dc.noise != "fixed":
            errs.append("reference.strategy=precomputed caches one reference error per example, valid only if the "
                        "example's noise and timestep never change: set diffusion.noise=fixed (or use adapter/copy)")
        for u in uses:
            if dc.reverse_preferences and u.method.reverses_preferences:
                errs.append(f"{u.where}.name={u.method.name} already reverses the preferences; with diffusion."
                            "reverse_preferences=true they would be reversed twice")
            conv = u.kwargs.get("beta_convention", dc.beta_convention)
            if conv != dc.beta_convention:
                errs.append(f"{u.where}.kwargs.beta_convention={conv!r} contradicts diffusion.beta_convention="
                            f"{dc.beta_convention!r}; set only diffusion.beta_convention")
            if u.method.aux == "retain" and cfg.retain is not None:
                errs.append(f"retain: {u.where}.name={u.method.name} on the diffusion family reads no retain set "
                            "(retain sets are text rows); remove the retain section")
        if cfg.run.mixed_precision == "fp16" and cfg.model.dtype == "float16" and not cfg.lora.enabled:
            errs.append("full fine-tuning with fp16 weights cannot update them (no fp32 master copy); use "
                        "model.dtype=float32 with run.mixed_precision=fp16, or LoRA")
        return errs

    def loss_kwargs(self, method, kwargs: dict) -> dict:
        kw = dict(kwargs)
        kw.pop("beta_convention", None)  # checked against diffusion.beta_convention at config load
        if _beta_rows(method):
            kw.setdefault("beta", DEFAULT_BETA[self.convention])
            beta = float(kw["beta"])
            if beta < 10 and beta not in self._warned:
                self._warned.add(beta)
                log.warning("loss.kwargs.beta=%s looks like an LLM β; Diffusion-DPO β multiplies a per-element mean "
                            "MSE difference and is 1000s for ε models (100 for SD3 flow)", beta)
        return kw

    # -- data -----------------------------------------------------------------------------------------------------
    def _format(self) -> str:
        dc = self.cfg.diffusion
        if dc.data_format != "auto":
            return dc.data_format
        return self.cfg.data.format if self.cfg.data.format != "auto" else "auto"

    def _dataset(self, sources, method, *, eval_split: bool):
        from ..data.image import ImageDataset, load_image_records

        dc, data = self.cfg.diffusion, self.cfg.data
        records, stats = load_image_records(sources, format=self._format(), drop_ties=dc.drop_ties,
                                            skip_bad_rows=data.skip_bad_rows, verify_images=dc.verify_images,
                                            limit=data.limit)
        fmt = stats["format"]
        generic = "pairs" if fmt in _PAIR_FORMATS else fmt
        if generic not in method.formats:
            raise ConfigError(f"loss.name={method.name!r} needs {list(method.formats)} data, but {list(sources)} is "
                              f"{fmt!r}; pick a matching loss (e.g. pairs: dpo, npo_diffusion, sft, plackett_luce; "
                              "unpaired: kto, bco; ranked: plackett_luce; sft: sft, npo)")
        if method.winners_only and generic == "pairs":
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

    def stage_data(self, stage, method) -> StageData:
        dc = self.cfg.diffusion
        train, stats = self._dataset(stage.train or self.cfg.data.train, method, eval_split=False)
        eval_ds = self._dataset(self.cfg.data.eval, method, eval_split=True)[0] if self.cfg.data.eval else None
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

    # -- scores and metrics ---------------------------------------------------------------------------------------
    def score(self, model: nn.Module, batch: ImageBatch, method=None) -> Scores:
        """``logps = −c·err`` (see the module docstring), ``lengths`` ones, ``extras``: ``err`` and ``nll`` (the raw
        errors, 0 on padding candidates) and the shared ``timesteps``."""
        s = self.adapter.score(model, batch)
        err = s.extras["err"]
        return Scores(logps=err * -self.logp_scale, lengths=torch.ones_like(err),
                      extras={"err": err, "nll": err, "timesteps": s.extras["timesteps"]})

    def errors(self, scores: Scores) -> torch.Tensor:
        """The denoising errors behind ``scores`` (exact: c is a power of two); a precomputed reference keeps
        only ``logps``."""
        return scores.extras["err"] if "err" in scores.extras else scores.logps / -self.logp_scale

    def add_metrics(self, out: LossOutput, policy: Scores, reference: Scores | None, batch, method,
                    kwargs: dict) -> None:
        t = policy.extras.get("timesteps")
        if t is not None:
            out.metrics["diffusion/timestep"] = t.float().mean().detach()
        if method.loss_fn is not L.dpo or reference is None or policy.logps.shape[1] != 2 or "beta" not in kwargs:
            return
        # Diffusion-DPO's own metrics (losses.diffusion_dpo's, on the errors it would have received): errors
        # replace the pseudo log-probs, and `rewards/accuracies_ties_half` counts a tie as ½ (diffusers scripts).
        for k in [k for k in out.metrics if k.startswith("logps/")]:
            del out.metrics[k]
        w, lo = (1, 0) if method.reverses_preferences else (0, 1)
        m, r = self.errors(policy).detach(), self.errors(reference).detach()
        mw, ml, rw, rl = m[:, w], m[:, lo], r[:, w], r[:, lo]
        raw = {"diffusion/model_mse_chosen": mw, "diffusion/model_mse_rejected": ml,
               "diffusion/model_mse": 0.5 * (mw + ml), "diffusion/model_diff": mw - ml,
               "diffusion/ref_mse_chosen": rw, "diffusion/ref_mse_rejected": rl,
               "diffusion/ref_mse": 0.5 * (rw + rl), "diffusion/ref_diff": rw - rl}
        out.metrics.update({k: v.float().mean() for k, v in raw.items()})
        beta = L.convert_beta(float(kwargs["beta"]), self.convention, "original")
        s = -(beta / 2) * ((mw - rw) - (ml - rl))
        out.metrics["rewards/accuracies_ties_half"] = ((s > 0).float() + 0.5 * (s == 0).float()).mean().detach()

    # -- model lifecycle ------------------------------------------------------------------------------------------
    def save(self, model: nn.Module, path: Path, state_dict: dict | None = None, method=None, *,
             info: dict | None = None) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` for ``Pipeline.load_lora_weights(path)``; full: the denoiser
        as a diffusers subfolder (``unet/`` or ``transformer/``) for ``from_pretrained(path, subfolder=...)``.
        A tiny base is saved beside it (``base_pipeline/``) since it cannot be rebuilt from a hub id. ``info``:
        what ``mmalign_diffusion.json`` records of the method (default: its name and the preference direction;
        recipes such as Self-NPO record their own options)."""
        from ..models.diffusion import save_denoiser_run

        if info is None:
            name = method.name if method is not None else self.cfg.loss.name
            reversed_ = bool(method is not None and method.reverses_preferences) or \
                self.cfg.diffusion.reverse_preferences
            info = {"method": name, "reversed_preferences": reversed_}
        save_denoiser_run(self.components, model, path, tiny_base=self._tiny_base, state_dict=state_dict, info=info)

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
