"""MODALITIES: the one table that names the model families a run can use (DESIGN.md §2).

One :class:`Modality` row per family says everything the shared layers need to know about it:

- ``task``: the ``"module:Class"`` of the task that builds a run (model, data, scores, loss, save);
- ``recipes``: ``loss.name`` → :class:`Recipe` for losses whose per-step work differs from the plain task
  (text: self-made negatives, online generation, token guidance; diffusion: Self-NPO), each with its own task;
- ``section``: the config section the family reads (``diffusion:``, ``clip:``, ``prior:``) and
  ``section_schema``, the ``"module:Class"`` of its dataclass; the run schema adds one always-present section per
  row that has one;
- ``commands``: CLI sub-commands, ``"sample text"`` → ``"module:function"`` (a space nests it under a group);
- ``demos``: ``mmalign demo NAME`` → ``"module:function"`` (``run(out_dir) -> report``).

What derives from it: ``TrainConfig.modality``'s allowed values and help, the sections of the run schema and the
data-free exception of its validation (:mod:`mmalign.schema`); :func:`mmalign.api.build_task`; the recipe check in
:func:`mmalign.methods.diffusion.get_diffusion_method`; :data:`mmalign.demos.DEMOS`; every ``mmalign`` sub-command
(:mod:`mmalign.cli`). Everything is a string resolved by :func:`resolve` when used, so reading the table imports
nothing (``mmalign --help`` never loads torch, diffusers or open_clip) and no layer imports a higher one.

**Adding a model family** = one adapter file (``mmalign/adapters/``), its task (``mmalign/methods/``) and one row
here; with a config section, its dataclass (``mmalign/schema_<family>.py``). Nothing else shared changes: the
schema accepts ``modality: <name>`` and gets the section, ``mmalign train`` builds the task, the CLI grows the
commands, ``mmalign demo`` lists the demos; ``tests/test_registry.py`` imports every target and the README test
asks for the row in the README's table.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["COMMANDS", "DEMOS", "MODALITIES", "Modality", "Recipe", "all_commands", "all_demos", "is_data_free",
           "resolve", "task_target"]


@dataclass(frozen=True)
class Recipe:
    """A ``loss.name`` whose run is built by its own task instead of the family's plain one."""

    task: str  # "module:Class"
    data_free: bool = False  # trains without data.train (Self-NPO samples its own inputs)


@dataclass(frozen=True)
class Modality:
    """One model family (see the module docstring for each field)."""

    name: str
    summary: str  # one line for `mmalign train --help-config`
    task: str  # "module:Class"
    recipes: dict[str, Recipe] = field(default_factory=dict)
    section: str | None = None
    section_schema: str | None = None  # "module:Class" of the section's dataclass
    commands: dict[str, str] = field(default_factory=dict)  # "group name" or "name" -> "module:function"
    demos: dict[str, str] = field(default_factory=dict)  # demo name -> "module:function"
    needs_train_fn: bool = False  # the task trains auxiliary runs: build_task passes train_fn=mmalign.api.train

    def __post_init__(self):
        if (self.section is None) != (self.section_schema is None):
            raise ValueError(f"modality {self.name!r}: section and section_schema go together")


_ONLINE = Recipe("mmalign.methods.online:OnlineDPOTask")

_ROWS = [
    Modality(
        "text", "causal LMs: DPO family, KTO, unlearning, listwise, RM, SFT and the text recipes",
        "mmalign.methods.text:TextTask",
        recipes={
            "seq_contrastive": Recipe("mmalign.methods.seq_contrastive:SeqContrastiveTask"),
            "online_dpo": _ONLINE,
            "xpo": _ONLINE,
            "token_guidance": Recipe("mmalign.methods.token_guidance:TokenGuidanceTask"),
        },
        commands={
            "sample text": "mmalign.cli.text:sample_text",
            "pairs": "mmalign.cli.pairs:pairs",
            "temple-pairs": "mmalign.cli.pairs:temple_pairs",
        },
        demos={
            "text": "mmalign.demos.text:run",
            "seq_contrastive": "mmalign.demos.seq_contrastive:run",
            "curriculum": "mmalign.demos.curriculum:run",
            "token_guidance": "mmalign.demos.token_guidance:run",
            "tdpo": "mmalign.demos.token_dpo:run",
            "online_dpo": "mmalign.demos.online_dpo:run",
        },
    ),
    Modality(
        "diffusion", "diffusion / flow-matching denoisers: Diffusion-DPO, -NPO, -KTO, SFT, Plackett-Luce, Self-NPO",
        "mmalign.methods.diffusion:DiffusionTask",
        recipes={"self_npo": Recipe("mmalign.methods.self_npo:SelfNPOTask", data_free=True)},
        section="diffusion", section_schema="mmalign.schema_diffusion:DiffusionConfig",
        commands={"sample diffusion": "mmalign.cli.diffusion:sample_diffusion"},
        demos={"diffusion": "mmalign.demos.diffusion:run"},
    ),
    Modality(
        "clip", "dual encoders (open_clip / HF CLIP): CLIP, SigLIP, CLIP-Refine, ZSCL",
        "mmalign.methods.clip:ClipTask",
        section="clip", section_schema="mmalign.schema_clip:ClipConfig",
        commands={"eval clip": "mmalign.cli.clip:eval_clip"},
        demos={"clip": "mmalign.demos.clip:run"},
    ),
    Modality(
        "prior", "vision-language LMs (LLaVA, encoder-free PatchLVLM): the preference losses on TRL vision rows, "
        "and PRIOR token-weighted caption training",
        "mmalign.methods.lvlm:LVLMTask",
        recipes={"prior": Recipe("mmalign.methods.prior:PriorTask")},
        section="prior", section_schema="mmalign.schema_clip:PriorConfig",
        demos={"prior": "mmalign.demos.prior:run"},
        needs_train_fn=True,
    ),
]
MODALITIES: dict[str, Modality] = {row.name: row for row in _ROWS}

# Commands and demos that belong to no family.
COMMANDS: dict[str, str] = {
    "train": "mmalign.cli.core:train",
    "demo": "mmalign.cli.core:demo",
    "losses": "mmalign.cli.core:losses",
}
DEMOS: dict[str, str] = {"losses": "mmalign.demos.loss_showcase:run"}


def resolve(target: str) -> Any:
    """The object named by ``"package.module:attribute"`` (imported now)."""
    module, sep, attr = target.partition(":")
    if not sep or not attr:
        raise ValueError(f"{target!r} is not of the form 'module:attribute'")
    return getattr(importlib.import_module(module), attr)


def all_demos() -> dict[str, str]:
    """Every demo: the families' (in table order), then those of no family."""
    out: dict[str, str] = {}
    for owner, demos in [*((row.name, row.demos) for row in _ROWS), ("(none)", DEMOS)]:
        for name, target in demos.items():
            if name in out:
                raise ValueError(f"demo {name!r} of {owner} is already defined as {out[name]}")
            out[name] = target
    return out


def all_commands() -> dict[str, str]:
    """Every CLI command ("train", "sample text", ...): those of no family first, then the families'."""
    out = dict(COMMANDS)
    for row in _ROWS:
        for name, target in row.commands.items():
            if name in out:
                raise ValueError(f"command {name!r} of modality {row.name!r} is already defined as {out[name]}")
            out[name] = target
    return out


def task_target(modality: str, loss_names: Iterable[str]) -> str:
    """The ``"module:Class"`` building a run of ``modality`` whose stages use ``loss_names``: the recipe those
    names select, else the family's task. One run cannot mix two recipes (each builds its own model)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality={modality!r} is not one of {sorted(MODALITIES)}")
    row, names = MODALITIES[modality], sorted(set(loss_names))
    recipes = sorted({row.recipes[n].task for n in names if n in row.recipes})
    if len(recipes) > 1:
        raise ValueError(f"one run cannot mix the {modality} recipes {recipes} (losses {names})")
    return recipes[0] if recipes else row.task


def is_data_free(modality: str, loss_name: str) -> bool:
    """Whether ``loss_name`` under ``modality`` trains without data (its recipe samples its own inputs)."""
    recipe = MODALITIES[modality].recipes.get(loss_name) if modality in MODALITIES else None
    return bool(recipe and recipe.data_free)
