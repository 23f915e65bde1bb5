"""The one generic preference task: a model family + a row of :data:`~mmalign.methods.table.METHODS` + data +
stages, for every family (causal LM, diffusion, ...).

Per stage the loss settings are ``stage.loss`` over the run's ``loss`` section (:func:`stage_loss`): a stage that
names another loss starts from that loss's defaults. All stages' names and options are checked when the task is
built, together with what the family can feed (:meth:`~mmalign.adapters.family.ModelFamily.refusal`) and the
family's own config checks, and every problem is reported in one :class:`~mmalign.config.ConfigError`.

The loss of a batch is the row's function on the family's scores, plus the optional SFT term (RPO/MPO,
``loss.sft_weight``) or, for unlearning rows with a retain set, the retain NLL; building, data, scoring, family
metrics, saving and LoRA merges are the family's.

Recipes (rows of METHODS with a ``recipe``: online DPO/XPO, sequence-level contrastive training, token guidance,
Self-NPO) are subclasses of this task: the family is built here, once, and the subclass overrides hooks only
(:meth:`PreferenceTask.check` for its options, and ``stage_data``, ``prepare_batch``, ``after_step``,
``state_dict``, ``loss``, ``save_pretrained`` where its work differs). A recipe row runs only in its recipe's
task, and a recipe's task runs only its own rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from .. import losses as L
from ..adapters.family import ModelFamily, StageLoss
from ..config import ConfigError
from ..losses import LossOutput
from ..schema import StageConfig, TrainConfig
from ..types import Scores
from .table import METHODS, Method, check_loss_kwargs, get_method, sft_loss
from .task import StageData, Task

__all__ = ["PreferenceTask", "resolve_stage_losses", "stage_loss"]

_STAGE_LOSS_KEYS = {"name", "kwargs", "sft_weight", "retain_weight"}


def stage_loss(cfg: TrainConfig, stage: StageConfig | None) -> tuple[str, dict, float, float]:
    """(loss name, kwargs, sft_weight, retain_weight) in effect for ``stage`` (None: the run's loss section).

    A stage that names another loss starts from that loss's defaults: the run's kwargs and sft_weight belong
    to the run's loss (an SFT stage must not receive DPO's ``beta``)."""
    run, over = cfg.loss, dict((stage.loss if stage is not None else None) or {})
    name = over.get("name", run.name)
    same = name == run.name
    kwargs = {**(dict(run.kwargs) if same else {}), **dict(over.get("kwargs") or {})}
    return (name, kwargs, over.get("sft_weight", run.sft_weight if same else 0.0),
            over.get("retain_weight", run.retain_weight))


def resolve_stage_losses(cfg: TrainConfig, family: type[ModelFamily], task: type | None = None) -> list[StageLoss]:
    """The loss settings of the run section and of every stage (in that order), checked: names, what the family
    can feed, per-stage keys, loss options, the SFT / retain terms, the family's own checks and, with ``task``
    (the task class to build), the recipe rules and the task's :meth:`PreferenceTask.check`. Raises one
    ConfigError listing every problem."""
    errors, uses = [], []
    for i, stage in enumerate([None, *cfg.stages]):
        where = "loss" if stage is None else f"stages.{i - 1}.loss"
        if stage is not None:
            extra = sorted(set(stage.loss or {}) - _STAGE_LOSS_KEYS)
            if extra:
                errors.append(f"{where}: {extra} cannot be set per stage; allowed: {sorted(_STAGE_LOSS_KEYS)}")
            if stage.merge_lora and not cfg.lora.enabled:
                errors.append(f"stages.{i - 1}.merge_lora=true needs lora.enabled=true (no adapter to merge)")
        name, kwargs, sft_weight, retain_weight = stage_loss(cfg, stage)
        try:
            method = get_method(name, family, where=where)
        except ConfigError as e:
            errors += e.errors
            continue
        errors += check_loss_kwargs(method, kwargs, where=f"{where}.kwargs", family=family)
        if sft_weight and "nll" not in family.provides:
            errors.append(f"{where}.sft_weight={sft_weight}: the {family.name} family has no per-candidate "
                          f"training loss to add ({family.cannot.get('nll', '')})")
        uses.append(StageLoss(where, method, kwargs, sft_weight, retain_weight))
    errors += family.check(cfg, uses)
    if task is not None:
        errors += _recipe_problems(task, uses)
        errors += task.check(cfg, uses)
    if errors:
        raise ConfigError(errors)
    return uses


def _recipe_problems(task: type, uses: list[StageLoss]) -> list[str]:
    """A recipe row runs only in its recipe's task, and a recipe's task trains only its own rows (each recipe's
    per-step work is built for its rows)."""
    own = {f"{c.__module__}:{c.__qualname__}" for c in task.__mro__}
    mine = sorted(n for n, m in METHODS.items() if m.recipe in own)
    errors = []
    for u in uses:
        m = u.method
        if m.recipe and m.recipe not in own:
            errors.append(f"{u.where}.name={m.name}: the {m.recipe} recipe, not a loss of {task.__name__}; build "
                          "the run with mmalign.api.build_task (it picks the task by loss name)")
        elif not m.recipe and mine:
            errors.append(f"{u.where}.name={m.name!r}: a {task.__name__} run trains every stage with {mine}; run "
                          "other losses (e.g. an SFT stage) as their own run")
    return errors


class PreferenceTask(Task):
    """Any METHODS row on any model family (see the module docstring).

    Args:
        cfg: the run config.
        family: the :class:`~mmalign.adapters.family.ModelFamily` class (default: the subclass's ``family_cls``).
        prebuilt: passed to the family, e.g. ``tokenizer=`` / ``model=`` (causal LM), ``components=`` (diffusion).
    """

    family_cls: ClassVar[type[ModelFamily] | None] = None
    method: Method | None = None  # the current stage's row
    loss_kwargs: dict
    sft_weight: float = 0.0
    retain_weight: float = 1.0

    def __init__(self, cfg: TrainConfig, *, family: type[ModelFamily] | None = None, **prebuilt: Any):
        self.cfg = cfg
        family = family or self.family_cls
        uses = self.validate(cfg, family)  # every stage's loss, before anything is built
        self.family = family(cfg, [u.method for u in uses], **prebuilt)
        self._apply(uses[0])
        # The loop builds the reference once, before the first stage: a run whose later stage needs one (SFT then
        # DPO) must have it; configure_stage then says per stage whether to run its forward.
        self.needs_reference = any(u.method.needs_reference for u in uses)

    @classmethod
    def validate(cls, cfg: TrainConfig, family: type[ModelFamily] | None = None) -> list[StageLoss]:
        """Every check ``__init__`` makes before building (loss names, what the family can feed, loss options,
        the family's and the recipe's own checks), without building anything: ``mmalign.api.train`` calls it
        before it writes the output directory. Raises one ConfigError listing every problem."""
        family = family or cls.family_cls
        if family is None:
            raise TypeError(f"{cls.__name__}: pass family= (a ModelFamily class)")
        return resolve_stage_losses(cfg, family, cls)

    @classmethod
    def check(cls, cfg: TrainConfig, uses: list[StageLoss]) -> list[str]:
        """Recipe config problems (options, reference strategy, ...), reported together with the loss and family
        problems before anything is built; ``uses``: every stage's checked loss settings."""
        return []

    @property
    def model(self) -> nn.Module:
        return self.family.model

    @model.setter
    def model(self, value: nn.Module) -> None:
        self.family.model = value

    def _apply(self, use: StageLoss) -> None:
        self.method = use.method
        self.loss_kwargs = self.family.loss_kwargs(use.method, {**use.method.defaults, **use.kwargs})
        self.sft_weight, self.retain_weight = use.sft_weight, use.retain_weight
        self.needs_reference = use.method.needs_reference

    def configure_stage(self, stage: StageConfig) -> None:
        """Apply ``stage.loss`` (name, kwargs, sft_weight, retain_weight; all checked in ``__init__``)."""
        name, kwargs, sft_weight, retain_weight = stage_loss(self.cfg, stage)
        method = get_method(name, type(self.family))
        self._apply(StageLoss("stage", method, kwargs, sft_weight, retain_weight))

    # -- data, scores, loss -----------------------------------------------------------------------------------
    def stage_data(self, stage: StageConfig) -> StageData:
        return self.family.stage_data(stage, self.method)

    def score(self, model: nn.Module, batch) -> Scores:
        return self.family.score(model, batch, self.method)

    def loss(self, policy: Scores, reference: Scores | None, batch, aux: Scores | None = None) -> LossOutput:
        m = self.method
        policy = self.family.finish_scores(policy, reference, m)
        extra = {"aux": aux} if m.aux == "scores" else {}  # rows that read the aux batch's scores themselves
        out = m.fn(policy, reference, batch, self.loss_kwargs, **extra)
        if m.aux == "retain" and aux is not None:
            out = L.unlearning_objective(out, retain_nll=sft_loss(aux).loss, retain_weight=self.retain_weight)
        elif self.sft_weight:
            out = L.combine([(m.name, 1.0, out), ("sft", self.sft_weight, sft_loss(policy))])
        self.family.add_metrics(out, policy, reference, batch, m, self.loss_kwargs)
        return out

    # -- model lifecycle ----------------------------------------------------------------------------------------
    def save_pretrained(self, model: nn.Module, path: Path, state_dict: dict | None = None) -> None:
        """The family's layout (see its ``save``); ``state_dict``: the full weights of a sharded run."""
        self.family.save(model, path, state_dict=state_dict, method=self.method)

    def merge_lora(self) -> None:
        self.family.merge_lora()
