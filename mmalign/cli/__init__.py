"""``mmalign`` command line: a thin layer over the Python API.

    mmalign train CONFIG.yaml [key=value ...]     train (see `mmalign train --help-config` for every key)
    mmalign sample text --model DIR [--reference DIR] --prompt "..."   generate side by side
    mmalign demo NAME --out DIR                    the demos with a measured effect (text, diffusion, clip,
                                                   prior, losses, ...)
    mmalign losses                                 list the loss engine's functions
"""

from __future__ import annotations

import sys

import typer

from ..registry import all_commands, resolve

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
    root = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
    groups: dict[str, typer.Typer] = {}
    for spec, target in (all_commands() if commands is None else commands).items():
        group, _, name = spec.rpartition(" ")
        parent = root
        if group:
            if group not in groups:
                help_text = GROUPS.get(group, f"`mmalign {group} ...` commands.")
                groups[group] = typer.Typer(no_args_is_help=True, help=help_text)
            parent = groups[group]
        fn = resolve(target)
        parent.command(name, **getattr(fn, "typer_kwargs", {}))(fn)
    for group in sorted(groups, key=lambda g: (list(GROUPS).index(g) if g in GROUPS else len(GROUPS), g)):
        root.add_typer(groups[group], name=group)
    return root


app = build_app()


def main() -> None:
    app(prog_name="mmalign")


if __name__ == "__main__":
    sys.exit(main())
