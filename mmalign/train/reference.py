"""Reference-model strategies, all behind one small interface.

``scores(batch)`` returns the reference :class:`~mmalign.types.Scores` for a batch (no gradient);
``after_step(step, policy)`` lets moving references update; ``reanchor(policy)`` makes the current policy
the new reference at a stage boundary. Strategies:

- ``copy``: a frozen deep copy of the initial policy (2× weights in memory, like TRL without PEFT);
- ``adapter``: the policy itself with its PEFT adapter disabled (no second copy; TRL's PEFT path);
- ``precomputed``: reference scores computed once before training and cached on disk, keyed by a hash of
  the data and of the reference weights, so later runs reuse them and any change invalidates them; works
  for every modality (TRL refuses it for vision data). Across stages the loop reuses the anchor's tables for
  the same data; a later stage's *new* data (without LoRA) can only be scored by the current policy, an
  implicit re-anchor that the loop warns about (``copy`` keeps the initial policy instead);
- ``sync``: TR-DPO (arXiv 2404.09656): every ``sync_every`` steps ref ← α·policy + (1−α)·ref;
- ``ema``: ref ← decay·ref + (1−decay)·policy after every step;
- ``none``: reference-free losses; the loop skips the reference forward entirely.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

# The hashes live at the bottom of the package (any layer keys caches with them); re-exported for old imports.
from ..hashing import batches_hash as batches_hash
from ..hashing import model_hash
from ..hashing import tensor_hash as tensor_hash
from ..types import Scores

log = logging.getLogger(__name__)

ScoreFn = Callable[[nn.Module, object], Scores]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP wraps the model in `.module`


def _is_peft(model: nn.Module) -> bool:
    return hasattr(_unwrap(model), "disable_adapter") and hasattr(_unwrap(model), "peft_config")


class Reference:
    """No reference: reference-free losses."""

    name = "none"
    needs_forward = False

    def scores(self, batch) -> Scores | None:
        return None

    def after_step(self, step: int, policy: nn.Module) -> None:
        pass

    def reanchor(self, policy: nn.Module) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class CopyReference(Reference):
    """A frozen deep copy of the policy (eval mode, no grad)."""

    name = "copy"
    needs_forward = True

    def __init__(self, policy: nn.Module, score_fn: ScoreFn):
        self.score_fn = score_fn
        self.model = self._frozen_copy(policy)
        self.reanchored = False

    @staticmethod
    def _frozen_copy(policy: nn.Module) -> nn.Module:
        ref = copy.deepcopy(_unwrap(policy))
        ref.eval()
        ref.requires_grad_(False)
        return ref

    @torch.no_grad()
    def scores(self, batch) -> Scores:
        return self.score_fn(self.model, batch).detach()

    def reanchor(self, policy: nn.Module) -> None:
        self.model.load_state_dict(_unwrap(policy).state_dict())
        self.reanchored = True

    # Once the weights differ from the initial policy (re-anchored or moving), they are part of the run state
    # and go into checkpoints so that a resumed run is exact; an untouched copy is rebuilt from the policy.
    def state_dict(self) -> dict:
        if not self.reanchored:
            return {}
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.model.load_state_dict(state)
            self.reanchored = True


class MovingReference(CopyReference):
    """TR-DPO hard/soft sync (``sync``) or an exponential moving average (``ema``) of the policy."""

    def __init__(self, policy: nn.Module, score_fn: ScoreFn, *, mode: str, sync_every: int, alpha: float,
                 ema_decay: float):
        super().__init__(policy, score_fn)
        self.name, self.mode = mode, mode
        self.sync_every, self.alpha, self.ema_decay = sync_every, alpha, ema_decay
        self.reanchored = True  # moving weights are always saved with checkpoints

    @torch.no_grad()
    def after_step(self, step: int, policy: nn.Module) -> None:
        if self.mode == "sync" and step % self.sync_every != 0:
            return
        w = self.alpha if self.mode == "sync" else 1.0 - self.ema_decay  # weight of the policy
        src = dict(_unwrap(policy).named_parameters())
        for name, p_ref in self.model.named_parameters():
            p_ref.mul_(1.0 - w).add_(src[name].detach().to(p_ref.dtype), alpha=w)


class AdapterReference(Reference):
    """The policy with its PEFT adapter disabled: the base model is the reference, no copy in memory."""

    name = "adapter"
    needs_forward = True

    def __init__(self, policy: nn.Module, score_fn: ScoreFn):
        if not _is_peft(policy):
            raise ValueError("reference.strategy=adapter needs a PEFT (LoRA) policy; enable lora or use 'copy'")
        self.policy, self.score_fn = policy, score_fn

    @torch.no_grad()
    def scores(self, batch) -> Scores:
        model = _unwrap(self.policy)
        was_training = model.training
        model.eval()  # dropout off for the reference, as for a frozen copy
        try:
            with model.disable_adapter():
                return self.score_fn(self.policy, batch).detach()
        finally:
            model.train(was_training)

    def reanchor(self, policy: nn.Module) -> None:
        # With an adapter reference the base *is* the reference: re-anchoring means merging the adapter into
        # the base, which the loop does at stage boundaries when merge_lora is set.
        log.info("adapter reference re-anchored through the LoRA merge at the stage boundary")


class PrecomputedReference(Reference):
    """Reference scores computed once over the whole dataset, cached on disk.

    The cache key hashes the dataset content (``data_key``) and the reference weights, so a second run on the
    same data and model loads the file instead of running the reference, and changing either recomputes.
    Batches must carry ``extras["index"]`` (dataset indices); the loop's collate adds it.
    """

    name = "precomputed"
    needs_forward = False

    def __init__(self, cache_dir: str | Path, *, data_key: str):
        self.cache_dir, self.data_key = Path(cache_dir), data_key
        self.table: Scores | None = None
        self.path: Path | None = None
        self.reused = False

    def build(self, ref_model: nn.Module, score_fn: ScoreFn, batches: Iterable, *, adapter_disabled: bool,
              device: torch.device) -> None:
        key = hashlib.sha256(f"{self.data_key}:{model_hash(ref_model)}:{adapter_disabled}".encode()).hexdigest()
        self.path = self.cache_dir / f"ref_scores-{key[:16]}.pt"
        if self.path.exists():
            self.table = Scores(**torch.load(self.path, weights_only=True))
            self.reused = True
            log.info("reference scores reused from %s", self.path)
            return
        model = _unwrap(ref_model)
        was_training = model.training
        model.eval()
        ctx = model.disable_adapter() if adapter_disabled else nullcontext()
        chunks: dict[int, tuple] = {}
        with torch.no_grad(), ctx:
            for batch in batches:
                s = score_fn(ref_model, batch.to(device))
                for row, idx in enumerate(batch.extras["index"].tolist()):
                    chunks[idx] = (s.logps[row].cpu(), None if s.lengths is None else s.lengths[row].cpu())
        model.train(was_training)
        n = max(chunks) + 1
        logps = torch.stack([chunks[i][0] for i in range(n)])
        self.table = Scores(logps=logps)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Per-process temporary name: under DDP every rank builds the same table and may write it at once.
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"logps": logps}, tmp)
        tmp.replace(self.path)  # atomic: a crash never leaves a half-written cache behind
        (self.cache_dir / "index.json").write_text(json.dumps({"latest": self.path.name}))
        self.reused = False

    # The checkpoint records which cache file the run trained against, so that a resumed run reads the same
    # table instead of rebuilding it from the weights it has at restart (which, after a stage boundary, are
    # not the weights the table was scored with).
    def state_dict(self) -> dict:
        return {"path": str(self.path)} if self.path is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("path"):
            return
        path = Path(state["path"])
        if not path.is_file():
            raise FileNotFoundError(
                f"the checkpoint's reference scores {path} are gone (reference.cache_dir was cleaned or moved); "
                "restore the file, or resume with run.resume=never")
        self.path, self.table, self.reused = path, Scores(**torch.load(path, weights_only=True)), True

    def scores(self, batch) -> Scores:
        if self.table is None:
            raise RuntimeError("PrecomputedReference.build() must run before training")
        idx = batch.extras["index"].cpu()
        return Scores(logps=self.table.logps[idx].to(batch.extras["index"].device))  # any modality's batch
