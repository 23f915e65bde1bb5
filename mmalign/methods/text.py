"""The text task: the generic :class:`~mmalign.methods.preference.PreferenceTask` over the causal-LM family
(:class:`~mmalign.adapters.causal_lm_family.CausalLMFamily`), with any row of
:data:`~mmalign.methods.table.METHODS` the family can feed.

``model.name_or_path: tiny`` builds a random tiny Llama and trains a byte-level BPE tokenizer on the run's
own data, so everything works offline on a laptop CPU; any other value is a checkpoint loaded with
``from_pretrained`` (the same path users take for Qwen/Llama checkpoints).

The text recipes (online DPO/XPO, sequence-level contrastive training, token guidance) subclass
:class:`TextTask` and override its hooks; the family is built once, here.
"""

from __future__ import annotations

from torch import nn

from ..adapters.causal_lm_family import MASK_HEADS, CausalLMFamily, build_model, build_tokenizer
from ..schema import TrainConfig
from .preference import PreferenceTask

__all__ = ["MASK_HEADS", "CausalLMFamily", "TextTask", "build_model", "build_tokenizer"]


class TextTask(PreferenceTask):
    """Any METHODS row on a causal LM. ``tokenizer`` / ``model``: prebuilt parts (else built from the config)."""

    family_cls = CausalLMFamily

    def __init__(self, cfg: TrainConfig, *, tokenizer=None, model: nn.Module | None = None):
        super().__init__(cfg, tokenizer=tokenizer, model=model)

    @property
    def tokenizer(self):
        return self.family.tokenizer

    @property
    def mask_heads(self):
        """SparsePO's learned mask heads (a submodule of the policy), or None."""
        return self.family.mask_heads
