"""The vision-language task: the generic :class:`~mmalign.methods.preference.PreferenceTask` over the LVLM family
(:class:`~mmalign.adapters.lvlm_family.LVLMFamily`: tiny or loaded LLaVA, the encoder-free PatchLVLM), with any
row of :data:`~mmalign.methods.table.METHODS` the family can feed (DPO and its loss types, KTO, BCO, SimPO, ORPO,
CPO, SLiC, Plackett–Luce, NPO, SFT, ...) on TRL-style vision preference rows (:mod:`mmalign.data.vision_rows`).

PRIOR's token-weighted caption training is a recipe on this task (:class:`mmalign.methods.prior.PriorTask`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ..adapters.lvlm_family import LVLMFamily
from ..schema import TrainConfig
from .preference import PreferenceTask

__all__ = ["LVLMFamily", "LVLMTask"]


class LVLMTask(PreferenceTask):
    """Any METHODS row on an LVLM. ``tokenizer`` or ``model`` + ``inputs``: prebuilt parts (else built from the
    config). ``train_fn`` is accepted and unused (the PRIOR recipe of the same modality trains a reference run)."""

    family_cls = LVLMFamily
    _family_options: ClassVar[dict[str, Any]] = {}  # LVLMFamily build options of a recipe (PRIOR's)

    def __init__(self, cfg: TrainConfig, *, train_fn=None, tokenizer=None, model: nn.Module | None = None,
                 inputs=None):
        prebuilt = {"tokenizer": tokenizer} if model is None else {"model": model, "inputs": inputs}
        super().__init__(cfg, **prebuilt, **self._family_options)

    @property
    def tokenizer(self):
        return self.family.tokenizer

    @property
    def inputs(self):
        """The model's :class:`~mmalign.models.lvlm.LVLMInputs` (tokenizer, placeholder id and count, pixels)."""
        return self.family.inputs
