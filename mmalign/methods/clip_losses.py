"""The contrastive rows of the one METHODS table (:mod:`mmalign.methods.table`): how each composes
:mod:`mmalign.losses.contrastive` terms on the dual-encoder family's Scores
(:class:`~mmalign.adapters.contrastive_family.DualEncoderFamily`).

======================  =======================================================================================
``clip``                symmetric InfoNCE (open_clip ``ClipLoss``), normalised features
``siglip``              sigmoid loss (open_clip ``SigLipLoss``); needs a ``logit_bias`` (``clip.init_logit_bias``)
``clip_refine``         CLIP-Refine (Yamaguchi et al., CVPR 2025, arXiv 2504.12717): λ_cont·InfoNCE + λ_rand·RaFA +
                        λ_kd·HyCD. Defaults as the released config (``clip-refine.yaml`` + ``RandRegUpdater``):
                        λ_cont = 0 (logged, not optimised), λ_rand = λ_kd = 1, α = 0.5, T = 1, RaFA targets
                        N(0, 1) shared by the image and text of a pair and resampled every step, element-mean MSE,
                        raw (unnormalised) features, HyCD on raw dot products (s = 1)
``zscl``                ZSCL (Zheng et al., ICCV 2023, arXiv 2303.06628 [id recalled]): InfoNCE on the
                        image–caption data + feature distillation on reference images against frozen-teacher
                        text anchors (T = 2, image and text terms weight 1 as ``ZSCL.sh``), optional parameter L2
======================  =======================================================================================

Deviations (each also in the method's docstring): CLIP-Refine's contrastive term uses a *new* logit scale
initialised to 100 on raw features in the reference code; here it is the model's own scale on normalised features
(raw ViT features at s = 100 give logits in the thousands; the term has weight 0 by default either way).
With ``clip.normalize=true`` HyCD uses scaled cosine logits (the CLIP-KD form; which one the paper uses is
unverified), since unit-norm dot products at s = 1 give near-uniform teacher targets. ZSCL's task loss is
classification CE against class-name embeddings with label smoothing 0.2; for image–caption data it is InfoNCE
here. ZSCL's L2 (``--l2 1`` in ``ZSCL.sh``) is off by default (``l2_weight``) because its sum reduction scales
with the parameter count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError
from ..losses import LossOutput, combine
from ..losses.contrastive import clip_contrastive, hycd, modality_gap, rafa, siglip, zscl_distill
from ..types import Scores

# loss.kwargs of the rows (their defaults; the dual-encoder family refuses other keys). CLIP-Refine's are the
# released config's (clip-refine.yaml + RandRegUpdater), ZSCL's those of ZSCL.sh.
CLIP_REFINE_DEFAULTS = {
    "contrastive_weight": 0.0, "rafa_weight": 1.0, "hycd_weight": 1.0, "alpha": 0.5, "temperature": 1.0,
    "rafa_mean": 0.0, "rafa_std": 1.0, "rafa_distance": "mse", "share_targets": True,
}
ZSCL_DEFAULTS = {
    "contrastive_weight": 1.0, "image_weight": 1.0, "text_weight": 1.0, "temperature": 2.0, "divergence": "ce",
    "l2_weight": 0.0,
}
# The rows' ``why`` (they have no pure loss whose signature lists the options).
OPTIONS = "loss.kwargs are the row's defaults (mmalign.methods.clip_losses), checked by the dual-encoder family"


def _feats(s: Scores, name: str, global_: bool) -> Tensor:
    if global_ and f"{name}_all" in s.embeddings:
        return s.embeddings[f"{name}_all"]
    return s.embeddings[name]


def _local_rows(out: LossOutput, s: Scores, b: int) -> LossOutput:
    """Keep the loss (over the global batch) but report this rank's rows as per_example, so terms align."""
    if out.per_example.shape[0] == b:
        return out
    rank = int(s.extras["rank"])
    return LossOutput(out.loss, out.per_example[rank * b:(rank + 1) * b], out.metrics)


def local_clip_loss(image: Tensor, text: Tensor, image_all: Tensor, text_all: Tensor, scale: Tensor, rank: int,
                    *, normalize: bool) -> LossOutput:
    """open_clip ``ClipLoss(local_loss=True)``: this rank's B rows against the world·B gathered columns, labels
    offset by rank·B. (The loss engine's :func:`clip_contrastive` takes square logits only.)"""
    if normalize:
        image, text, image_all, text_all = (F.normalize(x.float(), dim=-1) for x in (image, text, image_all, text_all))
    b = image.shape[0]
    labels = torch.arange(b, device=image.device) + rank * b
    logits_i = scale * image.float() @ text_all.float().T
    logits_t = scale * text.float() @ image_all.float().T
    rows = 0.5 * (F.cross_entropy(logits_i, labels, reduction="none") + F.cross_entropy(logits_t, labels,
                                                                                        reduction="none"))
    loss = rows.mean()
    metrics = {"loss/clip": loss.detach(), "acc/i2t": (logits_i.argmax(-1) == labels).float().mean(),
               "acc/t2i": (logits_t.argmax(-1) == labels).float().mean(), "logit_scale": scale.detach()}
    return LossOutput(loss, rows, metrics)


def contrastive_term(s: Scores, *, normalize: bool, local_loss: bool = False) -> LossOutput:
    """InfoNCE over the (gathered) batch; per_example = this rank's rows."""
    img, txt, scale = s.embeddings["image"], s.embeddings["text"], s.extras["logit_scale"]
    if "image_all" in s.embeddings and local_loss:
        return local_clip_loss(img, txt, s.embeddings["image_all"], s.embeddings["text_all"], scale,
                               int(s.extras["rank"]), normalize=normalize)
    out = clip_contrastive(_feats(s, "image", True), _feats(s, "text", True), scale, normalize=normalize)
    return _local_rows(out, s, img.shape[0])


def siglip_term(s: Scores, *, normalize: bool) -> LossOutput:
    """SigLIP; multi-process, this rank's images against every rank's texts, the other ranks' blocks as
    negatives only — what open_clip's neighbour exchange sums, here from the all-gather."""
    if "logit_bias" not in s.extras:
        raise ConfigError("loss.name=siglip needs a model with logit_bias: set clip.init_logit_bias (e.g. -10) for "
                          "an open_clip model, or use a SigLIP checkpoint")
    img, txt = s.embeddings["image"], s.embeddings["text"]
    scale, bias = s.extras["logit_scale"], s.extras["logit_bias"]
    out = siglip(img, txt, scale, bias, normalize=normalize)
    if "text_all" not in s.embeddings:
        return out
    rank, b = int(s.extras["rank"]), img.shape[0]
    per_example, loss = out.per_example, out.loss
    for r, block in enumerate(s.embeddings["text_all"].split(b)):
        if r != rank:
            neg = siglip(img, block, scale, bias, negative_only=True, normalize=normalize)
            per_example, loss = per_example + neg.per_example, loss + neg.loss
    return LossOutput(loss, per_example, {**out.metrics, "loss/siglip": loss.detach()})


def geometry_metrics(s: Scores) -> dict[str, Tensor]:
    """Batch geometry logged every step: centroid gap on unit-norm features (over the batch dim) and the mean
    raw distance between paired features (CLIP-Refine's ``feat_gap``)."""
    img, txt = s.embeddings["image"].detach(), s.embeddings["text"].detach()
    return {"geometry/modality_gap": modality_gap(img, txt),
            "geometry/feat_gap": (img.float() - txt.float()).norm(dim=-1).mean()}


def _with_geometry(out: LossOutput, s: Scores) -> LossOutput:
    return LossOutput(out.loss, out.per_example, {**out.metrics, **geometry_metrics(s)})


# -- the rows' functions (METHODS: clip, siglip, clip_refine, zscl) ------------------------------------------------
# ``kw`` = the row's loss.kwargs plus what the dual-encoder family adds (its ``loss_kwargs``): ``normalize`` (feature
# normalisation of the run), ``local_loss`` (clip.local_loss), ``rafa_generator`` (device -> this rank's RaFA
# stream) and ``l2`` (() -> Σ‖θ − θ_0‖², ZSCL's parameter term). Teacher features come in Scores.extras.
def clip_row(s: Scores, reference, batch, kw: dict) -> LossOutput:
    """CLIP InfoNCE (open_clip ``ClipLoss``)."""
    return _with_geometry(contrastive_term(s, normalize=kw["normalize"], local_loss=kw["local_loss"]), s)


def siglip_row(s: Scores, reference, batch, kw: dict) -> LossOutput:
    """SigLIP (open_clip ``SigLipLoss``)."""
    return _with_geometry(siglip_term(s, normalize=kw["normalize"]), s)


def clip_refine_row(s: Scores, reference, batch, kw: dict) -> LossOutput:
    """CLIP-Refine on policy Scores with the teacher's features in ``s.extras["teacher_*"]``."""
    gen = kw["rafa_generator"](s.embeddings["image"].device)
    return _with_geometry(_clip_refine(s, kw, normalize=kw["normalize"], local_loss=kw["local_loss"],
                                       generator=gen), s)


def zscl_row(s: Scores, reference, batch, kw: dict, aux: Scores | None = None) -> LossOutput:
    """ZSCL; ``aux``: the policy's Scores of the reference images, with the teacher's image features and text
    anchors in ``aux.extras``."""
    l2 = kw["l2"]() if kw["l2_weight"] else None
    return _with_geometry(_zscl(s, kw, normalize=kw["normalize"], local_loss=kw["local_loss"], aux=aux, l2=l2), s)


def _clip_refine(s: Scores, kw: dict, *, normalize: bool, local_loss: bool,
                 generator: torch.Generator | None) -> LossOutput:
    """L = λ_cont·InfoNCE + λ_rand·RaFA + λ_kd·HyCD (CLIP-Refine; see the module docstring for the defaults)."""
    img, txt = s.embeddings["image"], s.embeddings["text"]
    rafa_out = rafa(img, txt, generator=generator, mean=kw["rafa_mean"], std=kw["rafa_std"],
                    share_targets=kw["share_targets"], distance=kw["rafa_distance"], normalize=normalize)
    scale = s.extras["logit_scale"] if normalize else None
    t_scale = s.extras.get("teacher_logit_scale") if normalize else None
    hycd_out = hycd(_feats(s, "image", True), _feats(s, "text", True), s.extras.get("teacher_image_all",
                    s.extras["teacher_image"]), s.extras.get("teacher_text_all", s.extras["teacher_text"]),
                    scale, teacher_logit_scale=t_scale, alpha=kw["alpha"], temperature=kw["temperature"],
                    normalize=normalize)
    cont = contrastive_term(s, normalize=True, local_loss=local_loss)
    return combine([("contrastive", kw["contrastive_weight"], cont), ("rafa", kw["rafa_weight"], rafa_out),
                    ("hycd", kw["hycd_weight"], _local_rows(hycd_out, s, img.shape[0]))])


def _zscl(s: Scores, kw: dict, *, normalize: bool, local_loss: bool, aux: Scores | None,
          l2: Tensor | None) -> LossOutput:
    """InfoNCE on the pairs + ZSCL distillation on reference images (only when the loop passes them: the
    loop's evaluation does not) + optional parameter L2 to the initial weights."""
    terms = [("contrastive", kw["contrastive_weight"], contrastive_term(s, normalize=normalize,
                                                                        local_loss=local_loss))]
    if aux is not None:
        # ZSCL L2-normalises all three embeddings whatever the task loss does, and uses the model's logit scale.
        zs = zscl_distill(aux.embeddings["image"], aux.extras["teacher_image"], aux.extras["teacher_anchors"],
                          s.extras["logit_scale"].detach(), temperature=kw["temperature"],
                          image_weight=kw["image_weight"], text_weight=kw["text_weight"],
                          divergence=kw["divergence"], normalize=True)
        terms.append(("zscl", 1.0, zs))
    if l2 is not None:
        terms.append(("l2", kw["l2_weight"], LossOutput(l2, l2.reshape(1), {})))
    return combine(terms)
