"""The Python API, mirrored by the CLI: ``mmalign.train(config_or_path, overrides, **extra)``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, dump_yaml, load_config
from .registry import MODALITIES, resolve
from .schema import TrainConfig

log = logging.getLogger(__name__)


def load_train_config(config: str | Path | Mapping | TrainConfig | None = None, overrides: Sequence[str] = (),
                      extra: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults ← YAML file (or mapping) ← ``key=value`` overrides ← ``extra`` (dotted keys → values)."""
    if isinstance(config, TrainConfig):
        from .config import to_dict

        config = to_dict(config)
    return load_config(TrainConfig, config, overrides=list(overrides), extra=dict(extra or {}))


def task_target(cfg: TrainConfig) -> str:
    """The ``"module:Class"`` that builds the configured run: the recipe the run's loss names select (the
    ``recipe`` of their :data:`~mmalign.methods.table.METHODS` rows, when it runs on the modality's family), else
    the modality's task from :data:`mmalign.registry.MODALITIES`. Refuses, before anything is built or written,
    a run that mixes two recipes (each builds its own model) and a run without training data unless its loss's
    row is data-free (Self-NPO samples its own inputs). Unknown names, and rows the family cannot run, are left
    to the task, which reports them with the valid names."""
    from .methods.table import find_method

    row = MODALITIES[cfg.modality]
    family = getattr(resolve(row.task), "family_cls", None)
    names = sorted({cfg.loss.name} | {(s.loss or {}).get("name") for s in cfg.stages} - {None})

    def own(name: str):  # the row, if it is a recipe of this modality's family
        m = find_method(name)
        return m if m is not None and m.recipe and family is not None and m.family == family.name else None

    recipes = sorted({own(n).recipe for n in names if own(n) is not None})
    if len(recipes) > 1:
        raise ValueError(f"one run cannot mix the {cfg.modality} recipes {recipes} (losses {names})")
    main = own(cfg.loss.name)
    if not (main is not None and main.data_free) and not cfg.data.train and not any(s.train for s in cfg.stages):
        raise ConfigError("data.train is empty: give at least one training file (data.train=[path.jsonl])")
    return recipes[0] if recipes else row.task


def build_task(cfg: TrainConfig):
    """The task for the configured run (:func:`task_target`), imported only now, so that a text run never imports
    diffusers or open_clip. Tasks that train auxiliary runs (PRIOR's text-only reference) get :func:`train` as
    ``train_fn``: methods never import the API."""
    cls = resolve(task_target(cfg))
    return cls(cfg, train_fn=train) if MODALITIES[cfg.modality].needs_train_fn else cls(cfg)


def train(config: str | Path | Mapping | TrainConfig | None = None, overrides: Sequence[str] = (), *,
          task=None, **extra: Any) -> dict:
    """Train from a config; returns the run summary (steps, final metrics, eval metrics, output paths).

    ``extra`` takes dotted keys with ``__`` for dots, e.g. ``train(cfg, run__max_steps=10)``.
    """
    cfg = load_train_config(config, overrides, {k.replace("__", "."): v for k, v in extra.items()})
    if task is None:  # every config problem (recipes, data, loss names and options, family checks) before the
        resolve(task_target(cfg)).validate(cfg)  # output directory is written or a model is built
    from .train.output_guard import plan_resume

    plan_resume(cfg)  # a changed config over checkpoints, or a finished final/, is refused before anything is written
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out / "config.yaml", header="resolved config of this run (mmalign train reads it back)")
    from .train.loop import fit

    task = task or build_task(cfg)
    # A task built without train_fn (e.g. PriorTask(cfg) by hand) trains its auxiliary runs now (no-op otherwise).
    task.run_prerequisites(train)
    return fit(task, cfg)
