"""Deterministic, resumable, rank-sharded batch order.

Every epoch is a permutation drawn from ``seed`` and the epoch number; the position inside it counts *global*
samples, so a run resumed from a checkpoint continues with exactly the batches it would have seen. One
optimizer step consumes ``batch_size × world_size × grad_accum`` consecutive samples of the permutation:
micro-batch ``j`` of rank ``r`` takes slot ``j·world_size + r``. Hence N processes with batch size b and
accumulation A see, step by step, the same samples as one process with batch b and accumulation N·A (the
union of the ranks' micro-batches equals the single process's accumulation micro-batches), and losses that
are means over examples give the same gradients.

The ragged tail of an epoch (fewer samples than one optimizer step) is dropped: every step sees full batches.
"""

from __future__ import annotations

import torch


class BatchOrder:
    """Yields lists of dataset indices for one process; ``state_dict`` captures the position."""

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool = True, world_size: int = 1,
                 rank: int = 0, grad_accum: int = 1):
        if batch_size < 1 or grad_accum < 1 or not 0 <= rank < world_size:
            raise ValueError(f"BatchOrder: need batch_size >= 1, grad_accum >= 1 and 0 <= rank < world_size; got "
                             f"batch_size={batch_size}, grad_accum={grad_accum}, rank={rank}, world_size={world_size}")
        need = batch_size * world_size * grad_accum
        if n < need:
            raise ValueError(
                f"the dataset has {n} examples but one optimizer step needs {need} (run.batch_size={batch_size} "
                f"× {world_size} processes × run.grad_accum={grad_accum}): add data or lower run.batch_size / "
                "run.grad_accum"
            )
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.world_size, self.rank, self.grad_accum = world_size, rank, grad_accum
        self.epoch, self.pos = 0, 0  # pos: global samples consumed in the current epoch
        self.micro = 0  # micro-batch index inside the current optimizer step
        self._perm = self._permutation(0)

    @property
    def global_batch(self) -> int:
        """Samples per micro-batch over all processes."""
        return self.batch_size * self.world_size

    @property
    def samples_per_step(self) -> int:
        """Samples per optimizer step over all processes and accumulation micro-batches."""
        return self.global_batch * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.samples_per_step

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch for one process (full optimizer steps only)."""
        return self.steps_per_epoch * self.grad_accum

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next_indices(self) -> list[int]:
        # Wrap only at an optimizer-step boundary, so that no step mixes two epochs and the wrap point does
        # not depend on how the global batch is split into ranks and micro-batches.
        if self.micro == 0 and self.pos + self.samples_per_step > self.n:
            self.epoch += 1
            self.pos = 0
            self._perm = self._permutation(self.epoch)
        start = self.pos + self.rank * self.batch_size
        out = self._perm[start : start + self.batch_size]
        self.pos += self.global_batch
        self.micro = (self.micro + 1) % self.grad_accum
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self.micro = int(state.get("micro", 0))
        self._perm = self._permutation(self.epoch)
