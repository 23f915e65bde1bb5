"""The contract between data, adapters and losses: :class:`TextBatch` in, :class:`Scores` out.

An adapter turns ``(model, batch)`` into :class:`Scores`; the losses only ever see Scores. Every batch
holds K candidates per example (K=2 for pairs: index 0 = chosen, 1 = rejected; K=1 for unpaired/SFT
rows; K>2 for ranked lists, with ``candidate_mask`` for ragged lists). Diffusion and contrastive adapters
produce the same Scores (``logps`` = negated denoising error, or ``embeddings``), so every loss applies to
every modality.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

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


@dataclass
class TextBatch(DeviceMovable):
    """A tokenised batch of B examples with K completions each.

    Prompts are left-padded (so every prompt ends at the same position and its KV cache can be shared by all
    K completions); completions are right-padded.

    Attributes:
        prompt_ids: ``[B, P]`` left-padded prompt token ids.
        prompt_mask: ``[B, P]`` 1 on real prompt tokens.
        completion_ids: ``[B, K, C]`` right-padded completion token ids (EOS included where the row had one).
        completion_mask: ``[B, K, C]`` 1 on completion tokens that are scored.
        candidate_mask: ``[B, K]`` bool, False for padding candidates of ragged lists.
        labels: ``[B, K]`` float: unpaired desirability (1/0), or ranking position (0 = best), or NaN.
        meta: per-example python values (row index, source file, difficulty, ...), not moved to device.
        extras: other ``[B, ...]`` tensors (precomputed reference scores ``ref_logps`` [B, K], margins,
            sample weights), moved to device with the batch.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    candidate_mask: Tensor | None = None
    labels: Tensor | None = None
    meta: list[dict] = field(default_factory=list)
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def num_candidates(self) -> int:
        return self.completion_ids.shape[1]



@dataclass
class Scores:
    """What an adapter returns and the losses consume.

    Attributes:
        logps: ``[B, K]`` sequence scores: summed completion log-probs (autoregressive models) or negated
            per-sample denoising error (diffusion/flow; noise and timestep shared by the K candidates).
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
