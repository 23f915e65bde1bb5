"""Token-level recipes' options and SparsePO's learned token-mask producer (used by the causal-LM family).

SparsePO (arXiv 2410.05102) weights TDPO's per-token rewards and KL with masks; the learned variant computes them
from the reference's per-layer activations with the small heads below, a submodule of the policy (so the one
optimizer trains them and checkpoints hold them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MASK_HEADS", "SparseMaskHeads", "TokenOptions"]

MASK_HEADS = "sparsepo_mask_heads"  # submodule name on the policy, and ``<name>.pt`` beside the saved model


@dataclass
class TokenOptions:
    """``options:`` of the token-level recipes (tdpo, sparsepo, sparsepo_activation).

    Attributes:
        kl_chunk_size: most completion positions whose two ``[rows, V]`` logit blocks (policy, reference) exist at
            once while the per-token KL is formed.
        mask_dropout: dropout of SparsePO's mask heads (repo: 0.1).
        mask_max: upper clamp of the learned mask (None: the repo's unbounded ReLU output).
        mask_init: initial mask value (the heads start as TDPO1 scaled by it; see :class:`SparseMaskHeads`).
        independent_masks: learn separate reward and KL masks (repo ``rw_kl_independent=True``, "indp").
    """

    kl_chunk_size: int = 1024
    mask_dropout: float = 0.1
    mask_max: float | None = 1.0
    mask_init: float = 0.5
    independent_masks: bool = False


class SparseMaskHeads(torch.nn.Module):
    """SparsePO's learned token mask (``mask_model="simple_all"``, ``huawei-noah/HEBO/SparsePO``
    ``src/masks/mask_models.py``): a shared LayerNorm over each reference layer's hidden state, one
    ``Linear(H, 1)`` + ReLU + dropout per layer, a bias-free ``Linear(L, 1)`` mixer, ReLU, dropout.

    Input ``[..., L, H]`` (reference activations, no gradient), output ``[..., n_masks]`` >= 0.
    Deviations: the output is clamped to ``max_value`` (default 1, so masks lie in [0, 1]; the repo leaves
    them unbounded); the heads start at ``init`` for every token (per-layer weights N(0, 0.02), bias ``init``,
    mixer 1/L) instead of PyTorch's default init, whose random signs often start the ReLUs dead or the masks
    far from TDPO1; ``n_masks=2`` holds the reward and KL masks ("indp") in one module; LayerNorm eps 1e-5.
    """

    def __init__(self, hidden_size: int, num_layers: int, *, n_masks: int = 1, dropout: float = 0.1,
                 max_value: float | None = 1.0, init: float = 0.5):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden_size)
        self.heads = torch.nn.Linear(hidden_size, num_layers * n_masks)  # all per-layer heads as one matmul
        self.mixer = torch.nn.Parameter(torch.full((n_masks, num_layers), 1.0 / num_layers))
        self.drop = torch.nn.Dropout(dropout)
        self.num_layers, self.n_masks, self.max_value = num_layers, n_masks, max_value
        with torch.no_grad():
            self.heads.weight.normal_(0.0, 0.02)
            self.heads.bias.fill_(init)

    def forward(self, layer_states: torch.Tensor) -> torch.Tensor:
        if layer_states.shape[-2] != self.num_layers:
            raise ValueError(f"SparseMaskHeads: got {layer_states.shape[-2]} layers, built for {self.num_layers}")
        h = self.norm(layer_states.to(self.heads.weight.dtype))  # [..., L, H]
        w = self.heads.weight.view(self.n_masks, self.num_layers, -1)  # head (m, l) reads layer l
        b = self.heads.bias.view(self.n_masks, self.num_layers)
        per_layer = self.drop(torch.relu(torch.einsum("...lh,mlh->...ml", h, w) + b))
        out = self.drop(torch.relu((per_layer * self.mixer).sum(-1)))  # [..., n_masks]
        return out if self.max_value is None else out.clamp(max=self.max_value)
