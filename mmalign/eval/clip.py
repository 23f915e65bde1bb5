"""CLIP evaluation: embedding geometry, zero-shot classification and image–text retrieval.

Metrics (all on L2-normalised embeddings):

- ``modality_gap``: ‖mean_i x̂_i − mean_j ŷ_j‖₂, centroids taken over the **batch** dimension (Liang et al. 2022,
  arXiv 2203.02053). CLIP-Refine's base updater averages over the feature dimension instead, a known bug; its
  ``RandRegUpdater`` logs the centroid MSE, reported here as ``modality_gap_mse`` (= gap² / D).
- ``alignment``: mean ‖x̂_i − ŷ_i‖² over positive pairs; ``uniformity``: log E exp(−2‖·‖²) over all image and text
  embeddings together (Wang & Isola 2020, arXiv 2005.10242; CLIP-Refine's definitions).
- ``zeroshot/top1`` (and ``top5`` with ≥ 5 classes): class embeddings = normalised mean of the normalised template
  embeddings (CLIP's prompt ensembling); prediction = argmax cosine. Label *i* is the class name paired with
  folder *i* by :func:`~mmalign.data.image_text.load_zeroshot` (by name or an explicit map, never an implied
  order that could be ambiguous).
- ``retrieval``: image→text recall@k is 1 for an image when any of its captions is among the k texts nearest to
  it; text→image recall@k is 1 when the caption's image is among the k nearest images (CLIP-benchmark's "recall",
  i.e. hit@k per query).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from ..adapters.contrastive import encode_images, encode_texts
from ..losses.contrastive import alignment, modality_gap, uniformity

KS = (1, 5, 10)


@torch.no_grad()
def embed_images(model: nn.Module, images: list, transform, *, batch_size: int = 64, device="cpu",
                 load=None) -> Tensor:
    """Normalised image embeddings ``[N, D]``; ``images`` are PIL images, paths, or items that ``load`` opens
    (decoded one batch at a time)."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        load_one = load or (lambda im: im if isinstance(im, Image.Image) else _open(im))
        chunk = [load_one(im) for im in images[i:i + batch_size]]
        px = torch.stack([transform(im) for im in chunk]).to(device)
        out.append(encode_images(model, px, normalize=True).float().cpu())
    return torch.cat(out)


def _open(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


@torch.no_grad()
def embed_texts(model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 256, device="cpu") -> Tensor:
    """Normalised text embeddings ``[M, D]``."""
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenizer(texts[i:i + batch_size])
        out.append(encode_texts(model, ids.to(device), mask.to(device), normalize=True).float().cpu())
    return torch.cat(out)


def geometry_metrics(image: Tensor, text: Tensor) -> dict[str, float]:
    """Gap, alignment, uniformity of paired ``[N, D]`` embeddings (normalised here)."""
    img = torch.nn.functional.normalize(image.float(), dim=-1)
    txt = torch.nn.functional.normalize(text.float(), dim=-1)
    gap = float(modality_gap(img, txt))
    return {"modality_gap": gap, "modality_gap_mse": gap**2 / img.shape[-1], "alignment": float(alignment(img, txt)),
            "uniformity": float(uniformity(torch.cat([img, txt])))}


def retrieval_metrics(image: Tensor, text: Tensor, text_to_image: Tensor, ks=KS) -> dict[str, float]:
    """Recall@k both ways; ``text_to_image[j]`` is the index of caption j's image."""
    sims = image.float() @ text.float().T  # [N, M]
    n, m = sims.shape
    out = {}
    positive = torch.zeros(n, m, dtype=torch.bool)
    positive[text_to_image, torch.arange(m)] = True
    for k in ks:
        ki, kt = min(k, m), min(k, n)
        top_t = sims.topk(ki, dim=1).indices  # texts nearest to each image
        out[f"i2t_recall@{k}"] = float(positive.gather(1, top_t).any(1).float().mean())
        top_i = sims.T.topk(kt, dim=1).indices  # images nearest to each text
        out[f"t2i_recall@{k}"] = float((top_i == text_to_image[:, None]).any(1).float().mean())
    return out


def zeroshot_classifier(model: nn.Module, tokenizer, classnames: list[str], templates: list[str], *,
                        device="cpu") -> Tensor:
    """``[C, D]`` class embeddings: per class, the normalised mean of its normalised template embeddings."""
    texts = [t.format(c) for c in classnames for t in templates]
    emb = embed_texts(model, tokenizer, texts, device=device).view(len(classnames), len(templates), -1)
    return torch.nn.functional.normalize(emb.mean(1), dim=-1)


def zeroshot_accuracy(image: Tensor, labels: Tensor, classes: Tensor) -> dict[str, float]:
    logits = image.float() @ classes.float().T
    out = {"zeroshot/top1": float((logits.argmax(1) == labels).float().mean())}
    if classes.shape[0] >= 5:
        out["zeroshot/top5"] = float((logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean())
    return out


def evaluate_clip(model: nn.Module, tokenizer, transform, *, pairs=None, zeroshot=None, batch_size: int = 64,
                  device="cpu", tables=None) -> dict[str, float]:
    """Everything above for a model: ``pairs`` = image–caption records (:func:`~mmalign.data.image_text.
    load_image_text`), ``zeroshot`` = a :class:`~mmalign.data.image_text.ZeroShotSet`. Geometry uses each image's
    first caption; retrieval uses all captions."""
    from ..data.image_text import open_image
    from ..data.rows import DataError

    model = model.to(device).eval()
    out: dict[str, float] = {}
    if pairs:
        img = embed_images(model, pairs, transform, batch_size=batch_size, device=device,
                           load=lambda rec: open_image(rec, tables or []))
        texts = [c for rec in pairs for c in rec.captions]
        owner = torch.tensor([i for i, rec in enumerate(pairs) for _ in rec.captions])
        txt = embed_texts(model, tokenizer, texts, device=device)
        first = torch.tensor([int((owner == i).nonzero()[0]) for i in range(len(pairs))])
        out.update(geometry_metrics(img, txt[first]))
        out.update(retrieval_metrics(img, txt, owner))
        out["pairs/images"], out["pairs/captions"] = float(len(pairs)), float(len(texts))
    if zeroshot is not None:
        if zeroshot.labels and not 0 <= min(zeroshot.labels) <= max(zeroshot.labels) < len(zeroshot.classnames):
            raise DataError(f"{zeroshot.root}: labels run {min(zeroshot.labels)}..{max(zeroshot.labels)} but there "
                            f"are {len(zeroshot.classnames)} class names; fix: build the set with load_zeroshot, "
                            "which pairs names with folders by name or an explicit `folder: name` map")
        img = embed_images(model, zeroshot.paths, transform, batch_size=batch_size, device=device)
        classes = zeroshot_classifier(model, tokenizer, zeroshot.classnames, zeroshot.templates, device=device)
        out.update(zeroshot_accuracy(img, torch.tensor(zeroshot.labels), classes))
        out["zeroshot/images"], out["zeroshot/classes"] = float(len(zeroshot.paths)), float(len(zeroshot.classnames))
    return out


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per metric, one column per model."""
    names = list(results)
    metrics = sorted({k for r in results.values() for k in r})
    rows = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in metrics:
        vals = [results[n].get(m) for n in names]
        cells = ["" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}" for v in vals]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_json(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return path
