"""Offline tokenizers for tests and demos: a byte-level BPE trained in-process, nothing downloaded.

:func:`train_bpe_tokenizer` returns a ``transformers`` fast tokenizer that behaves like a small real
checkpoint's: pad/bos/eos/unk are set, plain text gets ``<bos>`` prepended (as Llama-style tokenizers do, so
the first completion token of a prompt-less row can still be scored), and a Jinja chat template renders
conversations with added special role tokens so TRL-style conversational rows work.
``save_pretrained(dir)`` then ``AutoTokenizer.from_pretrained(dir)`` gives back the same tokenizer, the path
real checkpoints take.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Role markers are added special tokens, so a role never merges with the text around it and the template
# renders to the same ids whatever the message content is.
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# `<bos>` once, then `<|role|>content` per message; assistant turns end with `<eos>` so a chat completion
# carries its own stop token (the text encoder adds EOS only to plain-string completions, as TRL does).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_BYTE_ALPHABET_SIZE = 256
# The BPE trainer's cost grows with the square of a pre-token's length, and the byte-level pre-tokenizer keeps a
# run of letters (or of symbols) as one pre-token: three 1 MB strings without spaces took ~17 minutes. Runs longer than
# this are cut into pieces of this length before training; text without such runs is passed through unchanged, so
# ordinary corpora train exactly as before.
_MAX_RUN = 256
_LONG_RUN = re.compile(rf"(\S{{{_MAX_RUN + 1},}})")


def _bounded_runs(texts: Iterable[str]) -> list[str]:
    """``texts`` with every non-whitespace run longer than ``_MAX_RUN`` characters cut into separate pieces."""
    out = []
    for text in texts:
        if not _LONG_RUN.search(text):
            out.append(text)
            continue
        for part in _LONG_RUN.split(text):  # odd positions hold the long runs
            if _LONG_RUN.fullmatch(part):
                out += [part[i:i + _MAX_RUN] for i in range(0, len(part), _MAX_RUN)]
            elif part:
                out.append(part)
    return out


def train_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 512,
    special_tokens: Sequence[str] = ("<pad>", "<bos>", "<eos>", "<unk>"),
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    min_frequency: int = 2,
    model_max_length: int = 4096,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``transformers`` fast tokenizer.

    Deterministic: the same texts in the same order give the same vocabulary and merges. Every byte is in the
    base alphabet, so any string encodes without ``<unk>``.

    Args:
        texts: training corpus (any iterable of strings; consumed once).
        vocab_size: final vocabulary size including the 256 byte symbols and all special tokens.
        special_tokens: ``(pad, bos, eos, unk)`` in that order; they take ids 0..3. The role tokens of the
            chat template (:data:`ROLE_TOKENS`) are added after them.
        chat_template: Jinja template stored on the tokenizer (``None``: no template, conversational rows are
            then refused by the text encoder).
        min_frequency: a pair must occur this often to be merged.
        model_max_length: recorded on the tokenizer; the text encoder has its own ``max_length``.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``pad_token``, ``bos_token``, ``eos_token``, ``unk_token`` and
        ``chat_template`` set.
    """
    special_tokens = tuple(special_tokens)
    if len(special_tokens) != 4 or len(set(special_tokens)) != 4:
        raise ValueError(
            f"special_tokens must be 4 distinct strings (pad, bos, eos, unk), got {special_tokens!r}; "
            "fix: pass e.g. ('<pad>', '<bos>', '<eos>', '<unk>')"
        )
    all_special = list(special_tokens) + [t for t in ROLE_TOKENS if t not in special_tokens]
    min_vocab = _BYTE_ALPHABET_SIZE + len(all_special)
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} is below the {_BYTE_ALPHABET_SIZE} byte symbols plus "
            f"{len(all_special)} special tokens; fix: use vocab_size >= {min_vocab}"
        )
    pad, bos, eos, unk = special_tokens

    tok = Tokenizer(models.BPE(unk_token=unk))
    # add_prefix_space=False: " 3" and "3" stay distinct, so a completion tokenised on its own keeps the
    # leading space it has in the data (the text encoder tokenises prompt and completion separately).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=all_special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_bounded_runs(texts), trainer=trainer)
    # Plain text gets <bos> in front (add_special_tokens=True), like Llama-family tokenizers.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A $B",
        special_tokens=[(bos, tok.token_to_id(bos))],
    )

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        additional_special_tokens=[t for t in all_special if t not in special_tokens],
        model_max_length=model_max_length,
    )
    if chat_template is not None:
        hf_tok.chat_template = chat_template
    return hf_tok
