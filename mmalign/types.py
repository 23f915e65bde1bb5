"""The types every layer shares, at the bottom (torch only): :class:`Scores` and the candidate-batch base.

An adapter turns ``(model, batch)`` into :class:`Scores`; the losses only ever see Scores. Every batch holds K
candidates per example (K=2 for pairs: index 0 = chosen, 1 = rejected; K=1 for unpaired/SFT rows; K>2 for
ranked lists, with ``candidate_mask`` for ragged lists). Concrete batches (text, image, image-text, and next video
and audio) live with the data code (:mod:`mmalign.data.batches`) and extend :class:`CandidateBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor


class DeviceMovable:
    """``.to(device)`` for batch dataclasses: tensor fields and tensors in ``extras`` move; python values stay."""

    def to(self, device: torch.device | str):
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v):
                v = v.to(device)
            elif f.name == "extras":
                v = {k: t.to(device) if torch.is_tensor(t) else t for k, t in v.items()}
            moved[f.name] = v
        return type(self)(**moved)


class CandidateBatch(DeviceMovable):
    """Base of every training batch: B examples with K candidates each.

    Subclasses are dataclasses that carry their media/token tensors plus the common fields ``candidate_mask``
    (``[B, K]`` bool or None), ``labels`` (``[B, K]`` float: unpaired desirability 1/0, ranking position with
    0 = best, or NaN), ``meta`` (per-example python values, not moved) and ``extras`` (named ``[B, ...]``
    tensors moved with the batch: precomputed reference scores, margins, weights, the loop's ``index``). The
    fields stay on the subclasses (not here) so that each keeps its positional constructor.
    """

    candidate_mask: Tensor | None
    labels: Tensor | None
    meta: list[dict]
    extras: dict[str, Tensor]

    @property
    def batch_size(self) -> int:
        raise NotImplementedError

    @property
    def num_candidates(self) -> int:
        raise NotImplementedError


@dataclass
class Scores:
    """What an adapter returns and the losses consume.

    Attributes:
        logps: ``[B, K]`` sequence scores: summed completion log-probs (autoregressive models) or ``−c·err``,
            the per-sample denoising error scaled once by the family's β convention (diffusion/flow; c = ½
            original, 1 diffusers; noise and timestep shared by the K candidates).
        token_logps: ``[B, K, C]`` per-token log-probs of the completion tokens (0 where masked).
        token_mask: ``[B, K, C]`` bool mask of scored tokens.
        lengths: ``[B, K]`` number of scored tokens.
        values: ``[B, K]`` scalar head outputs (reward models), when the model has one.
        embeddings: named ``[N, D]`` features for contrastive losses.
        extras: anything else an adapter computes for a loss (per-token KL, ``log Σ p²`` for WPO, ...).
    """

    logps: Tensor
    token_logps: Tensor | None = None
    token_mask: Tensor | None = None
    lengths: Tensor | None = None
    values: Tensor | None = None
    embeddings: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)

    def detach(self) -> Scores:
        return Scores(
            logps=self.logps.detach(),
            token_logps=None if self.token_logps is None else self.token_logps.detach(),
            token_mask=self.token_mask,
            lengths=self.lengths,
            values=None if self.values is None else self.values.detach(),
            embeddings={k: v.detach() for k, v in self.embeddings.items()},
            extras={k: v.detach() for k, v in self.extras.items()},
        )


@dataclass
class StageData:
    """What a task hands the loop for one stage (built by a model family from its data code)."""

    train: Any  # a sequence of examples (torch Dataset)
    collate: Any  # list[example] -> batch with .to(device) and .extras
    eval: Any = None
    aux: Any = None  # e.g. the retain set of an unlearning run
    stats: dict = field(default_factory=dict)  # flat numeric data stats (rows read/used/skipped, ...), logged
    key: str = ""  # content hash of ``train``, for reference-score caching ("" : hashed from the batches)
    eval_key: str = ""  # the same for ``eval``
