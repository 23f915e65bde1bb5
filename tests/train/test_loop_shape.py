"""The loop's shape, kept by a test: small functions, hooks called rather than probed, no private accelerate
attributes, and every task on the one :class:`~mmalign.methods.task.Task` base."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from mmalign.methods.task import Task

TRAIN = Path(__file__).resolve().parents[2] / "mmalign" / "train"
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 400


def _sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(TRAIN.glob("*.py"))}


def test_no_function_in_train_is_longer_than_80_lines():
    long = []
    for name, text in _sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}:{node.lineno} {node.name}() has {n} lines")
    assert not long, "split these:\n" + "\n".join(long)


def test_train_files_stay_small():
    big = [f"{name}: {len(text.splitlines())} lines" for name, text in _sources().items()
           if len(text.splitlines()) > MAX_FILE_LINES]
    assert not big


def test_the_loop_calls_task_hooks_without_probing_for_them():
    """Hooks have no-op defaults on Task; ``hasattr(task, ...)``/``getattr(task, ...)`` would hide a misspelt hook."""
    probes = []
    for name, text in _sources().items():
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("hasattr", "getattr") and node.args):
                target = ast.unparse(node.args[0])
                if target == "task" or target.endswith(".task"):
                    probes.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert not probes


def test_no_private_accelerator_attributes_in_train():
    private = []
    for name, text in _sources().items():
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Attribute) and node.attr in ("_models", "_optimizers", "_schedulers",
                                                                   "_dataloaders", "_custom_objects")):
                private.append(f"{name}:{node.lineno} .{node.attr}")
    assert not private


@pytest.mark.parametrize("path", [
    "mmalign.methods.clip:ClipTask", "mmalign.methods.diffusion:DiffusionTask", "mmalign.methods.prior:PriorTask",
    "mmalign.methods.self_npo:SelfNPOTask", "mmalign.methods.text:TextTask",
    "mmalign.methods.token_guidance:TokenGuidanceTask", "mmalign.methods.online:OnlineDPOTask",
    "mmalign.methods.seq_contrastive:SeqContrastiveTask",
])
def test_every_task_inherits_the_task_base(path):
    module, cls = path.split(":")
    assert issubclass(getattr(importlib.import_module(module), cls), Task)


def test_nothing_imports_stage_data_or_task_from_train():
    root = TRAIN.parents[1]
    found = []
    for p in [*root.joinpath("mmalign").rglob("*.py"), *root.joinpath("tests").rglob("*.py"),
              *root.joinpath("scripts").rglob("*.py")]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and "train" in (node.module or "").split("."):
                names = {a.name for a in node.names} & {"StageData", "Task"}
                if names:
                    found.append(f"{p.relative_to(root)}:{node.lineno} imports {sorted(names)}")
    assert not found
