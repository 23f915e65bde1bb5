"""``mmalign`` command line: a thin layer over the Python API.

  mmalign train CONFIG.yaml [key=value ...]   train
  mmalign sample text --model DIR --prompt P  generate samples
  mmalign demo NAME --out DIR                 run a demo, report its effect
  mmalign losses                              list the loss functions

Every command has --help; `mmalign train --help-config` lists every config key.
"""

from __future__ import annotations

import inspect
import sys

import typer
from rich.markup import escape

from ..registry import all_commands, resolve
from .core import plain_text

# The sub-commands come from mmalign.registry (COMMANDS of no family, then each family's row): "train" is a
# top-level command, "sample text" is command "text" of the group "sample". The command modules
# (mmalign/cli/*.py) hold plain functions and never import this package: registering happens only here. A
# function may carry `typer_kwargs` (a dict for `Typer.command`, e.g. train's context_settings).

# Groups of nested commands (name -> help), in the order `mmalign --help` lists them; a group a new family
# introduces without an entry here gets a generic help line.
GROUPS = {
    "sample": "Generate samples from trained checkpoints.",
    "eval": "Evaluate checkpoints (e.g. CLIP zero-shot/retrieval).",
}


def build_app(commands: dict[str, str] | None = None) -> typer.Typer:
    """The ``mmalign`` app with every command of ``commands`` (default: the registry's), each imported now."""
    root = typer.Typer(add_completion=False, no_args_is_help=True, help=_help(__doc__))
    groups: dict[str, typer.Typer] = {}
    for spec, target in (all_commands() if commands is None else commands).items():
        group, _, name = spec.rpartition(" ")
        parent = root
        if group:
            if group not in groups:
                help_text = GROUPS.get(group, f"`mmalign {group} ...` commands.")
                groups[group] = typer.Typer(no_args_is_help=True, help=_help(help_text))
            parent = groups[group]
        fn = resolve(target)
        _plain_parameter_help(fn)
        parent.command(name, help=_help(fn.__doc__), **getattr(fn, "typer_kwargs", {}))(fn)
    for group in sorted(groups, key=lambda g: (list(GROUPS).index(g) if g in GROUPS else len(GROUPS), g)):
        root.add_typer(groups[group], name=group)
    return root


def _help(text: str | None) -> str:
    """A help text as the terminal should show it. Typer prints docstrings verbatim, and ours are reST
    (:func:`plain_text`); in its rich mode (the default) ``[word ...]`` is a markup tag and vanishes unless
    escaped (``[key=value ...]``, ``[str, ...]`` did)."""
    text = plain_text(text)
    return escape(text) if getattr(typer.core, "DEFAULT_MARKUP_MODE", None) == "rich" else text


def _plain_parameter_help(fn) -> None:
    """The same for the help of each ``typer.Option`` / ``typer.Argument`` default of ``fn``, in place, once (the
    defaults are module-level objects that outlive one app)."""
    for p in inspect.signature(fn).parameters.values():
        info = p.default
        if isinstance(info, typer.models.ParameterInfo) and info.help and not getattr(info, "_mmalign_help", False):
            info.help = _help(info.help)
            info._mmalign_help = True  # type: ignore[attr-defined]


app = build_app()


def main() -> None:
    app(prog_name="mmalign")


if __name__ == "__main__":
    sys.exit(main())
