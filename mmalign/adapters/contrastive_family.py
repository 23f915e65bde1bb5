"""The dual-encoder family (``modality: clip``): open_clip and transformers CLIP/SigLIP models, image–caption data,
contrastive Scores (:func:`~mmalign.adapters.contrastive.score_contrastive`), the frozen teacher of the distilling
rows, the ``save_clip`` layout with LoRA merged.

It feeds the contrastive rows of the one METHODS table (``clip``, ``siglip``, ``clip_refine``, ``zscl``; the
compositions are in :mod:`mmalign.methods.clip_losses`), whose only need is ``embeddings``: Scores carry
``embeddings={"image", "text"}`` (+ ``*_all`` gathered over ranks), ``extras["logit_scale"]`` (exponentiated) and
``logit_bias``, and ``logps [B, 1]`` = the pair's logit for reporting. There are no candidates with a likelihood,
so the sequence, token and value rows (DPO, KTO, SFT, ...) are refused at config load.

What the family adds to a row's ``loss.kwargs`` (:meth:`DualEncoderFamily.loss_kwargs`): ``normalize`` (``clip.
normalize``, else the reference code's choice: raw features for CLIP-Refine, unit-norm otherwise), ``local_loss``,
``rafa_generator`` (this rank's RaFA stream, seeded ``run.seed·1009 + rank``; its state goes into checkpoints
through the task) and ``l2`` (Σ‖θ − θ_0‖² over the trainable parameters, ZSCL's L2). The rows that distil from the
initial model (``clip_refine``, ``zscl``) get a frozen teacher (:class:`~mmalign.adapters.contrastive.CopyTeacher`,
or :class:`~mmalign.adapters.contrastive.CachedTeacher` under ``reference.strategy: precomputed``) whose features
:meth:`DualEncoderFamily.score` puts into ``extras["teacher_*"]`` of every batch, the reference images included; the
loop's own reference machinery is not used (``needs_reference`` is False) because the teacher must also score ZSCL's
reference images and is looked up per caption. A row with ``aux="scores"`` (ZSCL) gets ``clip.ref_images`` as the
stage's aux set (the loop draws one aux batch per train batch and passes the policy's Scores of it to the row) and
its ``clip.ref_texts`` as the teacher's text anchors.

Logit parameters no term reads do not train: DDP would fail with "parameters that did not receive grad"
(open_clip #1076) and weight decay would still move them. LoRA is merged when the final model is saved; a merge
between stages is refused.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..data.batches import ImageTextBatch
from ..data.image_text import ImageTextCollator, ImageTextDataset, ImageTextOptions, load_image_text, load_texts
from ..losses import LossOutput
from ..models.clip import ClipBundle, apply_clip_lora, has_lora, load_clip, merge_lora_state, save_clip
from ..types import Scores, StageData
from .contrastive import CachedTeacher, CopyTeacher, dist_info, gather_features, score_contrastive
from .family import ModelFamily

__all__ = ["EVAL", "REF", "TRAIN", "DualEncoderFamily"]

TRAIN, EVAL, REF = 0, 1, 2  # split ids of the datasets (keys of precomputed teacher tables)
# What the reference implementations do beyond the loss, per row: distil from the frozen initial model, and train
# on raw projections (CLIP-Refine's code) instead of unit-norm features (clip.normalize: null picks these).
TEACHER_ROWS = frozenset({"clip_refine", "zscl"})
RAW_FEATURE_ROWS = frozenset({"clip_refine"})
_TEACHER_STRATEGIES = ("auto", "copy", "precomputed")


def _freeze_logit_params(name: str, kw: dict, normalize: bool, explicit: bool | None) -> tuple[bool, bool]:
    """(freeze logit_scale, freeze logit_bias) for row ``name`` (see the module docstring)."""
    if explicit is not None:
        scale_frozen = explicit
    elif name == "zscl":
        scale_frozen = True  # ZSCL excludes logit_scale from the optimiser
    elif name == "clip_refine":
        scale_frozen = kw["contrastive_weight"] == 0 and not normalize  # raw HyCD logits use no scale
    else:
        scale_frozen = False
    return scale_frozen, scale_frozen or name != "siglip"


def _l2_weights(cfg) -> list[float]:
    """Every ``l2_weight`` the run's loss sections set (ZSCL's L2 needs the initial weights kept)."""
    sections = [cfg.loss.kwargs, *((s.loss or {}).get("kwargs") or {} for s in cfg.stages)]
    return [float(k["l2_weight"]) for k in sections if "l2_weight" in k]


class DualEncoderFamily(ModelFamily):
    """Dual encoders (open_clip ``CLIP`` / ``CustomTextCLIP``, transformers CLIP / SigLIP, optionally with PEFT LoRA).
    Prebuilt part: ``bundle=`` (a :class:`~mmalign.models.clip.ClipBundle`; else loaded from the config)."""

    name = "dual_encoder"
    modality = "clip"
    provides = frozenset({"embeddings"})
    cannot = {
        "logps": "a dual encoder scores one image–caption pair per example by feature similarity; there are no "
                 "candidates with a log-likelihood",
        "lengths": "a dual encoder has no scored candidate lengths",
        "nll": "a dual encoder has no per-candidate training loss",
        "token_logps": "a dual encoder has no tokens to score",
        "token_kl": "a dual encoder has no next-token distribution",
        "values": "a dual encoder has no value head",
    }

    def __init__(self, cfg, methods, *, bundle: ClipBundle | None = None):
        self.cfg = cfg
        c = cfg.clip
        self.bundle = bundle or load_clip(cfg.model.name_or_path, pretrained=c.pretrained, dtype=cfg.model.dtype,
                                          seed=cfg.run.seed, tiny=cfg.model.tiny, init_logit_bias=c.init_logit_bias,
                                          gradient_checkpointing=cfg.model.gradient_checkpointing)
        if cfg.lora.enabled:
            lc = cfg.lora
            self.bundle.model = apply_clip_lora(self.bundle.model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout,
                                                target_modules=lc.target_modules)
        self.model = self.bundle.model
        self.teacher: CopyTeacher | CachedTeacher | None = None
        if any(m.name in TEACHER_ROWS for m in methods):
            if cfg.reference.strategy == "precomputed":
                self.teacher = CachedTeacher(cfg.reference.cache_dir or Path(cfg.run.output_dir) / "teacher_cache")
            else:
                self.teacher = CopyTeacher(self.model, self.bundle.tokenizer)
        needs_initial = (c.weight_average == "wise" or c.final_wise_alpha < 1.0 or any(w > 0 for w in _l2_weights(cfg))
                         or cfg.reference.strategy == "precomputed")
        self._initial = None  # CPU copy of the initial weights when no teacher copy keeps them
        if needs_initial and not isinstance(self.teacher, CopyTeacher):
            self._initial = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        self.generator: torch.Generator | None = None  # the RaFA stream, made on the features' device
        self._stages = 0

    @classmethod
    def check(cls, cfg, uses) -> list[str]:
        errors = []
        for u in uses:
            m = u.method
            errors += [f"{u.where}.kwargs.{k}: not an option of loss {m.name!r}; valid: {sorted(m.defaults)}"
                       for k in u.kwargs if k not in m.defaults]
            if m.name in TEACHER_ROWS and cfg.reference.strategy not in _TEACHER_STRATEGIES:
                errors.append(f"reference.strategy={cfg.reference.strategy!r}: {m.name}'s teacher is the frozen "
                              "initial model; use 'copy' (or 'auto') or 'precomputed'")
            if m.aux == "scores" and (not cfg.clip.ref_images or not cfg.clip.ref_texts):
                errors.append(f"{u.where}.name={m.name} needs clip.ref_images (reference image folder/files) and "
                              "clip.ref_texts (reference sentences, .txt one per line)")
        if any(s.merge_lora for s in cfg.stages):
            errors.append("stage.merge_lora is not supported for modality=clip (its LoRA is merged when the final "
                          "model is saved); use one stage, or several without merge_lora")
        if cfg.lora.enabled:
            errors += _lora_conflicts(cfg, uses)
        return list(dict.fromkeys(errors))

    # -- per stage ------------------------------------------------------------------------------------------------
    def normalize(self, method) -> bool:
        """Whether ``method`` trains on unit-norm features (``clip.normalize``, else the reference code's choice)."""
        explicit = self.cfg.clip.normalize
        return method.name not in RAW_FEATURE_ROWS if explicit is None else explicit

    def loss_kwargs(self, method, kwargs: dict) -> dict:
        """The row's options plus the family's settings (module docstring). Also sets which logit parameters
        train for this stage's loss (the loop builds each stage's optimizer after this)."""
        normalize = self.normalize(method)
        scale_frozen, bias_frozen = _freeze_logit_params(method.name, kwargs, normalize,
                                                         self.cfg.clip.freeze_logit_scale)
        self.model.logit_scale.requires_grad_(not scale_frozen)
        if getattr(self.model, "logit_bias", None) is not None:
            self.model.logit_bias.requires_grad_(not bias_frozen)
        return {**kwargs, "normalize": normalize, "local_loss": self.cfg.clip.local_loss,
                "rafa_generator": self.rafa_generator, "l2": self.l2_to_initial}

    def _dataset(self, sources, split: int, *, with_text: bool = True) -> tuple[ImageTextDataset, dict]:
        opts = ImageTextOptions.from_config(self.cfg)
        records, tables, stats = load_image_text(sources, opts, need_captions=with_text)
        ds = ImageTextDataset(records, tables, self.bundle.transform, self.bundle.tokenizer, seed=self.cfg.run.seed,
                              with_text=with_text, skip_bad_rows=opts.skip_bad_rows)
        ds.split = split
        return ds, stats

    def stage_data(self, stage, method) -> StageData:
        cfg = self.cfg
        self._stages += 1
        train, stats = self._dataset(stage.train or cfg.data.train, TRAIN)
        eval_ds = self._dataset(cfg.data.eval, EVAL)[0] if cfg.data.eval else None
        aux, anchor_texts = None, None
        if method.aux == "scores":  # ZSCL's reference images (and sentences: the teacher's text anchors)
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
        if self._stages > 1:  # later stages: the teacher is still the initial model
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

    # -- per batch ------------------------------------------------------------------------------------------------
    def score(self, model: nn.Module, batch: ImageTextBatch, method) -> Scores:
        """The policy's contrastive Scores; with a teacher also its features (normalised like the policy's) in
        ``extras["teacher_image" | "teacher_text" | "teacher_logit_scale"]`` (+ ``*_all`` gathered over ranks,
        ``teacher_anchors`` on the reference images)."""
        normalize = self.normalize(method)
        s = score_contrastive(model, batch, normalize=normalize, gather_with_grad=self.cfg.clip.gather_with_grad)
        if self.teacher is None:
            return s
        t = self.teacher.features(batch)
        s.extras["teacher_logit_scale"] = t.pop("logit_scale")
        gathered = "rank" in s.extras
        for name, feats in t.items():
            feats = F.normalize(feats.float(), dim=-1) if normalize else feats
            s.extras[f"teacher_{name}"] = feats
            if gathered:
                s.extras[f"teacher_{name}_all"] = gather_features(feats, gather_with_grad=False).detach()
        if batch.input_ids is None:  # ZSCL reference images: attach the text anchors
            s.extras["teacher_anchors"] = self.teacher.anchors(batch.pixel_values.device)
        return s

    def rafa_generator(self, device: torch.device) -> torch.Generator:
        """This rank's RaFA stream on ``device``: pairs on different ranks must not share their random targets."""
        if self.generator is None or self.generator.device != device:
            rank = dist_info()[0]
            self.generator = torch.Generator(device=device).manual_seed(self.cfg.run.seed * 1009 + rank)
        return self.generator

    def initial_params(self, device) -> dict[str, torch.Tensor]:
        """The initial weights (the teacher copy's, else the CPU copy) on ``device``, detached."""
        if isinstance(self.teacher, CopyTeacher):
            return {k: v.detach() for k, v in self.teacher.initial_params(device).items()}
        if self._initial is None:
            raise RuntimeError("the initial weights were not kept (no setting that needs them was configured)")
        return {k: v.to(device) for k, v in self._initial.items()}

    def l2_to_initial(self) -> torch.Tensor:
        """ZSCL ``l2_loss``: Σ over trainable parameters of the summed squared difference to the initial weights."""
        init = self.initial_params(next(self.model.parameters()).device)
        return sum(((p - init[n]) ** 2).sum() for n, p in self.model.named_parameters() if p.requires_grad)

    def add_metrics(self, out: LossOutput, policy: Scores, reference, batch, method, kwargs: dict) -> None:
        if "substituted" in batch.extras:
            out.metrics["data/substituted_images"] = batch.extras["substituted"].float().sum()

    # -- model lifecycle ------------------------------------------------------------------------------------------
    def save(self, model: nn.Module, path: Path, state_dict: dict | None = None, method=None) -> None:
        """``save_clip``'s layout (open_clip ``local-dir:`` / transformers ``from_pretrained``) of ``state_dict``
        (default: the model's own weights), LoRA folded into the base weights so that no peft is needed to load."""
        inner = getattr(model, "module", model)
        if has_lora(inner):
            state_dict = merge_lora_state(inner, inner.state_dict() if state_dict is None else state_dict)
        save_clip(self.bundle, path, model, state_dict=state_dict)

    def merge_lora(self) -> None:
        raise ConfigError("stage.merge_lora is not supported for modality=clip (its LoRA is merged when the final "
                          "model is saved); use one stage, or several without merge_lora")


def _lora_conflicts(cfg, uses) -> list[str]:
    """LoRA factors cannot be averaged or interpolated on their own (B·A is bilinear: averaging A and B is not
    averaging the update), so the weight-space settings need full fine-tuning."""
    c, bad = cfg.clip, []
    if c.weight_average != "none":
        bad.append(f"clip.weight_average={c.weight_average}")
    if c.final_wise_alpha < 1.0:
        bad.append(f"clip.final_wise_alpha={c.final_wise_alpha}")
    bad += [f"{u.where}.kwargs.l2_weight={u.kwargs['l2_weight']}" for u in uses if u.kwargs.get("l2_weight", 0) > 0]
    if not bad:
        return []
    return [f"lora.enabled=true cannot be combined with {', '.join(bad)} (they act on whole weights, not on LoRA "
            "factors); train all weights (lora.enabled=false) or drop them"]
