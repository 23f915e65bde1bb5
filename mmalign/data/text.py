"""Text rows -> token ids -> :class:`~mmalign.data.batches.TextBatch`.

:class:`TextEncoder` tokenises one record (any format of :mod:`mmalign.data.rows`) into a prompt and K
completions; :func:`collate` pads a list of them into a batch; :func:`build_text_dataset` runs the whole path
(load -> validate -> encode) and returns the counts that belong in the training logs.

Tokenisation (and where it differs from TRL):

- **Plain rows**: the prompt is tokenised with the tokenizer's special tokens (BOS for Llama-style
  tokenizers), each completion on its own without them, and EOS is appended to completions (TRL does the same
  for non-chat rows). TRL tokenises ``prompt + completion`` as one string and splits at the common prefix;
  tokenising apart keeps the prompt an exact prefix that matches what the model sees at generation time, at
  the cost of a possibly different merge across the prompt/completion boundary.
- **Conversational rows** go through ``tokenizer.apply_chat_template``: the prompt with
  ``add_generation_prompt=True``; a completion is the text the template renders for ``prompt + completion``
  *after* the rendered prompt, tokenised on its own (so it carries the template's end-of-turn tokens). When
  the template renders the prompt differently inside the full conversation (thinking templates, some tool
  templates) the rendered prompt is not a prefix; the completion is then the assistant content plus EOS,
  tokenised after the templated prompt, and ``TruncationStats.template_mismatches`` counts it.
- A prompt that tokenises to nothing gets the BOS token (or the row is refused if there is none): the first
  completion token must be predicted from something.

Truncation, applied when ``len(prompt) + len(longest completion) > max_length``:

- ``"keep_end_of_prompt"`` (default): the prompt loses its oldest tokens, only as many as needed but keeping
  at least ``max_prompt_length`` of them (default ``max_length // 2``; a leading BOS stays); then completions
  lose their last tokens to fit. No row is ever dropped.
- ``"keep_start"`` (TRL's default): the prompt is kept whole and completions are cut from the right; a row
  whose prompt alone fills ``max_length`` has nothing left to score and raises
  :class:`~mmalign.data.rows.DataError` (with ``skip_bad_rows=True`` it is dropped and counted instead).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmalign.data.rows import (
    NUMERIC_META,
    DataError,
    PairRow,
    RankedRow,
    Record,
    RowProblem,
    load_rows,
    parse_rows,
)

from .batches import TextBatch
from .row_files import HubOptions

TRUNCATION_MODES = ("keep_end_of_prompt", "keep_start")


@dataclass
class EncodedExample:
    """One tokenised record: a prompt, K completions, one label per completion (see ``TextBatch.labels``)."""

    prompt_ids: list[int]
    completions: list[list[int]]
    labels: list[float]
    meta: dict[str, Any]


@dataclass
class TruncationStats:
    """Counters for the logs: prompts cut, completions cut, rows dropped, chat-template fallbacks."""

    prompts_truncated: int = 0
    completions_truncated: int = 0
    rows_dropped: int = 0
    template_mismatches: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class TextEncoder:
    """Tokenise records into :class:`EncodedExample` s (see the module docstring for the rules).

    Args:
        tokenizer: a ``transformers`` tokenizer.
        max_length: budget for ``prompt + each completion`` in tokens; ``None`` disables truncation.
        max_prompt_length: with ``keep_end_of_prompt``, the fewest prompt tokens kept when a row is over
            budget (default ``max_length // 2``). Not used by ``keep_start``.
        truncation: ``"keep_end_of_prompt"`` or ``"keep_start"``.
        add_eos: append EOS to plain-string completions (chat completions get the template's end of turn).
        chat_template: Jinja template overriding the tokenizer's own, for conversational rows.
        skip_bad_rows: drop rows that cannot be encoded (``encode`` returns ``None``) and count them in
            ``dropped`` instead of raising.
    """

    def __init__(self, tokenizer: Any, *, max_length: int | None = 1024, max_prompt_length: int | None = None,
                 truncation: str = "keep_end_of_prompt", add_eos: bool = True,
                 chat_template: str | None = None, skip_bad_rows: bool = False):
        errors = []
        if truncation not in TRUNCATION_MODES:
            errors.append(f"truncation={truncation!r} is not one of {list(TRUNCATION_MODES)}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            errors.append(f"max_length={max_length!r} must be None or an int >= 2")
        if max_prompt_length is not None:
            if truncation == "keep_start":
                errors.append("max_prompt_length only applies to truncation='keep_end_of_prompt' (keep_start "
                              "never cuts the prompt); drop it or change the truncation mode")
            elif not isinstance(max_prompt_length, int) or max_prompt_length < 1 or (
                    max_length is not None and max_prompt_length >= max_length):
                errors.append(f"max_prompt_length={max_prompt_length!r} must be an int in [1, max_length) "
                              "so that completions keep at least one token")
        if add_eos and tokenizer.eos_token_id is None:
            errors.append("add_eos=True but the tokenizer has no eos_token; set tokenizer.eos_token or pass "
                          "add_eos=False")
        if errors:
            raise ValueError("TextEncoder: " + "; ".join(errors))
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.add_eos = add_eos
        self.chat_template = chat_template
        self.skip_bad_rows = skip_bad_rows
        self.stats = TruncationStats()
        self.dropped: Counter = Counter()

    def encode(self, record: Record) -> EncodedExample | None:
        """Tokenise and truncate one record; ``None`` when it was dropped (only with ``skip_bad_rows``)."""
        if record.is_conversational:
            prompt_ids, completions = self._encode_chat(record)
        else:
            prompt_ids, completions = self._encode_plain(record)
        if not prompt_ids:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                return self._bad(record, "empty_prompt", "prompt", record.prompt,
                                 "tokenises to no tokens and the tokenizer has no BOS token",
                                 "give every row a non-empty prompt")
            prompt_ids = [bos]
        for k, ids in enumerate(completions):
            if not ids:
                field = _candidate_field(record, k)
                return self._bad(record, "empty_completion", field, record.candidates[k],
                                 "tokenises to no tokens", "give the row a non-empty completion")
        prompt_ids, completions = self._truncate(record, prompt_ids, completions)
        if prompt_ids is None:
            return None
        meta = {**record.meta, "data_file": record.origin[0], "data_row": record.origin[1]}
        return EncodedExample(prompt_ids, completions, record.labels, meta)

    # -- tokenisation --------------------------------------------------------------------------------------

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _encode_plain(self, record: Record) -> tuple[list[int], list[list[int]]]:
        eos = self.tokenizer.eos_token_id
        completions = []
        for text in record.candidates:
            ids = self._ids(text, special=False)  # type: ignore[arg-type]
            if self.add_eos and (not ids or ids[-1] != eos):
                ids.append(eos)
            completions.append(ids)
        return self._ids(record.prompt, special=True), completions  # type: ignore[arg-type]

    def _render(self, record: Record, messages: list, generation_prompt: bool) -> str:
        if self.chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
            file, row = record.origin
            raise DataError(f"{file}:{row}: conversational row, but the tokenizer has no chat template; fix: "
                            "pass chat_template= (a Jinja string), use a tokenizer that has one, or use "
                            "plain-string rows")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.chat_template,
                                                  add_generation_prompt=generation_prompt)

    def _encode_chat(self, record: Record) -> tuple[list[int], list[list[int]]]:
        prompt_text = self._render(record, record.prompt, True)  # type: ignore[arg-type]
        completions = []
        for messages in record.candidates:
            full_text = self._render(record, record.prompt + messages, False)  # type: ignore[operator]
            if full_text.startswith(prompt_text):
                completions.append(self._ids(full_text[len(prompt_text):], special=False))
                continue
            # The template renders the prompt differently once an assistant turn follows; score the
            # assistant content right after the generation prompt, as the model would produce it.
            self.stats.template_mismatches += 1
            content = "".join(m["content"] for m in messages if m["role"] == "assistant")
            ids = self._ids(content, special=False)
            if self.tokenizer.eos_token_id is not None:
                ids.append(self.tokenizer.eos_token_id)
            completions.append(ids)
        return self._ids(prompt_text, special=False), completions

    # -- truncation ----------------------------------------------------------------------------------------

    def _truncate(self, record: Record, prompt: list[int],
                  completions: list[list[int]]) -> tuple[list[int] | None, list[list[int]]]:
        budget = self.max_length
        longest = max(len(c) for c in completions)
        if budget is None or len(prompt) + longest <= budget:
            return prompt, completions
        if self.truncation == "keep_end_of_prompt":
            floor = self.max_prompt_length if self.max_prompt_length is not None else budget // 2
            keep = max(floor, budget - longest)
            if len(prompt) > keep:
                self.stats.prompts_truncated += 1
                bos = self.tokenizer.bos_token_id
                # Models are trained with BOS first; dropping it would change every later activation.
                prompt = [bos] + prompt[len(prompt) - keep + 1:] if prompt[0] == bos else prompt[-keep:]
        room = budget - len(prompt)
        if room <= 0:
            self._bad(record, "prompt_too_long", "prompt", record.prompt,
                      f"is {len(prompt)} tokens and fills max_length={budget}, leaving no completion tokens",
                      "raise max_length, or use truncation='keep_end_of_prompt' to keep the end of long "
                      "prompts")
            return None, completions
        cut = [c[:room] for c in completions]
        self.stats.completions_truncated += sum(len(c) > room for c in completions)
        return prompt, cut

    def _bad(self, record: Record, reason: str, field: str, value: Any, message: str, fix: str) -> None:
        if self.skip_bad_rows:
            self.stats.rows_dropped += 1
            self.dropped[reason] += 1
            return None
        raise DataError.from_problems([RowProblem(*record.origin, reason, field, value, message, fix)])


def _candidate_field(record: Record, k: int) -> str:
    if isinstance(record, PairRow):
        return ("chosen", "rejected")[k]
    return f"completions[{k}]" if isinstance(record, RankedRow) else "completion"


# ----------------------------------------------------------------------------------------------------------
# Collation


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def collate(examples: Sequence[EncodedExample], *, pad_token_id: int, pad_to_multiple_of: int | None = None,
            extras_keys: Sequence[str] = NUMERIC_META) -> TextBatch:
    """Pad encoded examples into a :class:`TextBatch`.

    Prompts are left-padded to ``[B, P]``, completions right-padded to ``[B, K, C]`` with K the largest number
    of candidates in the batch; ``candidate_mask`` ``[B, K]`` marks real candidates and is ``None`` when no
    list is ragged. ``labels`` ``[B, K]`` holds each candidate's label (NaN for padding candidates). Numeric
    ``meta`` columns named in ``extras_keys`` (``margin``, ``weight``) become ``extras[key]`` ``[B]`` float
    tensors (NaN where a row has none). Masks are ``long`` (attention-mask style); ``candidate_mask`` is bool.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    B = len(examples)
    K = max(len(e.completions) for e in examples)
    P = _round_up(max(len(e.prompt_ids) for e in examples), pad_to_multiple_of)
    C = _round_up(max(len(c) for e in examples for c in e.completions), pad_to_multiple_of)
    prompt_ids = torch.full((B, P), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((B, P), dtype=torch.long)
    completion_ids = torch.full((B, K, C), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((B, K, C), dtype=torch.long)
    candidate_mask = torch.zeros((B, K), dtype=torch.bool)
    labels = torch.full((B, K), float("nan"))
    for i, ex in enumerate(examples):
        n = len(ex.prompt_ids)
        prompt_ids[i, P - n:] = torch.tensor(ex.prompt_ids, dtype=torch.long)
        prompt_mask[i, P - n:] = 1
        for k, ids in enumerate(ex.completions):
            completion_ids[i, k, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            completion_mask[i, k, : len(ids)] = 1
            candidate_mask[i, k] = True
            labels[i, k] = ex.labels[k]
    extras: dict[str, Tensor] = {}
    for key in extras_keys:
        values = [ex.meta.get(key) for ex in examples]
        if any(v is not None for v in values):
            extras[key] = torch.tensor([float("nan") if v is None else float(v) for v in values])
    return TextBatch(prompt_ids, prompt_mask, completion_ids, completion_mask,
                     candidate_mask=None if bool(candidate_mask.all()) else candidate_mask, labels=labels,
                     meta=[dict(ex.meta) for ex in examples], extras=extras)


def ranking_order(labels: Tensor) -> Tensor:
    """Ranks per candidate (``TextBatch.labels`` of ranked rows, 0 = best, NaN = padding) -> the ``order``
    argument of :func:`mmalign.losses.listwise.plackett_luce`: storage indices best-first, ``-1`` padded."""
    valid = ~torch.isnan(labels)
    key = torch.where(valid, labels, torch.full_like(labels, float("inf")))
    order = torch.argsort(key, dim=-1, stable=True)
    n_valid = valid.sum(-1, keepdim=True)
    positions = torch.arange(labels.shape[-1], device=labels.device).expand_as(order)
    return torch.where(positions < n_valid, order, torch.full_like(order, -1))


# ----------------------------------------------------------------------------------------------------------
# Dataset


class PreferenceDataset(Dataset):
    """Encoded examples of one format; ``collate`` (a bound method) is the DataLoader ``collate_fn``.

    ``__getitem__`` adds ``data_index`` (the position in this dataset) to the example's meta, so cached
    reference scores can be keyed by it.
    """

    def __init__(self, examples: Sequence[EncodedExample], *, pad_token_id: int, format: str,
                 pad_to_multiple_of: int | None = None):
        self.examples = list(examples)
        self.pad_token_id = pad_token_id
        self.format = format
        self.pad_to_multiple_of = pad_to_multiple_of

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> EncodedExample:
        ex = self.examples[index]
        return EncodedExample(ex.prompt_ids, ex.completions, ex.labels, {**ex.meta, "data_index": index})

    def collate(self, examples: Sequence[EncodedExample]) -> TextBatch:
        return collate(examples, pad_token_id=self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)


def build_text_dataset(sources: str | Path | Sequence[str | Path], tokenizer: Any, *, format: str = "auto",
                       split: str = "train", limit: int | None = None, max_length: int | None = 1024,
                       max_prompt_length: int | None = None, truncation: str = "keep_end_of_prompt",
                       add_eos: bool = True, chat_template: str | None = None, skip_bad_rows: bool = False,
                       pad_to_multiple_of: int | None = None,
                       hub: HubOptions | None = None) -> tuple[PreferenceDataset, dict[str, int]]:
    """Load, validate and tokenise text preference data.

    Returns the dataset and flat integer stats for the training logs: ``rows_read``, ``rows_used``,
    ``rows_skipped`` and ``skipped/<reason>`` per reason (from loading, validation and encoding), and the
    :class:`TruncationStats` counters under ``encode/<name>``.

    Raises:
        DataError: for a missing/unreadable source, and (unless ``skip_bad_rows``) for bad rows, listing the
            first 10 of them with file, row, field, value and fix.
    """
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither pad_token nor eos_token; set tokenizer.pad_token first")
    skipped: Counter = Counter()
    rows = load_rows(sources, split=split, limit=limit, skip_bad_rows=skip_bad_rows, skipped=skipped, hub=hub)
    parsed = parse_rows(rows, format=format, skip_bad_rows=skip_bad_rows)
    encoder = TextEncoder(tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                          truncation=truncation, add_eos=add_eos, chat_template=chat_template,
                          skip_bad_rows=skip_bad_rows)
    examples, problems = [], []
    for record in parsed.records:
        try:
            ex = encoder.encode(record)
        except DataError as e:
            if not e.problems:  # a setup error (no chat template), not a row error: same for every row
                raise
            problems.extend(e.problems)
            continue
        if ex is not None:
            examples.append(ex)
    if problems:
        raise DataError.from_problems(problems)
    rows_read = len(rows) + sum(skipped.values())  # so far `skipped` holds the lines dropped while loading
    skipped.update(parsed.skipped)
    skipped.update(encoder.dropped)
    if not examples:
        raise DataError(f"{_names(sources)}: no usable rows ({rows_read} read, skipped: {dict(skipped)}); "
                        "fix: check that the sources hold rows in one of the formats of mmalign.data.rows")
    stats = {"rows_read": rows_read, "rows_used": len(examples), "rows_skipped": sum(skipped.values())}
    stats.update({f"skipped/{reason}": n for reason, n in sorted(skipped.items())})
    stats.update({f"encode/{k}": v for k, v in encoder.stats.as_dict().items()})
    return PreferenceDataset(examples, pad_token_id=pad_token_id, format=parsed.format,
                             pad_to_multiple_of=pad_to_multiple_of), stats


def _names(sources: str | Path | Sequence[str | Path]) -> str:
    return str(sources) if isinstance(sources, (str, Path)) else ", ".join(map(str, sources))
