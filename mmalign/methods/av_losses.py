"""The ``cavp`` row of the one METHODS table: the SF-CAVP-style objective on the audio-visual family's Scores
(:mod:`mmalign.adapters.av`).

MultiSoundGen-style (arXiv 2509.19999, no public code; research note §2.2 [inferred]) on Diff-Foley's CAVP loss
forms (arXiv 2306.17203, ``training/open_cavp_main/src/open_clip/loss.py``, §2.3):

    L = slow_weight·L_slow + intra_weight·L_intra + temporal_weight·L_temporal

- ``L_slow`` (inter-sample, slow stream): symmetric InfoNCE over the (gathered) batch
  (:func:`mmalign.losses.clip_contrastive`). ``semantic="mean"``: one embedding per video, the re-normalised mean of
  its clips' slow embeddings (``ClipLoss_Temporal_Semantic``'s semantic term on pooled features); ``"clips"``: all
  B·C clips, the other clips of a video being negatives too (``ClipLoss_Intra_Contrast``'s extra term). Scale: the
  slow logit scale.
- ``L_intra`` (intra-video, fast stream): :func:`mmalign.losses.cavp_intra_contrastive` on the C time-shifted
  clips of each video (``ClipLoss_Intra_Contrast``'s intra term), clip embedding = re-normalised mean over time of
  the fast embeddings; 0 when C = 1.
- ``L_temporal`` (per-time-step, fast stream): the same C×C form on the T time steps of each clip (label = same
  time index: ``ClipLoss_Temporal_Semantic``'s temporal term), averaged over the clips of a video.

Deviations: Diff-Foley computes every term from one embedding per clip with one logit scale; here the slow and fast
streams are separate embeddings with their own scales (the SF design). Weights default to 1 (the launch script's
intra weight and ``--temporal_mix_weight 1``). per_example = this rank's videos; multi-process, ``L_slow`` spans the
gathered batch (open_clip ``local_loss=False``), the fast terms are local (a video never spans ranks).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..adapters.av import SEMANTIC
from ..losses import LossOutput, cavp_intra_contrastive, clip_contrastive, combine
from ..types import Scores

__all__ = ["CAVP_DEFAULTS", "OPTIONS", "SEMANTIC", "cavp_row"]

CAVP_DEFAULTS = {"slow_weight": 1.0, "intra_weight": 1.0, "temporal_weight": 1.0, "semantic": "mean"}
OPTIONS = "loss.kwargs are the row's defaults (mmalign.methods.av_losses), checked by the audio-visual family"


def _local(out: LossOutput, rows: Tensor, b: int, rank: int) -> LossOutput:
    """Keep the (global) loss, report this rank's ``b`` videos as per_example."""
    return LossOutput(out.loss, rows[rank * b:(rank + 1) * b], out.metrics)


def slow_term(s: Scores, semantic: str = "mean") -> LossOutput:
    """``L_slow`` (module docstring) over the gathered batch when Scores carry ``*_all``."""
    vs = s.embeddings.get("video_slow_all", s.embeddings["video_slow"])
    as_ = s.embeddings.get("audio_slow_all", s.embeddings["audio_slow"])
    b, c = s.embeddings["video_slow"].shape[:2]
    rank = int(s.extras["rank"]) if "rank" in s.extras else 0
    scale = s.extras["logit_scale_slow"]
    if semantic == "mean":
        out = clip_contrastive(F.normalize(vs.float().mean(1), dim=-1), F.normalize(as_.float().mean(1), dim=-1),
                               scale)
        return _local(out, out.per_example, b, rank)
    if semantic != "clips":
        raise ValueError(f"semantic={semantic!r} is not one of {list(SEMANTIC)}")
    out = clip_contrastive(vs.flatten(0, 1), as_.flatten(0, 1), scale)
    return _local(out, out.per_example.view(-1, c).mean(1), b, rank)


def intra_term(s: Scores) -> LossOutput:
    """``L_intra``: clips of one video against each other, on the time-pooled fast embeddings."""
    vf = F.normalize(s.embeddings["video_fast"].float().mean(2), dim=-1)
    af = F.normalize(s.embeddings["audio_fast"].float().mean(2), dim=-1)
    return cavp_intra_contrastive(vf, af, s.extras["logit_scale_fast"])


def temporal_term(s: Scores) -> LossOutput:
    """``L_temporal``: time steps of one clip against each other; per_example = mean over a video's clips."""
    vf, af = s.embeddings["video_fast"], s.embeddings["audio_fast"]
    b, c = vf.shape[:2]
    out = cavp_intra_contrastive(vf.flatten(0, 1), af.flatten(0, 1), s.extras["logit_scale_fast"])
    metrics = {k.replace("intra", "temporal"): v for k, v in out.metrics.items()}
    return LossOutput(out.loss, out.per_example.view(b, c).mean(1), metrics)


def cavp_row(s: Scores, reference, batch, kw: dict) -> LossOutput:
    """The ``cavp`` row: weighted slow / intra / temporal terms (module docstring); ``kw``: the row's options."""
    out = combine([("slow", kw["slow_weight"], slow_term(s, kw["semantic"])),
                   ("intra", kw["intra_weight"], intra_term(s)),
                   ("temporal", kw["temporal_weight"], temporal_term(s))])
    out.metrics["logit_scale_slow"] = s.extras["logit_scale_slow"].detach()
    out.metrics["logit_scale_fast"] = s.extras["logit_scale_fast"].detach()
    return out
