"""The MODALITIES registry (mmalign/registry.py) and everything derived from it: every target imports, the schema's
modality choices and sections, build_task's recipe choice (from the METHODS rows' ``recipe``), the Self-NPO
data-free case, the demos, the README."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from mmalign import registry as R
from mmalign.methods.table import METHODS
from mmalign.registry import COMMANDS, MODALITIES, Modality, all_commands, all_demos, resolve

REPO = Path(__file__).resolve().parents[1]


def _targets() -> list[tuple[str, str]]:
    out = []
    for row in MODALITIES.values():
        out.append((f"{row.name}.task", row.task))
        out += [(f"{row.name}.commands[{n}]", t) for n, t in row.commands.items()]
        out += [(f"{row.name}.demos[{n}]", t) for n, t in row.demos.items()]
        if row.section_schema:
            out.append((f"{row.name}.section_schema", row.section_schema))
    out += [(f"COMMANDS[{n}]", t) for n, t in COMMANDS.items()]
    out += [(f"DEMOS[{n}]", t) for n, t in R.DEMOS.items()]
    out += [(f"METHODS[{n}].recipe", m.recipe) for n, m in METHODS.items() if m.recipe]
    return out


def _recipes(modality: str) -> list[str]:
    """Names of the METHODS rows whose recipe runs on ``modality``'s family."""
    family = resolve(MODALITIES[modality].task).family_cls
    return sorted(n for n, m in METHODS.items() if m.recipe and m.family == family.name)


@pytest.mark.parametrize("where,target", _targets(), ids=lambda x: x)
def test_every_target_imports_and_is_callable(where, target):
    obj = resolve(target)
    assert callable(obj), f"{where} = {target} is not callable"
    if ".task" in where or ".recipe" in where:
        assert inspect.isclass(obj) and "cfg" in inspect.signature(obj).parameters
    if where.endswith("section_schema"):
        assert dataclasses.is_dataclass(obj)


def test_rows_are_frozen_and_keyed_by_name():
    row = MODALITIES["text"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.name = "other"
    assert all(name == r.name for name, r in MODALITIES.items())
    with pytest.raises(ValueError, match="go together"):
        Modality("x", "x", "m:C", section="x")


def test_resolve_names_a_bad_target():
    with pytest.raises(ValueError, match="module:attribute"):
        resolve("mmalign.registry")


def test_schema_choices_and_sections_come_from_the_registry():
    from mmalign.config import ConfigError, load_config
    from mmalign.schema import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    assert typing.get_args(hints["modality"]) == tuple(MODALITIES)
    help_text = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig)}["modality"]
    assert all(name in help_text for name in MODALITIES)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    sections = [r.section for r in MODALITIES.values() if r.section]
    assert names[-1] == "options" and names[-1 - len(sections):-1] == sections
    for row in MODALITIES.values():
        if row.section:
            assert hints[row.section] is resolve(row.section_schema)
    from mmalign.schema import PriorConfig  # the section classes stay importable from the schema

    assert PriorConfig is resolve(MODALITIES["prior"].section_schema)
    with pytest.raises(ConfigError, match="allowed values: " + ", ".join(repr(n) for n in MODALITIES)):
        load_config(TrainConfig, {"modality": "audio", "data": {"train": ["x.jsonl"]}})


def test_data_free_recipes_skip_the_data_check():
    from mmalign.api import load_train_config, task_target
    from mmalign.config import ConfigError, load_config
    from mmalign.schema import TrainConfig

    assert METHODS["self_npo"].data_free and not METHODS["dpo"].data_free
    # the schema cannot see the loss's row (it sits below the methods table): build_task checks, before building
    load_config(TrainConfig, {"modality": "diffusion", "loss": {"name": "dpo"}})
    free = load_train_config({"modality": "diffusion", "loss": {"name": "self_npo"}})
    assert task_target(free) == "mmalign.methods.self_npo:SelfNPOTask"
    for modality, loss in [("diffusion", "dpo"), ("text", "self_npo"), ("text", "dpo")]:
        with pytest.raises(ConfigError, match="data.train is empty"):
            task_target(load_train_config({"modality": modality, "loss": {"name": loss}}))


def _cfg(modality: str, loss: str, *stage_losses: str):
    from mmalign.api import load_train_config

    stages = [{"name": f"s{i}", "loss": {"name": n}} for i, n in enumerate(stage_losses)]
    return load_train_config({"modality": modality, "loss": {"name": loss}, "data": {"train": ["x.jsonl"]},
                              "stages": stages})


@pytest.fixture
def built(monkeypatch):
    """build_task with the resolved class replaced by a recorder (keeping its family): (target, kwargs)."""
    import mmalign.api as api

    def fake(target):
        class Recorder:
            family_cls = getattr(resolve(target), "family_cls", None)

            def __new__(cls, cfg, **kw):
                return target, kw

        return Recorder

    monkeypatch.setattr(api, "resolve", fake)
    return api.build_task


@pytest.mark.parametrize("modality,losses,expected", [
    ("text", ["dpo"], "mmalign.methods.text:TextTask"),
    ("text", ["xpo"], "mmalign.methods.online:OnlineDPOTask"),
    ("text", ["sft", "online_dpo"], "mmalign.methods.online:OnlineDPOTask"),  # a stage's loss picks it too
    ("text", ["online_dpo", "xpo"], "mmalign.methods.online:OnlineDPOTask"),  # one task, two names
    ("text", ["seq_contrastive"], "mmalign.methods.seq_contrastive:SeqContrastiveTask"),
    ("text", ["token_guidance"], "mmalign.methods.token_guidance:TokenGuidanceTask"),
    ("text", ["self_npo"], "mmalign.methods.text:TextTask"),  # another family's recipe: TextTask refuses it
    ("diffusion", ["dpo"], "mmalign.methods.diffusion:DiffusionTask"),
    ("diffusion", ["self_npo"], "mmalign.methods.self_npo:SelfNPOTask"),
    ("diffusion", ["token_guidance"], "mmalign.methods.diffusion:DiffusionTask"),
    ("clip", ["clip_refine"], "mmalign.methods.clip:ClipTask"),
    ("prior", ["prior"], "mmalign.methods.prior:PriorTask"),
])
def test_build_task_picks_the_recipe_by_loss_name(built, modality, losses, expected):
    from mmalign.api import task_target

    target, kwargs = built(_cfg(modality, *losses))
    assert target == expected
    assert task_target(_cfg(modality, *losses)) == expected
    if MODALITIES[modality].needs_train_fn:
        from mmalign.api import train

        assert kwargs == {"train_fn": train}
    else:
        assert kwargs == {}


def test_build_task_refuses_two_recipes_in_one_run():
    from mmalign.api import build_task

    with pytest.raises(ValueError, match="one run cannot mix the text recipes"):
        build_task(_cfg("text", "online_dpo", "token_guidance"))


def test_recipe_rows_are_refused_outside_their_family_and_task():
    """Recipe names are rows of the one table: listed among the valid names of their family, refused (with the
    reason) by other families at config load, and by the family's plain task (which points at build_task)."""
    from mmalign.adapters.causal_lm_family import CausalLMFamily
    from mmalign.api import build_task
    from mmalign.config import ConfigError
    from mmalign.methods.diffusion import DiffusionFamily, DiffusionTask, get_diffusion_method
    from mmalign.methods.preference import resolve_stage_losses
    from mmalign.methods.table import get_method, valid_names

    assert get_diffusion_method("self_npo") is METHODS["self_npo"]
    assert {"online_dpo", "xpo", "seq_contrastive", "token_guidance"} <= set(valid_names(CausalLMFamily))
    assert "self_npo" not in valid_names(CausalLMFamily) and "self_npo" in valid_names(DiffusionFamily)
    with pytest.raises(ConfigError, match=r"valid: \[.*'online_dpo'.*'token_guidance'.*'xpo'"):
        get_method("onlinedpo", CausalLMFamily)
    with pytest.raises(ConfigError, match="cannot run on the causal_lm family: it is a recipe of the diffusion"):
        get_method("self_npo", CausalLMFamily)
    with pytest.raises(ConfigError, match="token_guidance.*cannot run on the diffusion family"):
        get_method("token_guidance", DiffusionFamily)
    with pytest.raises(ConfigError, match="cannot run on the causal_lm family"):  # before anything is built
        build_task(_cfg("text", "self_npo"))
    with pytest.raises(ConfigError, match="SelfNPOTask recipe, not a loss of DiffusionTask.*build_task"):
        resolve_stage_losses(_cfg("diffusion", "self_npo"), DiffusionFamily, DiffusionTask)


def test_demos_and_commands_are_unique_and_derived():
    from mmalign.demos import DEMOS, get_demo

    assert DEMOS == all_demos()
    assert len(DEMOS) == sum(len(r.demos) for r in MODALITIES.values()) + len(R.DEMOS)
    assert get_demo("losses") is resolve(R.DEMOS["losses"])
    with pytest.raises(ValueError, match="valid: "):
        get_demo("nope")
    assert len(all_commands()) == len(COMMANDS) + sum(len(r.commands) for r in MODALITIES.values())


def test_cli_lists_the_registry_commands_and_demos():
    from typer.testing import CliRunner

    from mmalign.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["demo", "--help"], env={"COLUMNS": "300"})
    assert out.exit_code == 0
    for name in all_demos():
        assert f"'{name}'" in out.output
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "300"}).output
    for spec in all_commands():
        group, _, name = spec.rpartition(" ")
        assert re.search(rf"│ {re.escape(group or name)}\s", top), spec
        if group:
            sub = runner.invoke(app, [group, "--help"], env={"COLUMNS": "300"}).output
            assert re.search(rf"│ {re.escape(name)}\s", sub), spec


def _imports_of(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (a file under mmalign/)."""
    rel = path.relative_to(REPO).with_suffix("")
    pkg = list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - (node.level - 1)] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_command_modules_do_not_import_the_cli_and_methods_do_not_import_the_api():
    for path in sorted((REPO / "mmalign" / "cli").glob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        bad = {m for m in _imports_of(path) if m == "mmalign.cli" or m.startswith("mmalign.cli.")}
        assert not bad, f"{path.name} imports {bad}: command modules hold plain functions"
    for path in sorted((REPO / "mmalign" / "methods").glob("*.py")):
        bad = {m for m in _imports_of(path) if m.split(".")[:2] in (["mmalign", "api"], ["mmalign", "cli"])}
        assert not bad, f"methods/{path.name} imports {bad}"


def test_help_stays_light_and_every_command_module_imports_alone():
    code = ("import sys\nsys.argv = ['mmalign', '--help']\nfrom mmalign.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = {'torch', 'diffusers', 'open_clip', 'transformers', 'accelerate', 'peft'}\n"
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}), file=sys.stderr)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stderr.strip().splitlines()[-1] == "[]", run.stderr
    mods = sorted({t.partition(":")[0] for t in all_commands().values()})
    for m in mods:  # each in a fresh interpreter: no import order can hide a cycle
        run = subprocess.run([sys.executable, "-c", f"import {m}"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr


def test_readme_table_lists_every_family_with_its_commands_and_demos():
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Model families.*?(?=^## )", text, flags=re.M | re.S)
    assert section, "README.md: the '## Model families, commands and demos' section is missing"
    rows = {line.split("|")[1].strip(): line for line in section.group(0).splitlines() if line.startswith("| ")}
    for row in MODALITIES.values():
        line = rows.get(f"`{row.name}`")
        assert line, f"README.md: add a row for modality {row.name!r} to the model-family table"
        for name in [*row.commands, *row.demos, *_recipes(row.name)]:
            assert f"`{name}`" in line or f"`mmalign {name}`" in line, f"README.md row {row.name!r} lacks {name!r}"
        if row.section:
            assert f"`{row.section}:`" in line
    line = rows.get("(none)", "")
    for name in [*COMMANDS, *R.DEMOS]:
        assert f"`{name}`" in line or f"`mmalign {name}`" in line, f"README.md row (none) lacks {name!r}"


def test_recipe_rows_name_their_family():
    """Every recipe row names a modality's family, and its task (a PreferenceTask subclass) builds that family."""
    from mmalign.methods.table import Method

    assert Method("x", "sft", False, None).data_free is False
    with pytest.raises(ValueError, match="go together"):
        Method("x", "sft", False, None, recipe="m:C")
    families = {resolve(row.task).family_cls.name for row in MODALITIES.values()}
    for name, m in METHODS.items():
        if m.recipe:
            assert m.family in families, name
            assert resolve(m.recipe).family_cls.name == m.family, name  # every recipe runs on its row's family
