"""Deterministic, resumable, rank-sharded batch order.

Every epoch is a permutation drawn from ``seed + epoch``; the position inside it counts *global* samples, so
a run resumed from a checkpoint continues with exactly the batches it would have seen, and N processes with
batch size b see the same global batches (in rank slices) as one process with batch N·b or with N-step
gradient accumulation over b-sized micro-batches.
"""

from __future__ import annotations

import torch


class BatchOrder:
    """Yields lists of dataset indices for one process; ``state_dict`` captures the position."""

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool = True, world_size: int = 1,
                 rank: int = 0):
        if n < batch_size * world_size:
            raise ValueError(
                f"the dataset has {n} examples but one global batch needs {batch_size * world_size} "
                f"(batch_size={batch_size} × {world_size} processes): add data or lower run.batch_size"
            )
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.world_size, self.rank = world_size, rank
        self.epoch, self.pos = 0, 0  # pos: global samples consumed in the current epoch
        self._perm = self._permutation(0)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch  # drop the ragged tail: every step sees full batches

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next_indices(self) -> list[int]:
        if self.pos + self.global_batch > self.n:
            self.epoch += 1
            self.pos = 0
            self._perm = self._permutation(self.epoch)
        start = self.pos + self.rank * self.batch_size
        out = self._perm[start : start + self.batch_size]
        self.pos += self.global_batch
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation(self.epoch)
