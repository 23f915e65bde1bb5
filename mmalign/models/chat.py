"""Token ids of a chat prompt, whatever ``apply_chat_template(tokenize=True)`` returns.

transformers 4 returned a ``list[int]`` (or a ``dict`` with ``return_dict=True``); transformers 5 returns a
``BatchEncoding`` by default, which is a ``UserDict`` and not a ``dict``, so ``list(out)`` gave the key names
(``['input_ids', 'attention_mask']``) and generation failed with ``too many dimensions 'str'``. Every caller that
tokenises chat messages for generation or scoring goes through :func:`chat_prompt_ids`.

:func:`set_chat_template` puts a user's template (``data.chat_template``, ``--chat-template``: a Jinja string or
a file holding one) on the tokenizer once, where it is built: training, generation, pair making and the saved
``final/`` tokenizer then all use it, with no per-call argument to forget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["chat_prompt_ids", "ids_of", "looks_like_template", "read_chat_template", "set_chat_template"]


def looks_like_template(value: str) -> bool:
    """A Jinja template string (has a ``{%`` or ``{{`` tag) rather than a path to a file holding one."""
    return "{%" in value or "{{" in value


def read_chat_template(value: str | None, *, where: str = "data.chat_template") -> str | None:
    """The template text of ``value`` (a Jinja string, or a path to a file holding one), checked to compile."""
    if value is None:
        return None
    text = value
    if not looks_like_template(value):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"{where}={value!r} is neither a Jinja template (no '{{%' or '{{{{' tag) nor an "
                              "existing file; fix: give the template text or the path of a .jinja file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}={value!r}: cannot read the template file ({e}); fix: give a UTF-8 text "
                              "file") from None
        if not looks_like_template(text):
            raise ConfigError(f"{where}={value!r}: the file holds no Jinja tag ('{{%' or '{{{{'); fix: point to "
                              "a chat template such as a tokenizer_config.json's chat_template")
    try:
        import jinja2

        jinja2.Environment().parse(text)
    except ImportError:  # pragma: no cover - jinja2 comes with transformers
        pass
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{where}: the template does not parse (line {e.lineno}: {e.message}); fix: repair "
                          "the Jinja syntax") from None
    return text


def set_chat_template(tokenizer, value: str | None, *, where: str = "data.chat_template"):
    """``tokenizer`` with its ``chat_template`` replaced by ``value`` (unchanged when None); returns it."""
    text = read_chat_template(value, where=where)
    if text is not None:
        tokenizer.chat_template = text
    return tokenizer


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
