"""MODALITIES: the one table that names the model families a run can use (DESIGN.md §2).

One :class:`Modality` row per family says everything the shared layers need to know about it:

- ``task``: the ``"module:Class"`` of the task that builds a run (model, data, scores, loss, save); losses with
  per-step work (online generation, self-made negatives, token guidance, Self-NPO, PRIOR) name their own task
  in their row of :data:`mmalign.methods.table.METHODS` (``recipe``), the one table of loss names;
- ``section``: the config section the family reads (``diffusion:``, ``clip:``, ``prior:``) and
  ``section_schema``, the ``"module:Class"`` of its dataclass; the run schema adds one always-present section per
  row that has one;
- ``commands``: CLI sub-commands, ``"sample text"`` → ``"module:function"`` (a space nests it under a group);
- ``demos``: ``mmalign demo NAME`` → ``"module:function"`` (``run(out_dir) -> report``);
- ``extras``: the ``pip install 'mmalign[...]'`` extras the family needs (:data:`mmalign.extras.EXTRAS`), checked
  before its task is imported, so a missing one is an error naming the install command.

What derives from it: ``TrainConfig.modality``'s allowed values and help and the sections of the run schema
(:mod:`mmalign.schema`); :func:`mmalign.api.build_task`; :data:`mmalign.demos.DEMOS`; every ``mmalign``
sub-command (:mod:`mmalign.cli`). Everything is a string resolved by :func:`resolve` when used, so reading the
table imports nothing (``mmalign --help`` never loads torch, diffusers or open_clip) and no layer imports a higher
one.

**Adding a model family** = one adapter file (``mmalign/adapters/``), its task (``mmalign/methods/``) and one row
here; with a config section, its dataclass (``mmalign/schema_<family>.py``). Nothing else shared changes: the
schema accepts ``modality: <name>`` and gets the section, ``mmalign train`` builds the task, the CLI grows the
commands, ``mmalign demo`` lists the demos; ``tests/test_registry.py`` imports every target and the README test
asks for the row in the README's table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["COMMANDS", "DEMOS", "MODALITIES", "Modality", "all_commands", "all_demos", "resolve"]


@dataclass(frozen=True)
class Modality:
    """One model family (see the module docstring for each field)."""

    name: str
    summary: str  # one line for `mmalign train --help-config`
    task: str  # "module:Class"
    section: str | None = None
    section_schema: str | None = None  # "module:Class" of the section's dataclass
    commands: dict[str, str] = field(default_factory=dict)  # "group name" or "name" -> "module:function"
    demos: dict[str, str] = field(default_factory=dict)  # demo name -> "module:function"
    needs_train_fn: bool = False  # the task trains auxiliary runs: build_task passes train_fn=mmalign.api.train
    extras: tuple[str, ...] = ()  # pip extras the family needs (mmalign.extras.EXTRAS), checked before import

    def __post_init__(self):
        if (self.section is None) != (self.section_schema is None):
            raise ValueError(f"modality {self.name!r}: section and section_schema go together")


_ROWS = [
    Modality(
        "text", "causal LMs: DPO family, KTO, unlearning, listwise, RM, SFT and the text recipes",
        "mmalign.methods.text:TextTask", extras=("text",),
        commands={
            "sample text": "mmalign.cli.text:sample_text",
            "eval text": "mmalign.cli.eval_gen:eval_text",
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
        "mmalign.methods.diffusion:DiffusionTask", extras=("diffusion",),
        section="diffusion", section_schema="mmalign.schema_diffusion:DiffusionConfig",
        commands={"sample diffusion": "mmalign.cli.diffusion:sample_diffusion",
                  "eval diffusion": "mmalign.cli.eval_gen:eval_diffusion"},
        demos={"diffusion": "mmalign.demos.diffusion:run"},
    ),
    Modality(
        "clip", "dual encoders (open_clip / HF CLIP): CLIP, SigLIP, CLIP-Refine, ZSCL",
        "mmalign.methods.clip:ClipTask", extras=("clip",),
        section="clip", section_schema="mmalign.schema_clip:ClipConfig",
        commands={"eval clip": "mmalign.cli.clip:eval_clip"},
        demos={"clip": "mmalign.demos.clip:run"},
    ),
    Modality(
        "prior", "vision-language LMs (LLaVA, encoder-free PatchLVLM): the preference losses on TRL vision rows, "
        "and PRIOR token-weighted caption training",
        "mmalign.methods.lvlm:LVLMTask", extras=("vision",),
        section="prior", section_schema="mmalign.schema_clip:PriorConfig",
        commands={"sample prior": "mmalign.cli.lvlm:sample_prior"},
        demos={"prior": "mmalign.demos.prior:run"},
        needs_train_fn=True,
    ),
    Modality(
        "vlm", "vision-language LMs on images and video (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, LLaVA-NeXT-Video): "
        "the preference losses on TRL / ms-swift / TEMPLE rows", "mmalign.methods.vlm:VLMTask",
        extras=("vision", "video"), section="vlm", section_schema="mmalign.schema_vlm:VLMConfig",
        commands={"sample vlm": "mmalign.cli.vlm:sample_vlm",
                  "temple-pairs-vlm": "mmalign.cli.temple_vlm:temple_pairs_vlm"},
        demos={"temple": "mmalign.demos.temple:run"},
    ),
    Modality(
        "av", "audio-visual slow/fast contrastive encoder (SF-CAVP-style, MultiSoundGen): CAVP inter/intra/temporal "
        "InfoNCE; the AVP-RPO reward", "mmalign.methods.av:AVTask", extras=("vision", "video", "audio"),
        section="av", section_schema="mmalign.schema_av:AVConfig", commands={"eval av": "mmalign.cli.av:eval_av"},
    ),
    Modality(
        "v2a", "video-to-audio flow-matching generators (MMAudio-style, diffusers audio DiT/VAE/vocoder): flow "
        "matching (sft), flow DPO, NPO, KTO, Plackett-Luce", "mmalign.methods.v2a:V2ATask",
        extras=("diffusion", "video", "audio"), section="v2a", section_schema="mmalign.schema_v2a:V2AConfig",
        commands={"sample v2a": "mmalign.cli.v2a:sample_v2a"}, demos={"v2a": "mmalign.demos.v2a:run"},
    ),
]
MODALITIES: dict[str, Modality] = {row.name: row for row in _ROWS}

# Commands and demos that belong to no family.
COMMANDS: dict[str, str] = {
    "train": "mmalign.cli.core:train",
    "demo": "mmalign.cli.core:demo",
    "losses": "mmalign.cli.core:losses",
    "merge": "mmalign.cli.merge:merge",
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
