"""The package's shape, kept by a test (DESIGN.md §3): imports run downward only and form no cycles, and no
module grows past 500 lines.

Layers, bottom first: ``losses`` ← ``types`` (with the config engine, the run schema and the registry, which are
pure data) ← ``data`` ← ``models`` / ``adapters`` / ``sample`` / ``eval`` ← ``methods`` ← ``train`` ← ``api`` /
``cli`` / ``demos``. Every ``import`` statement counts, at module level or inside a function: a lazy import is
still a dependency. Modules of one layer may import each other (without cycles at module level)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mmalign"

# first dotted component under mmalign -> layer (higher may import lower or equal)
LAYERS = {
    "losses": 0,
    "types": 1, "hashing": 1, "config": 1, "config_convert": 1, "schema": 1, "schema_clip": 1,
    "schema_diffusion": 1, "registry": 1, "errors": 1, "extras": 1, "schema_av": 1, "schema_vlm": 1, "schema_v2a": 1,
    "data": 2,
    "models": 3, "adapters": 3, "sample": 3, "eval": 3,
    "methods": 4,
    "train": 5,
    "api": 6, "cli": 6, "demos": 6, "__main__": 6,
    "__init__": 6,
}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported mmalign module, line, at module level) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t == "mmalign" or t.startswith("mmalign."):
                found.append((t, node.lineno, id(node) in top_level))
    return found


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def test_every_package_has_a_layer():
    tops = {m.split(".")[1] for m in _modules() if "." in m}
    assert not sorted(tops - set(LAYERS)), "add the new top-level module or package to LAYERS"


def test_imports_run_downward_only():
    modules = _modules()
    upward = []
    for name, path in sorted(modules.items()):
        for target, line, _ in _imports(name, path):
            dep = _resolve(target, modules)
            if dep is None or dep == "mmalign" or dep == name:
                continue
            if _layer(dep) > _layer(name):
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} imports {dep}")
    assert not upward, "upward imports:\n" + "\n".join(sorted(set(upward)))


def test_no_import_cycles():
    """Module-level imports only: a cycle there fails at import time depending on which module loads first."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, top in _imports(name, path):
            dep = _resolve(target, modules)
            if top and dep and dep != name and dep != "mmalign":
                graph[name].add(dep)
    cycles, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_files_stay_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT.parent)} has {n} lines (> {MAX_LINES}): split it"
