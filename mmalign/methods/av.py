"""The audio-visual task (``modality: av``): the generic :class:`~mmalign.methods.preference.PreferenceTask` over
the SF-CAVP-style family (:class:`~mmalign.adapters.av_family.AVFamily`) with the ``cavp`` row
(:mod:`mmalign.methods.av_losses`).

Building, clip data, scores and saving are the family's. What the task adds is open_clip's logit-scale clamp after
each optimizer step (both scales to [0, ln 100]), the one piece of per-step work of contrastive training. The
trained model is the reward of AVP-RPO (MultiSoundGen-style, arXiv 2509.19999): load it with
:func:`mmalign.models.cavp.load_sf_cavp` and score candidates with :func:`mmalign.adapters.av.cavp_scores`.
"""

from __future__ import annotations

import math

import torch

from ..adapters.av_family import AVFamily
from ..models.cavp import SFCAVP
from ..schema import TrainConfig
from .preference import PreferenceTask

__all__ = ["AVFamily", "AVTask"]

MAX_LOGIT_SCALE = math.log(100.0)


class AVTask(PreferenceTask):
    """The ``cavp`` row on an SF-CAVP model. ``model``: a prebuilt :class:`~mmalign.models.cavp.SFCAVP` (else built
    or loaded from the config)."""

    family_cls = AVFamily
    family: AVFamily

    def __init__(self, cfg: TrainConfig, *, model: SFCAVP | None = None):
        super().__init__(cfg, model=model)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Clamp both logit scales to [0, ln 100] after the optimizer step (open_clip's training loop)."""
        inner = getattr(self.model, "module", self.model)
        inner.logit_scale_slow.clamp_(0, MAX_LOGIT_SCALE)
        inner.logit_scale_fast.clamp_(0, MAX_LOGIT_SCALE)
