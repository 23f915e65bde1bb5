"""Optional dependencies: which ``pip install 'mmalign[EXTRA]'`` brings which modules, and a check that names it.

``pip install mmalign`` installs the core only: torch (all that :mod:`mmalign.losses` imports), accelerate and
what the loop, the config engine and the CLI need. Each model family needs its extra; a family module calls
:func:`require` before importing a third-party package, so a missing one fails with the command that installs it
instead of a bare ``ModuleNotFoundError`` from deep inside an import chain. The table below is the single source:
``pyproject.toml``'s ``[project.optional-dependencies]`` lists the same distributions (a test compares them).

Two checks use it: :func:`require` (``mmalign train`` checks the modality's extras before importing its task), and
an import hint (:func:`install_import_hint`, installed by ``import mmalign``): when code *inside mmalign* imports a
package of the table that is not installed, the ``ImportError`` names the extra to install. The hint is the last
finder on ``sys.meta_path`` and answers only for those names and only for imports made by mmalign's own modules,
so other libraries' optional imports behave as before.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from .errors import ConfigError

__all__ = ["EXTRAS", "MissingExtraError", "install_import_hint", "missing_modules", "require"]

# extra -> the import names it provides (a distribution's import name, e.g. open_clip_torch -> open_clip)
EXTRAS: dict[str, tuple[str, ...]] = {
    "text": ("transformers", "peft", "datasets", "matplotlib"),
    "diffusion": ("diffusers", "transformers", "peft", "PIL", "matplotlib"),
    "clip": ("open_clip", "transformers", "peft", "PIL", "torchvision", "datasets", "matplotlib"),
    "vision": ("transformers", "peft", "PIL", "torchvision", "matplotlib"),
    "video": ("decord", "av", "PIL"),
    "audio": ("soundfile", "av", "torchaudio"),
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
}


class MissingExtraError(ConfigError, ImportError):
    """A family's optional dependencies are not installed (the message names the pip command). A
    :class:`~mmalign.errors.ConfigError`, so ``mmalign train`` prints it as one ``error:`` line (exit 2)."""

    def __init__(self, message: str, name: str | None = None):
        ConfigError.__init__(self, message)
        self.name = name

    def __reduce__(self):
        return type(self), (self.errors[0], self.name)


def missing_modules(extra: str) -> list[str]:
    """The import names of ``extra`` that cannot be found (without importing them)."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; valid: {sorted(EXTRAS)}")
    out = []
    for name in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a blocked or half-installed package
            found = False
        if not found:
            out.append(name)
    return out


def require(*extras: str, what: str = "") -> None:
    """Raise :class:`MissingExtraError` naming ``pip install 'mmalign[...]'`` when a module of ``extras`` is missing.

    ``what`` names the feature in the message (e.g. ``"the diffusion family"``)."""
    missing = {e: m for e in extras if (m := missing_modules(e))}
    if missing:
        mods = sorted({name for names in missing.values() for name in names})
        spec = ",".join(missing)
        raise MissingExtraError(
            f"{what or 'this feature'} needs {', '.join(mods)}, which {'is' if len(mods) == 1 else 'are'} not "
            f"installed; run: pip install 'mmalign[{spec}]'  (or 'mmalign[all]' for every family)")


def _extras_of(module: str) -> list[str]:
    return [extra for extra, names in EXTRAS.items() if module in names]


def _called_from_mmalign() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name == "mmalign" or name.startswith("mmalign."):
            return name != __name__
        if not name.startswith(("importlib", "_frozen_importlib")):
            return False
        frame = frame.f_back
    return False


class _ExtraHint(importlib.abc.MetaPathFinder):
    """Consulted after every real finder failed: a missing optional package imported by mmalign → the extra."""

    def find_spec(self, fullname, path=None, target=None):
        if path is not None or not _extras_of(fullname) or not _called_from_mmalign():
            return None
        extras = _extras_of(fullname)
        raise MissingExtraError(
            f"No module named {fullname!r}: install the mmalign extra that provides it: "
            f"pip install 'mmalign[{extras[0]}]'" + (f" (also in {', '.join(extras[1:])})" if extras[1:] else "")
            + "; 'mmalign[all]' installs every family", name=fullname)


def install_import_hint() -> None:
    """Append the hint finder to ``sys.meta_path`` once."""
    if not any(isinstance(f, _ExtraHint) for f in sys.meta_path):
        sys.meta_path.append(_ExtraHint())
