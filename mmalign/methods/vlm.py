"""The vision-language task for images and video: the generic :class:`~mmalign.methods.preference.PreferenceTask`
over the VLM family (:class:`~mmalign.adapters.vlm_family.VLMFamily`: Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision,
LLaVA-NeXT-Video, tiny or loaded), with any row of :data:`~mmalign.methods.table.METHODS` the family can feed
(DPO and its loss types, IPO, KTO, BCO, SimPO, ORPO, CPO, SLiC, Plackett–Luce, NPO, SFT, ...) on TRL / ms-swift /
TEMPLE rows with images and videos (:mod:`mmalign.data.vlm_rows`).

TEMPLE (arXiv 2503.16929) is this task with its pairs (``mmalign temple-pairs``), a curriculum of stages over
perturbation magnitudes with ``merge_lora`` / ``reanchor_reference`` between them, and an SFT stage after
(``configs/vlm/qwen2.5-vl-7b_temple_lora.yaml``).
"""

from __future__ import annotations

from torch import nn

from ..adapters.vlm_family import VLMFamily
from ..schema import TrainConfig
from .preference import PreferenceTask

__all__ = ["VLMFamily", "VLMTask"]


class VLMTask(PreferenceTask):
    """Any METHODS row on a VLM. ``tokenizer`` (for a tiny model) or ``model`` + ``inputs`` (its
    :class:`~mmalign.models.vlm.VLMInputs`): prebuilt parts; else built from the config."""

    family_cls = VLMFamily

    def __init__(self, cfg: TrainConfig, *, tokenizer=None, model: nn.Module | None = None, inputs=None):
        prebuilt = {"tokenizer": tokenizer} if model is None else {"model": model, "inputs": inputs}
        super().__init__(cfg, **prebuilt)

    @property
    def tokenizer(self):
        return self.family.tokenizer

    @property
    def inputs(self):
        """The model's :class:`~mmalign.models.vlm.VLMInputs` (arch and processor)."""
        return self.family.inputs
