"""Token ids of a chat prompt, whatever ``apply_chat_template(tokenize=True)`` returns.

transformers 4 returned a ``list[int]`` (or a ``dict`` with ``return_dict=True``); transformers 5 returns a
``BatchEncoding`` by default, which is a ``UserDict`` and not a ``dict``, so ``list(out)`` gave the key names
(``['input_ids', 'attention_mask']``) and generation failed with ``too many dimensions 'str'``. Every caller that
tokenises chat messages for generation or scoring goes through :func:`chat_prompt_ids`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["chat_prompt_ids", "ids_of"]


def ids_of(out: Any) -> list[int]:
    """A flat ``list[int]`` from a tokenizer output: a list (or a batch of one), a mapping / ``BatchEncoding``
    holding ``input_ids``, or a tensor / array of shape ``[T]`` or ``[1, T]``."""
    if isinstance(out, Mapping) or (hasattr(out, "keys") and hasattr(out, "__getitem__")):
        out = out["input_ids"]
    if hasattr(out, "tolist"):  # torch tensor, numpy array
        out = out.tolist()
    if isinstance(out, Sequence) and not isinstance(out, str) and len(out) == 1 and isinstance(out[0], Sequence):
        out = out[0]
    ids = list(out)
    bad = [x for x in ids if isinstance(x, bool) or not isinstance(x, int)]
    if bad:
        raise TypeError(f"expected token ids (ints); got {bad[:3]!r} from {type(out).__name__}")
    return ids


def chat_prompt_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True, **kwargs) -> list[int]:
    """Token ids of ``messages`` rendered by ``tokenizer``'s chat template (``kwargs`` go to
    ``apply_chat_template``, e.g. ``chat_template=``), ending with the generation prompt by default."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        **kwargs)
    return ids_of(out)
