"""The model-family contract: what the one preference task (:class:`mmalign.methods.preference.PreferenceTask`)
asks of a model family, and the vocabulary a row of the one ``METHODS`` table (:mod:`mmalign.methods.table`)
uses to say what it needs from a family's :class:`~mmalign.types.Scores`.

A family owns everything modality-specific about a run: it builds the model (tiny or ``from_pretrained``, plus
tokenizer or frozen components), turns rows into a stage's :class:`~mmalign.types.StageData`, scores a batch
**in the losses' own units** (so that a row's loss function takes the scores as they are: no per-family sign
flips or β conversions anywhere else), saves the result and merges LoRA. The task owns what is the same for all
families: the stage's loss settings, the reference bookkeeping, the optional SFT and retain terms.

Contract (one subclass per adapter file; hooks with a default need not be overridden)::

    class MyFamily(ModelFamily):
        name = "my_family"                     # in error messages ("the diffusion family cannot ...")
        modality = "my_modality"               # the `modality:` value whose task runs this family
        provides = frozenset({"logps", ...})   # which NEEDS its Scores can fill
        cannot = {"token_logps": "why not"}    # reason per need it cannot fill (for the refusal message)
        extra_kwargs = frozenset()             # loss.kwargs keys the family consumes itself (loss_kwargs)

        @classmethod
        def check(cls, cfg, uses) -> list[str]           # config problems, before anything is built; uses: one
                                                         # StageLoss per stage (where, method row, kwargs, ...)
        def __init__(self, cfg, methods, **prebuilt)     # builds self.model (+ tokenizer / components)
        def stage_data(self, stage, method) -> StageData
        def score(self, model, batch, method) -> Scores  # in the losses' units; same call for the reference
        def loss_kwargs(self, method, kwargs) -> dict    # family defaults (diffusion's β), consumed keys removed
        def finish_scores(self, policy, reference, method) -> Scores   # e.g. per-token KL (causal LM)
        def add_metrics(self, out, policy, reference, batch, method, kwargs) -> None  # kwargs: the loss's
        def save(self, model, path, state_dict=None, method=None) -> None
        def merge_lora(self) -> None

``methods`` / ``method`` are rows of ``METHODS`` (duck-typed here, since this layer sits below the methods
layer): ``name``, ``formats`` (accepted data formats, the first one the default), ``needs`` (a subset of
:data:`NEEDS`), ``needs_reference``, ``winners_only``, ``reverses_preferences``, ``mismatched_kl``,
``token_masks``, ``aux``, ``loss_fn`` and ``options()`` (the keyword options ``loss.kwargs`` may set).
A row whose ``needs`` are not all in the family's ``provides`` is refused at config load
(:meth:`ModelFamily.refusal`), naming the loss, the family and the reason.

What ``provides`` promises, per need: ``logps``/``lengths`` filled on every Scores; ``nll`` either per-token
log-probs (the SFT term is :func:`mmalign.losses.nll` over them) or ``extras["nll"]`` ``[B, K]`` (its mean is the
SFT term); ``token_kl`` formed in :meth:`ModelFamily.finish_scores`; ``values`` when a row needing them is among
``methods`` (the family then builds the head). The reference is scored by the same :meth:`ModelFamily.score`
(under ``no_grad``), or cached from its ``logps`` only (``reference.strategy: precomputed``), so anything a loss
reads from the reference beyond ``logps`` must be recoverable or refused in :meth:`ModelFamily.check`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from ..losses import LossOutput
from ..types import Scores, StageData

__all__ = ["NEEDS", "ModelFamily", "StageLoss"]

# What a METHODS row may need from a family's Scores (the keys of ``Method.needs`` and ``ModelFamily.provides``).
NEEDS: dict[str, str] = {
    "logps": "one sequence score per candidate (a log-likelihood or its surrogate), Scores.logps",
    "lengths": "a scored length per candidate (length-normalised losses), Scores.lengths",
    "nll": "a per-candidate training loss for SFT terms (token NLL, denoising MSE)",
    "token_logps": "per-token log-probs of every candidate, Scores.token_logps",
    "token_kl": "the per-token KL between the policy's and the reference's next-token distributions",
    "values": "a scalar value head per candidate (reward models), Scores.values",
    "embeddings": "paired embeddings for contrastive losses, Scores.embeddings",
}


@dataclass(frozen=True)
class StageLoss:
    """The loss settings in effect for one stage (``where`` = ``loss`` or ``stages.<i>.loss``, for messages)."""

    where: str
    method: Any  # a mmalign.methods.table.Method row
    kwargs: dict = field(default_factory=dict, hash=False)
    sft_weight: float = 0.0
    retain_weight: float = 1.0


class ModelFamily:
    """Base of the model families (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    modality: ClassVar[str] = ""
    provides: ClassVar[frozenset[str]] = frozenset()
    cannot: ClassVar[dict[str, str]] = {}
    extra_kwargs: ClassVar[frozenset[str]] = frozenset()

    cfg: Any
    model: nn.Module

    def __init__(self, cfg, methods: Sequence[Any], **prebuilt):
        raise NotImplementedError

    # -- before anything is built -----------------------------------------------------------------------------
    @classmethod
    def refusal(cls, method) -> str | None:
        """Why this family cannot feed ``method`` (None: it can)."""
        missing = [n for n in sorted(method.needs) if n not in cls.provides]
        if not missing:
            return None
        why = "; ".join(f"{NEEDS.get(n, n)} ({n}): {cls.cannot.get(n, f'the {cls.name} family does not compute it')}"
                        for n in missing)
        return f"loss {method.name!r} cannot run on the {cls.name} family: it needs {why}"

    @classmethod
    def check(cls, cfg, uses: Sequence[StageLoss]) -> list[str]:
        """Family-specific config problems of the whole run (every stage's loss in ``uses``), before building."""
        return []

    # -- per stage --------------------------------------------------------------------------------------------
    def stage_data(self, stage, method) -> StageData:
        raise NotImplementedError

    def loss_kwargs(self, method, kwargs: dict) -> dict:
        """The keyword arguments the row's loss receives: ``kwargs`` (already checked) with family defaults."""
        return dict(kwargs)

    # -- per batch --------------------------------------------------------------------------------------------
    def score(self, model: nn.Module, batch, method) -> Scores:
        raise NotImplementedError

    def finish_scores(self, policy: Scores, reference: Scores | None, method) -> Scores:
        """Terms formed from both models' scores before the loss (the causal LM's per-token KL)."""
        return policy

    def add_metrics(self, out: LossOutput, policy: Scores, reference: Scores | None, batch, method,
                    kwargs: dict) -> None:
        """Family metrics added to ``out.metrics`` in place (after the loss and its SFT / retain terms);
        ``kwargs``: what the row's loss received (after :meth:`loss_kwargs`)."""

    # -- model lifecycle --------------------------------------------------------------------------------------
    def save(self, model: nn.Module, path: Path, state_dict: dict | None = None, method=None) -> None:
        raise NotImplementedError

    def merge_lora(self) -> None:
        raise NotImplementedError(f"the {self.name} family cannot merge LoRA adapters")
