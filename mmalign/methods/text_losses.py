"""Names the text recipes used before the one table: the rows live in :data:`mmalign.methods.table.METHODS`
(shared by every model family); ``TEXT_METHODS`` is the view of the rows the causal-LM family can feed."""

from __future__ import annotations

from ..adapters.causal_lm_family import CausalLMFamily
from ..adapters.sparse_masks import SparseMaskHeads, TokenOptions
from .table import METHODS, Method, check_loss_kwargs, get_method, loss_options, ranking_order, sft_loss

__all__ = ["TEXT_METHODS", "UNLEARNING", "SparseMaskHeads", "TextMethod", "TokenOptions", "check_loss_kwargs",
           "get_text_method", "loss_options", "ranking_order", "sft_loss"]

TextMethod = Method
TEXT_METHODS: dict[str, Method] = {n: m for n, m in METHODS.items() if CausalLMFamily.refusal(m) is None}
UNLEARNING = {n for n, m in METHODS.items() if m.unlearning}


def get_text_method(name: str) -> Method:
    """The row ``name`` as the causal-LM family runs it (ConfigError naming the valid names otherwise)."""
    return get_method(name, CausalLMFamily)
