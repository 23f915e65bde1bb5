"""The ``clip:`` and ``prior:`` sections of a run config (``modality: clip`` / ``modality: prior``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def _h(text: str, default: Any = None, factory: Any = None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ClipConfig:
    """Contrastive (CLIP/SigLIP) post-pre-training: model source, image–caption data, teacher and averaging.

    Loss hyper-parameters (weights, α, T) live in ``loss.kwargs``; see :mod:`mmalign.methods.clip_losses`.
    """

    pretrained: str | None = _h("open_clip weights for a built-in model name in model.name_or_path (e.g. "
                                "ViT-B-32): a checkpoint file, or a pretrained tag where a hub is reachable")
    normalize: bool | None = _h("L2-normalise features before the losses; null: the method's reference default "
                                "(clip_refine: false, as CLIP-Refine's code; clip, siglip, zscl: true)")
    image_root: str | None = _h("directory that relative image paths are resolved against (default: the data "
                                "file's directory); COCO: the train2017/ folder")
    image_key: str | None = _h("image column (default: first of image, image_path, filepath, file_name)")
    caption_key: str | None = _h("caption column (default: first of caption, captions, title, text)")
    separator: str | None = _h("CSV/TSV separator (default: ',' for .csv, tab for .tsv)")
    group_by_image: bool = _h("rows naming the same image merge their captions (one random caption per image "
                              "per epoch)", True)
    check_images: bool = _h("decode every image when the data is loaded (bad files become row errors or are "
                            "skipped with data.skip_bad_rows); otherwise they are found when first read", False)
    ref_images: list[str] = _h("ZSCL reference images: image folders or image–caption files (captions ignored)",
                               factory=list)
    ref_texts: list[str] = _h("ZSCL reference sentences: .txt (one per line) or image–caption files",
                              factory=list)
    gather_with_grad: bool = _h("multi-process: all-gather features with gradients (open_clip "
                                "--gather-with-grad); else plain all-gather with the local slice re-inserted", True)
    local_loss: bool = _h("multi-process: local × global logits instead of the full global matrix on every "
                          "rank (open_clip --local-loss)", False)
    freeze_logit_scale: bool | None = _h("keep logit_scale (and logit_bias) fixed; null: the method's default "
                                         "(zscl: frozen, as ZSCL; clip_refine: frozen unless a loss uses it)")
    init_logit_bias: float | None = _h("siglip on an open_clip model without logit_bias: add one with this "
                                       "value (SigLIP paper: -10)")
    weight_average: Literal["none", "sma", "wise"] = _h(
        "ZSCL weight ensemble: running simple average of the weights every average_every steps (sma), or that "
        "mixed with the initial weights (wise); the average is what save_pretrained writes", "none")
    average_every: int = _h("steps between weight-average updates (ZSCL --avg_freq)", 100)
    wise_alpha: float = _h("wise: θ_avg ← α·SMA + (1−α)·θ_0 (ZSCL --we_wise_alpha)", 0.98)
    final_wise_alpha: float = _h("WiSE-FT of the saved model: α·θ + (1−α)·θ_0 (1: off)", 1.0)

    def validate(self) -> list[str]:
        errs = []
        if self.average_every < 1:
            errs.append(f"average_every={self.average_every} must be >= 1")
        for name in ("wise_alpha", "final_wise_alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                errs.append(f"{name}={getattr(self, name)} must lie in [0, 1]")
        if self.separator is not None and len(self.separator) != 1:
            errs.append(f"separator={self.separator!r} must be one character (',' or a tab)")
        return errs


@dataclass
class PriorConfig:
    """PRIOR (arXiv 2505.08971): LVLM next-token loss re-weighted by a text-only reference LM's probabilities.

    The weight formulas are UNVERIFIED (the paper's code is unreleased): see
    :func:`mmalign.losses.prior_token_weights` and :mod:`mmalign.methods.prior`.
    """

    enabled: bool = _h("false: plain next-token prediction through the same code path (no reference)", True)
    lvlm: Literal["llava", "patch"] = _h("tiny LVLM built when model.name_or_path=tiny: llava (CLIP vision tower + "
                                         "projector) or patch (no visual encoder: patches → Linear → LM); a "
                                         "checkpoint directory says which it is by itself", "llava")
    alpha: float = _h("weight sharpness α (0: uniform weights = NTP)", 1.0)
    form: Literal["one_minus_p", "surprisal", "inverse_p"] = _h(
        "weight of a caption token with reference probability p: (1−p)^α, (−log p)^α, or p^(−α) clipped at "
        "clip (UNVERIFIED which one the paper uses)", "one_minus_p")
    normalize: Literal["batch", "sequence", "none"] = _h(
        "rescale weights to mean 1 over the valid tokens of each micro-batch, of each caption, or not at all",
        "batch")
    clip: float | None = _h("upper bound of a raw weight (needed by form=inverse_p)", None)
    floor: float = _h("lower bound of a raw weight, so near-certain tokens (EOS, fixed phrases) keep some "
                      "signal", 0.0)
    reference_path: str | None = _h("a trained text-only reference LM (causal-LM checkpoint with the LVLM's "
                                    "tokenizer); null: train one on the captions first", None)
    reference_init: str = _h("start of the reference when it is trained here: 'lvlm' (the LVLM's own language "
                             "model; a tiny LVLM gets a fresh tiny LM of the same size) or a causal-LM directory",
                             "lvlm")
    reference_steps: int = _h("optimizer steps of the reference's SFT on the caption text", 200)
    reference_lr: float = _h("learning rate of the reference's SFT", 1e-3)
    reference_batch_size: int | None = _h("batch size of the reference's SFT and scoring (default run.batch_size)",
                                          None)
    reference_overrides: list[str] = _h("extra key=value overrides of the reference's text run (e.g. "
                                        "lora.enabled=true, model.dtype=bfloat16)", factory=list)
    cache_dir: str | None = _h("per-caption weight cache (default <output_dir>/prior_cache); keyed by caption, "
                               "reference-model hash and weight settings", None)
    prompt: str = _h("text between the image and the caption for rows without a 'prompt'", "")
    image_field: str = _h("image column (a path, relative to image_root or the data file's folder)", "image")
    caption_field: str = _h("caption column (LLaVA 'conversations' rows are read too)", "caption")
    image_root: str | None = _h("folder relative image paths start from (default: the data file's folder)", None)
    verify_images: bool = _h("open every image when the data is read (bad files become row errors)", True)
    freeze_vision_tower: bool = _h("keep the image encoder frozen and out of LoRA (LLaVA's recipe; for the "
                                   "preference losses also the PatchLVLM patch embedding, which PRIOR always trains)",
                                   True)
    modules_to_save: list[str] = _h("LLaVA with LoRA: modules trained in full beside the adapter",
                                    factory=lambda: ["multi_modal_projector"])

    def validate(self) -> list[str]:
        import math

        errs = []
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            errs.append(f"alpha={self.alpha} must be a finite number >= 0")
        if not (math.isfinite(self.floor) and self.floor >= 0):
            errs.append(f"floor={self.floor} must be a finite number >= 0")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0 and self.clip >= self.floor):
            errs.append(f"clip={self.clip} must be null or a finite number > 0 and >= floor={self.floor}")
        if self.form == "inverse_p" and self.clip is None:
            errs.append("clip is null but form=inverse_p: 1/p is unbounded; set clip (e.g. 10)")
        if self.reference_steps < 1:
            errs.append(f"reference_steps={self.reference_steps} must be >= 1")
        if not self.reference_lr > 0:
            errs.append(f"reference_lr={self.reference_lr} must be > 0")
        if self.reference_batch_size is not None and self.reference_batch_size < 1:
            errs.append(f"reference_batch_size={self.reference_batch_size} must be >= 1 or null")
        return errs
