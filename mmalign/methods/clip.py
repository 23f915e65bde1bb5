"""The CLIP recipe (``modality: clip``): CLIP-Refine, ZSCL, CLIP InfoNCE and SigLIP fine-tuning under the one loop.

A :class:`ClipTask` holds a contrastive model (:mod:`mmalign.models.clip`), image–caption data
(:mod:`mmalign.data.image_text`), the contrastive adapter and a method from
:data:`~mmalign.methods.clip_losses.CLIP_METHODS` (``loss.name``). Methods that distil from the initial model get
a frozen teacher (:mod:`mmalign.methods.clip_teacher`: a copy, or features precomputed and cached on disk); the
loop's own reference machinery is not used (``needs_reference`` is False) because the teacher must also score
ZSCL's reference images and must be looked up per caption, which the teacher here does inside ``score``.

ZSCL's reference images are the stage's ``aux`` set (the loop draws one aux batch per train batch and passes
the policy's scores of it to ``loss``); its reference sentences become teacher text anchors once.
Per-step work that is not a loss (clamping the logit scale to ≤ 100 as open_clip, ZSCL's weight ensemble) is in
:meth:`ClipTask.after_step`, which the loop calls after each optimizer step when the task defines it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.contrastive import MAX_LOGIT_SCALE, dist_info, gather_features, score_contrastive
from ..config import ConfigError
from ..data.batches import ImageTextBatch
from ..data.image_text import ImageTextCollator, ImageTextDataset, ImageTextOptions, load_image_text, load_texts
from ..losses import update_weight_average
from ..models.clip import ClipBundle, apply_clip_lora, has_lora, load_clip, merge_lora_state, save_clip
from ..schema import StageConfig, TrainConfig
from ..train.loop import StageData
from ..types import Scores
from .clip_losses import ClipMethod, clip_method_loss, get_clip_method, resolve_kwargs
from .clip_teacher import CachedTeacher, CopyTeacher

log = logging.getLogger(__name__)
TRAIN, EVAL, REF = 0, 1, 2  # split ids of the datasets (keys of precomputed teacher tables)


def _freeze_logit_params(method: ClipMethod, kw: dict, normalize: bool, explicit: bool | None) -> tuple[bool, bool]:
    """(freeze logit_scale, freeze logit_bias). A parameter no loss term reads must not train: DDP would fail
    with "parameters that did not receive grad" (open_clip #1076) and weight decay would still move it."""
    if explicit is not None:
        scale_frozen = explicit
    elif method.name == "zscl":
        scale_frozen = True  # ZSCL excludes logit_scale from the optimiser
    elif method.name == "clip_refine":
        scale_frozen = kw["contrastive_weight"] == 0 and not normalize  # raw HyCD logits use no scale
    else:
        scale_frozen = False
    return scale_frozen, scale_frozen or method.name != "siglip"


class ClipTask:
    """Method recipe for dual encoders (see the module docstring)."""

    needs_reference = False  # the teacher lives here (see the module docstring)

    def __init__(self, cfg: TrainConfig, *, bundle: ClipBundle | None = None):
        self.cfg = cfg
        self.method = get_clip_method(cfg.loss.name)
        self.kw = resolve_kwargs(self.method, cfg.loss.kwargs)
        self.normalize = self.method.normalize if cfg.clip.normalize is None else cfg.clip.normalize
        init_bias = cfg.clip.init_logit_bias
        self.bundle = bundle or load_clip(cfg.model.name_or_path, pretrained=cfg.clip.pretrained,
                                          dtype=cfg.model.dtype, seed=cfg.run.seed, tiny=cfg.model.tiny,
                                          init_logit_bias=init_bias,
                                          gradient_checkpointing=cfg.model.gradient_checkpointing)
        if cfg.lora.enabled:
            self._check_lora(cfg)
            lc = cfg.lora
            self.bundle.model = apply_clip_lora(self.bundle.model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout,
                                                target_modules=lc.target_modules)
        self.model = self.bundle.model
        self._set_trainable()
        strategy = cfg.reference.strategy
        self.teacher: CopyTeacher | CachedTeacher | None = None
        if self.method.needs_teacher:
            if strategy in ("auto", "copy"):
                self.teacher = CopyTeacher(self.model, self.bundle.tokenizer)
            elif strategy == "precomputed":
                self.teacher = CachedTeacher(cfg.reference.cache_dir or Path(cfg.run.output_dir) / "teacher_cache")
            else:
                raise ConfigError(f"reference.strategy={strategy!r}: {self.method.name}'s teacher is the frozen "
                                  "initial model; use 'copy' (or 'auto') or 'precomputed'")
        needs_initial = (cfg.clip.weight_average == "wise" or cfg.clip.final_wise_alpha < 1.0
                         or self.kw.get("l2_weight", 0.0) > 0 or cfg.reference.strategy == "precomputed")
        self._initial = None  # CPU copy of the initial weights when nothing else keeps them
        if needs_initial and not isinstance(self.teacher, CopyTeacher):
            self._initial = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        self._avg: dict | None = None
        self._avg_count = 0
        if cfg.clip.weight_average != "none":
            self._avg = {n: p.detach().float().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self._generator: torch.Generator | None = None
        self._stage_calls = 0

    def _check_lora(self, cfg: TrainConfig) -> None:
        """LoRA factors cannot be averaged or interpolated on their own (B·A is bilinear: averaging A and B is
        not averaging the update), so the weight-space methods need full fine-tuning."""
        bad = []
        if cfg.clip.weight_average != "none":
            bad.append(f"clip.weight_average={cfg.clip.weight_average}")
        if cfg.clip.final_wise_alpha < 1.0:
            bad.append(f"clip.final_wise_alpha={cfg.clip.final_wise_alpha}")
        if self.kw.get("l2_weight", 0.0) > 0:
            bad.append(f"loss.kwargs.l2_weight={self.kw['l2_weight']}")
        if bad:
            raise ConfigError(f"lora.enabled=true cannot be combined with {', '.join(bad)} (they act on whole "
                              "weights, not on LoRA factors); train all weights (lora.enabled=false) or drop them")

    def _set_trainable(self) -> None:
        scale_frozen, bias_frozen = _freeze_logit_params(self.method, self.kw, self.normalize,
                                                         self.cfg.clip.freeze_logit_scale)
        self.model.logit_scale.requires_grad_(not scale_frozen)
        if getattr(self.model, "logit_bias", None) is not None:
            self.model.logit_bias.requires_grad_(not bias_frozen)

    # -- data ---------------------------------------------------------------------------------------------
    def _dataset(self, sources, split: int, *, with_text: bool = True) -> tuple[ImageTextDataset, dict]:
        opts = ImageTextOptions.from_config(self.cfg)
        records, tables, stats = load_image_text(sources, opts, need_captions=with_text)
        ds = ImageTextDataset(records, tables, self.bundle.transform, self.bundle.tokenizer, seed=self.cfg.run.seed,
                              with_text=with_text, skip_bad_rows=opts.skip_bad_rows)
        ds.split = split
        return ds, stats

    def stage_data(self, stage: StageConfig) -> StageData:
        cfg = self.cfg
        train, stats = self._dataset(stage.train or cfg.data.train, TRAIN)
        eval_ds = self._dataset(cfg.data.eval, EVAL)[0] if cfg.data.eval else None
        aux, anchor_texts = None, None
        if self.method.needs_ref_images:
            if not cfg.clip.ref_images or not cfg.clip.ref_texts:
                raise ConfigError("loss.name=zscl needs clip.ref_images (reference image folder/files) and "
                                  "clip.ref_texts (reference sentences, .txt one per line)")
            aux, ref_stats = self._dataset(cfg.clip.ref_images, REF, with_text=False)
            stats.update({f"ref/{k}": v for k, v in ref_stats.items()})
            anchor_texts = load_texts(cfg.clip.ref_texts, ImageTextOptions.from_config(cfg))
            stats["ref/texts"] = len(anchor_texts)
        if isinstance(self.teacher, CopyTeacher) and aux is not None:
            self.teacher.anchor_texts = anchor_texts
        if isinstance(self.teacher, CachedTeacher):
            self._build_cache(train, eval_ds, aux, anchor_texts)
        return StageData(train=train, collate=ImageTextCollator(self.bundle.tokenizer), eval=eval_ds, aux=aux,
                         stats=stats, key=train.content_key(), eval_key=eval_ds.content_key() if eval_ds else "")

    def _build_cache(self, train, eval_ds, aux, anchor_texts) -> None:
        from accelerate import PartialState

        device = PartialState().device
        model, temp = self.model, None
        if self._stage_calls > 1:  # later stages: the teacher is still the initial model
            import copy

            temp = model = copy.deepcopy(self.model)
            model.load_state_dict(self._initial)
        model.to(device)
        bs = self.cfg.run.batch_size
        self.teacher.build_dataset(TRAIN, "train", model, train, device, bs)
        if eval_ds is not None:
            self.teacher.build_dataset(EVAL, "eval", model, eval_ds, device, bs)
        if aux is not None:
            self.teacher.build_dataset(REF, "ref", model, aux, device, bs)
            self.teacher.build_anchors(model, self.bundle.tokenizer, anchor_texts, device)
        self.model.train()
        del temp

    def configure_stage(self, stage: StageConfig) -> None:
        self._stage_calls += 1
        kwargs = dict(self.cfg.loss.kwargs)
        if stage.loss:
            extra = dict(stage.loss)
            kwargs.update(extra.pop("kwargs", {}))
            if extra:
                raise ConfigError(f"stages[{stage.name!r}].loss may set only kwargs for modality=clip; got {extra}")
        self.kw = resolve_kwargs(self.method, kwargs)

    # -- scores and loss ----------------------------------------------------------------------------------
    def score(self, model: nn.Module, batch: ImageTextBatch) -> Scores:
        s = score_contrastive(model, batch, normalize=self.normalize, gather_with_grad=self.cfg.clip.gather_with_grad)
        if self.teacher is None:
            return s
        t = self.teacher.features(batch)
        s.extras["teacher_logit_scale"] = t.pop("logit_scale")
        gathered = "rank" in s.extras
        for name, feats in t.items():
            feats = F.normalize(feats.float(), dim=-1) if self.normalize else feats
            s.extras[f"teacher_{name}"] = feats
            if gathered:
                s.extras[f"teacher_{name}_all"] = gather_features(feats, gather_with_grad=False).detach()
        if batch.input_ids is None:  # ZSCL reference images: attach the text anchors
            s.extras["teacher_anchors"] = self.teacher.anchors(batch.pixel_values.device)
        return s

    def _rafa_generator(self, device: torch.device) -> torch.Generator:
        # Per-rank stream: pairs on different ranks must not share their random targets.
        if self._generator is None or self._generator.device != device:
            rank = dist_info()[0]
            self._generator = torch.Generator(device=device).manual_seed(self.cfg.run.seed * 1009 + rank)
        return self._generator

    def _l2(self) -> torch.Tensor | None:
        weight = self.kw.get("l2_weight", 0.0)
        if not weight:
            return None
        dev = next(self.model.parameters()).device
        init = (self.teacher.initial_params(dev) if isinstance(self.teacher, CopyTeacher)
                else {k: v.to(dev) for k, v in self._initial.items()})
        # ZSCL l2_loss: Σ over parameters of the summed squared difference to the initial weights.
        return sum(((p - init[n].detach()) ** 2).sum() for n, p in self.model.named_parameters() if p.requires_grad)

    def loss(self, policy: Scores, reference: Scores | None, batch: ImageTextBatch, aux: Scores | None = None):
        gen = self._rafa_generator(policy.embeddings["image"].device) if self.method.name == "clip_refine" else None
        out = clip_method_loss(self.method, policy, self.kw, normalize=self.normalize,
                               local_loss=self.cfg.clip.local_loss, aux=aux, generator=gen, l2=self._l2())
        if "substituted" in batch.extras:
            out.metrics["data/substituted_images"] = batch.extras["substituted"].float().sum()
        return out

    # -- per-step work, weights ------------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (1-based): clamp logit_scale to [0, ln 100] as open_clip's training loop,
        and update ZSCL's weight ensemble every ``average_every`` steps (at steps 1, 1 + k, ...: ZSCL updates at
        iteration 0, avg_freq, ... after the optimizer step)."""
        self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        c = self.cfg.clip
        if self._avg is None or (step - 1) % c.average_every:
            return
        current = {n: p.detach() for n, p in self.model.named_parameters() if n in self._avg}
        dev = next(iter(current.values())).device
        self._avg = {k: v.to(dev) for k, v in self._avg.items()}
        anchor = self._initial_params(dev) if c.weight_average == "wise" else None
        self._avg_count += 1
        self._avg = update_weight_average(self._avg, current, self._avg_count, anchor=anchor,
                                          wise_alpha=c.wise_alpha)

    def _initial_params(self, device) -> dict[str, torch.Tensor]:
        if isinstance(self.teacher, CopyTeacher):
            return {k: v.detach() for k, v in self.teacher.initial_params(device).items()}
        return {k: v.to(device) for k, v in self._initial.items()}

    def final_state_dict(self, model: nn.Module, current: dict | None = None) -> dict[str, torch.Tensor]:
        """What ``save_pretrained`` writes: the weight average when one is kept (ZSCL saves ``we_model``), then
        WiSE-FT with the initial weights when ``clip.final_wise_alpha`` < 1. ``current``: the model's weights
        gathered from a sharded run (default: its own ``state_dict()``)."""
        model = getattr(model, "module", model)
        state = {k: v.detach().clone() for k, v in (model.state_dict() if current is None else current).items()}
        if self._avg is not None and self._avg_count:
            state.update({k: v.to(state[k].dtype) for k, v in self._avg.items()})
        alpha = self.cfg.clip.final_wise_alpha
        if alpha < 1.0:
            init = self._initial_params(next(model.parameters()).device)
            for k, v in init.items():
                state[k] = (alpha * state[k].float() + (1 - alpha) * v.float()).to(state[k].dtype)
        return state

    def save_pretrained(self, model: nn.Module, path: Path, state_dict: dict | None = None) -> None:
        if self._avg is not None and self._avg_count == 0:
            log.warning("clip.weight_average=%s but no average was taken (after_step never ran, or the run was "
                        "shorter than one update): saving the current weights", self.cfg.clip.weight_average)
        state = self.final_state_dict(model, state_dict)
        if has_lora(getattr(model, "module", model)):
            state = merge_lora_state(getattr(model, "module", model), state)
        save_clip(self.bundle, path, model, state_dict=state)

    def merge_lora(self) -> None:
        raise ConfigError("stage.merge_lora is not supported for modality=clip (its LoRA is merged when the "
                          "final model is saved); use one stage, or several without merge_lora")

    # -- resumable state of the averaging and RaFA streams (for a loop that checkpoints task state) -----------
    def state_dict(self) -> dict:
        return {"avg": self._avg, "avg_count": self._avg_count,
                "generator": None if self._generator is None else self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._avg, self._avg_count = state.get("avg", self._avg), int(state.get("avg_count", 0))
        if state.get("generator") is not None:
            self._rafa_generator(next(self.model.parameters()).device).set_state(state["generator"])
