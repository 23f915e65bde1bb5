"""What the one loop runs: a :class:`Task` (model + data + scores + loss + save) and the :class:`StageData` a
task hands it per stage.

Recipes with per-step work (online generation, token guidance, self-made negatives, Self-NPO's truncated sampling,
ZSCL's teacher and weight averaging, and next TEMPLE pair generation and AVP-RPO rounds) override the hooks below;
every hook has a no-op default here, so the loop calls them unconditionally and never probes for them.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..losses import LossOutput
from ..schema import StageConfig
from ..types import Scores, StageData

__all__ = ["StageData", "Task"]


class Task:
    """A method recipe instantiated for a run. ``model`` is the policy being trained.

    Required: :meth:`stage_data`, :meth:`score`, :meth:`loss`, :meth:`save_pretrained`. Everything else is an
    optional hook with a no-op default."""

    model: nn.Module
    needs_reference: bool = False

    # -- required -----------------------------------------------------------------------------------------
    def stage_data(self, stage: StageConfig) -> StageData:
        raise NotImplementedError

    def score(self, model: nn.Module, batch) -> Scores:
        raise NotImplementedError

    def loss(self, policy: Scores, reference: Scores | None, batch, aux: Scores | None = None) -> LossOutput:
        raise NotImplementedError

    def save_pretrained(self, model: nn.Module, path: Path, state_dict: dict | None = None) -> None:
        """Write the final model. ``state_dict``: the full weights gathered from sharded ranks (FSDP / ZeRO-3;
        keys relative to ``model``), to be written instead of ``model``'s own (one rank's shards); ``None`` on
        unsharded runs."""
        raise NotImplementedError

    # -- hooks (no-op defaults) ---------------------------------------------------------------------------
    def configure_stage(self, stage: StageConfig) -> None:
        """Apply the stage's loss settings before its data is built."""

    def merge_lora(self) -> None:
        """Merge the LoRA adapter into the base and start a new one (``stage.merge_lora``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge LoRA adapters")

    def prepare_batch(self, model: nn.Module, batch, step: int):
        """Runs before every training micro-batch is scored, for methods whose candidates come from the current
        policy (online DPO/XPO, sampled negatives). Must be deterministic given (step, batch) and the RNG state,
        for exact resume."""
        return batch

    def run_prerequisites(self, train_fn) -> None:
        """Train the auxiliary runs the task depends on (PRIOR's text-only reference LM) with ``train_fn``
        (:func:`mmalign.api.train`, handed down so that methods never import the API); called by ``api.train``
        before the loop. Must do nothing when they are already done."""

    def after_step(self, step: int) -> None:
        """Runs after every optimizer step (weight averages, logit-scale clamps, alternating phases)."""

    def state_dict(self) -> dict:
        """Recipe state beyond the weights, put into checkpoints for exact resume ({} : nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (called on resume; not called for checkpoints written before
        tasks had recipe state, which carry none)."""
