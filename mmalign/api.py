"""The Python API, mirrored by the CLI: ``mmalign.train(config_or_path, overrides, **extra)``."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import dump_yaml, load_config
from .schema import TrainConfig

log = logging.getLogger(__name__)


def load_train_config(config: str | Path | Mapping | TrainConfig | None = None, overrides: Sequence[str] = (),
                      extra: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults ← YAML file (or mapping) ← ``key=value`` overrides ← ``extra`` (dotted keys → values)."""
    if isinstance(config, TrainConfig):
        from .config import to_dict

        config = to_dict(config)
    return load_config(TrainConfig, config, overrides=list(overrides), extra=dict(extra or {}))


# modality -> "module:Task class" of its recipe family; imported lazily so that a text run never imports
# diffusers or open_clip.
TASKS = {
    "text": "mmalign.methods.text:TextTask",
    "diffusion": "mmalign.methods.diffusion:DiffusionTask",
    "clip": "mmalign.methods.clip:ClipTask",
    "prior": "mmalign.methods.prior:PriorTask",
}


# Text recipes whose per-step work differs from plain preference training (loss.name -> "module:Task class");
# every other text loss.name is a TEXT_METHODS entry run by TextTask.
TEXT_RECIPES = {
    "seq_contrastive": "mmalign.methods.seq_contrastive:SeqContrastiveTask",
    "online_dpo": "mmalign.methods.online:OnlineDPOTask",
    "xpo": "mmalign.methods.online:OnlineDPOTask",
    "token_guidance": "mmalign.methods.token_guidance:TokenGuidanceTask",
}


def build_task(cfg: TrainConfig):
    """The recipe for the configured modality (from the explicit :data:`TASKS` table)."""
    if cfg.modality not in TASKS:
        raise ValueError(f"modality={cfg.modality!r} is not one of {sorted(TASKS)}")
    target = TASKS[cfg.modality]
    if cfg.modality == "text":
        names = {cfg.loss.name} | {(s.loss or {}).get("name") for s in cfg.stages} - {None}
        recipes = {TEXT_RECIPES[n] for n in names if n in TEXT_RECIPES}
        if len(recipes) > 1:
            raise ValueError(f"one run cannot mix the text recipes {sorted(recipes)} (losses {sorted(names)})")
        target = recipes.pop() if recipes else target
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)(cfg)


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

    return fit(task or build_task(cfg), cfg)
