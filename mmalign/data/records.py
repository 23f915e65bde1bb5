"""The typed records that :func:`mmalign.data.rows.parse_rows` returns (one class per row format).

Kept apart from the parser so that each file holds one topic; :mod:`mmalign.data.rows` re-exports every name.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Union

Message = dict[str, str]
Text = Union[str, list[Message]]  # noqa: UP007 -- runtime alias, must also work on 3.10 without `|` on generics
Origin = tuple[str, int]  # (file, 1-based row number)

# Records. All four expose `candidates` (the K completions) and `labels` (one float per candidate), which is
# all the text encoder needs to know about the format.


class _RecordView:
    prompt: Text

    @property
    def candidates(self) -> list[Text]:
        raise NotImplementedError

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class PairRow(_RecordView):
    """A preference pair: candidate 0 is ``chosen``, 1 is ``rejected``; labels are their ranks ``[0, 1]``."""

    prompt: Text
    chosen: Text
    rejected: Text
    meta: dict[str, Any] = field(default_factory=dict)
    origin: Origin = ("<memory>", 0)

    @property
    def candidates(self) -> list[Text]:
        return [self.chosen, self.rejected]

    @property
    def labels(self) -> list[float]:
        return [0.0, 1.0]


@dataclass
class UnpairedRow(_RecordView):
    """One completion with a desirability label (KTO/BCO); label 1.0 = desirable, 0.0 = undesirable."""

    prompt: Text
    completion: Text
    label: bool
    meta: dict[str, Any] = field(default_factory=dict)
    origin: Origin = ("<memory>", 0)

    @property
    def candidates(self) -> list[Text]:
        return [self.completion]

    @property
    def labels(self) -> list[float]:
        return [1.0 if self.label else 0.0]


@dataclass
class RankedRow(_RecordView):
    """K >= 2 completions; ``ranking[i]`` is the rank of ``completions[i]`` (0 = best), a permutation.

    Labels are these ranks, matching ``TextBatch.labels`` ("ranking position, 0 = best").
    """

    prompt: Text
    completions: list[Text]
    ranking: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    origin: Origin = ("<memory>", 0)

    @property
    def candidates(self) -> list[Text]:
        return list(self.completions)

    @property
    def labels(self) -> list[float]:
        return [float(r) for r in self.ranking]


@dataclass
class SFTRow(_RecordView):
    """A demonstration: one completion and no preference label (label NaN)."""

    prompt: Text
    completion: Text
    meta: dict[str, Any] = field(default_factory=dict)
    origin: Origin = ("<memory>", 0)

    @property
    def candidates(self) -> list[Text]:
        return [self.completion]

    @property
    def labels(self) -> list[float]:
        return [float("nan")]


Record = Union[PairRow, UnpairedRow, RankedRow, SFTRow]  # noqa: UP007


@dataclass
class ParsedRows:
    """What :func:`parse_rows` returns: the valid records, skipped-row counts per reason, the format used."""

    records: list[Record]
    skipped: Counter
    format: str
    rows_read: int
