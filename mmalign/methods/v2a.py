"""The v2a task: the generic :class:`~mmalign.methods.preference.PreferenceTask` over the video-to-audio family
(:class:`~mmalign.adapters.v2a_family.V2AFamily`) for ``modality: v2a``.

Every row of :data:`~mmalign.methods.table.METHODS` the family can feed runs here on video → audio rows:
conditional flow matching (``sft`` on ``{"video", "audio"}`` rows: MMAudio-style pre-training, arXiv 2412.15322),
flow DPO on ``{"video", "chosen", "rejected"}`` pairs (``dpo``; MultiSoundGen's AVP-RPO trains this on
reward-ranked pairs, arXiv 2509.19999), NPO (``npo_diffusion``), KTO / BCO on labelled audio, Plackett–Luce on
ranked lists, and the other sequence-score losses, all on ``logps = −c·(velocity MSE)``. Stages chain them
(pre-train, then DPO with the reference re-anchored).
"""

from __future__ import annotations

from ..adapters.v2a_family import DEFAULT_BETA, V2AFamily
from ..schema import TrainConfig
from .preference import PreferenceTask

__all__ = ["DEFAULT_BETA", "V2AFamily", "V2ATask"]


class V2ATask(PreferenceTask):
    """Any METHODS row on a video-to-audio generator. ``components``: prebuilt ``V2AComponents`` (else built from
    the config)."""

    family_cls = V2AFamily

    def __init__(self, cfg: TrainConfig, *, components=None):
        super().__init__(cfg, components=components)

    @property
    def components(self):
        return self.family.components

    @property
    def adapter(self):
        return self.family.adapter
