"""The Python API, mirrored by the CLI: ``mmalign.train(config_or_path, overrides, **extra)``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import dump_yaml, load_config
from .registry import MODALITIES, resolve, task_target
from .schema import TrainConfig

log = logging.getLogger(__name__)


def load_train_config(config: str | Path | Mapping | TrainConfig | None = None, overrides: Sequence[str] = (),
                      extra: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults ← YAML file (or mapping) ← ``key=value`` overrides ← ``extra`` (dotted keys → values)."""
    if isinstance(config, TrainConfig):
        from .config import to_dict

        config = to_dict(config)
    return load_config(TrainConfig, config, overrides=list(overrides), extra=dict(extra or {}))


def build_task(cfg: TrainConfig):
    """The task for the configured run, from :data:`mmalign.registry.MODALITIES`: the recipe that the run's loss
    names select (e.g. ``online_dpo``, ``self_npo``), else the family's task. Imported only now, so that a text
    run never imports diffusers or open_clip. Tasks that train auxiliary runs (PRIOR's text-only reference) get
    :func:`train` as ``train_fn``: methods never import the API."""
    names = {cfg.loss.name} | {(s.loss or {}).get("name") for s in cfg.stages} - {None}
    cls = resolve(task_target(cfg.modality, names))
    return cls(cfg, train_fn=train) if MODALITIES[cfg.modality].needs_train_fn else cls(cfg)


def train(config: str | Path | Mapping | TrainConfig | None = None, overrides: Sequence[str] = (), *,
          task=None, **extra: Any) -> dict:
    """Train from a config; returns the run summary (steps, final metrics, eval metrics, output paths).

    ``extra`` takes dotted keys with ``__`` for dots, e.g. ``train(cfg, run__max_steps=10)``.
    """
    cfg = load_train_config(config, overrides, {k.replace("__", "."): v for k, v in extra.items()})
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out / "config.yaml", header="resolved config of this run (mmalign train reads it back)")
    from .train.loop import fit

    task = task or build_task(cfg)
    # A task built without train_fn (e.g. PriorTask(cfg) by hand) trains its auxiliary runs now (no-op otherwise).
    task.run_prerequisites(train)
    return fit(task, cfg)
