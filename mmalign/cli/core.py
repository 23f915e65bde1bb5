"""The commands of no model family: ``mmalign train``, ``mmalign demo``, ``mmalign losses`` (plain functions;
:mod:`mmalign.cli` registers them from :data:`mmalign.registry.COMMANDS`)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import os
import re
from pathlib import Path

import typer

from ..demos import DEMOS, SUMMARY, get_demo


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def train(
    ctx: typer.Context,
    config: str = typer.Argument(None, help="YAML config file (configs/...)"),
    help_config: bool = typer.Option(False, "--help-config", help="print every config key and exit"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log INFO messages (data counts, reference and "
                                 "checkpoint steps, PRIOR's phases) to stderr; default: warnings only"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check the config and data, print the plan (stages, "
                                 "steps, data counts, output, memory); train and write nothing"),
) -> None:
    """Train with CONFIG; trailing key=value pairs override it (e.g. run.max_steps=10 loss.kwargs.beta=0.05)."""
    from ..config import ConfigError, describe
    from ..data.rows import DataError
    from ..schema import TrainConfig

    if help_config:
        typer.echo(plain_text(describe(TrainConfig)) + "\n\n" + options_help())
        raise typer.Exit()
    _setup_logging(verbose)
    overrides = list(ctx.args)
    if config and "=" in config and not Path(config).exists():  # only overrides, no file
        overrides, config = [config, *overrides], None
    from ..api import plan
    from ..api import train as api_train

    if dry_run:
        try:
            typer.echo(format_plan(plan(config, overrides)))
        except (ConfigError, DataError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        return
    try:
        summary = api_train(config, overrides)
    except (ConfigError, DataError) as err:
        if is_main_process():  # every rank finds the same problem; one copy on the console, every rank exits 2
            typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if is_main_process():  # under DDP every rank returns the summary; one copy on the console
        typer.echo(json.dumps(summary, indent=1, default=str))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # a launcher waits on un-destroyed groups at exit
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun / accelerate set RANK, LOCAL_RANK), or a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    return rank.strip() in ("", "0")


# reST of docstrings -> plain text for --help (typer shows docstrings verbatim): roles keep their target (``~``:
# its last component), ``literal`` loses the backquotes; an indented paragraph (a reST literal block) gets click's
# "\b" marker so that its lines are not re-wrapped.
_ROLE = re.compile(r":(?:func|class|mod|data|meth|attr|obj|exc|ref|const):`(~?)([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain_text(text: str | None) -> str:
    """``text`` with its reST markup (roles, double-backquoted literals, literal blocks) made plain for a terminal."""
    if not text:
        return ""
    text = _ROLE.sub(lambda m: m.group(2).rpartition(".")[2] if m.group(1) else m.group(2), text)
    text = _LITERAL.sub(r"\1", inspect.cleandoc(text))
    paras = text.split("\n\n")
    return "\n\n".join("\b\n" + p if p.startswith((" ", "\t")) and "\b" not in p else p for p in paras)


def options_help() -> str:
    """``--help-config``'s ``options:`` section: the keys of every recipe's typed options (the dataclass documented
    as ``options:`` in the module of a METHODS row's ``recipe``, and the token-level rows' ``TokenOptions``), each
    with its type, default and the comment beside it in the source."""
    from ..adapters.sparse_masks import TokenOptions
    from ..config import describe
    from ..methods.table import METHODS

    users: dict[type, list[str]] = {}
    missing: list[str] = []
    for m in METHODS.values():
        schemas = [TokenOptions] if m.token_kl else []
        if m.recipe:
            try:
                mod = importlib.import_module(m.recipe.partition(":")[0])
            except ImportError as err:  # a family whose extra is missing: say so instead of failing the listing
                missing.append(f"loss.name={m.name}: its options are not listed ({err})")
                continue
            schemas += [c for c in vars(mod).values() if isinstance(c, type) and dataclasses.is_dataclass(c)
                        and c.__module__ == mod.__name__ and "``options:``" in (c.__doc__ or "")]
        for schema in schemas:
            users.setdefault(schema, []).append(m.name)
    lines = ["options.* by loss.name (recipe options; unknown keys and bad values are refused at config load):"]
    for schema, names in users.items():
        lines.append(f"loss.name={' | '.join(names)} ({schema.__module__}.{schema.__name__})")
        notes = _field_notes(schema)
        for line in describe(schema).splitlines():
            lines.append(f"options.{line}")
            if (name := line.partition(":")[0]) in notes:
                lines.append(f"    {notes[name]}")
    return plain_text("\n".join(lines + missing))


def _field_notes(schema: type) -> dict[str, str]:
    """Field name -> its comment in the class body (``name: T = v  # why``) or its line in ``Attributes:``."""
    notes = {k: " ".join(v.split()) for k, v in re.findall(r"^ {8}(\w+): (.+(?:\n {12}.+)*)", schema.__doc__ or "",
                                                           flags=re.M)}
    try:
        src = inspect.getsource(schema)
    except (OSError, TypeError):
        return notes
    notes.update(re.findall(r"^ {4}(\w+):[^#\n]*#\s*(.+)$", src, flags=re.M))
    return notes


def format_plan(p: dict) -> str:
    """The dry-run plan of :func:`mmalign.api.plan` as a few readable lines."""
    lines = ["dry run: nothing trained, nothing written",
             f"modality {p['modality']}, family {p['family']}, task {p['task']}",
             f"model {p['model']}{' (LoRA)' if p['lora'] else ''}: {p['parameters']} parameters; memory "
             f"{p['memory']}",
             f"batch {p['batch']['batch_size']} × grad_accum {p['batch']['grad_accum']}; reference {p['reference']}"]
    for i, st in enumerate(p["stages"]):
        loss = f"loss {st['loss']} {json.dumps(st['kwargs'], default=str)}" if "loss" in st else "loss (recipe)"
        lines.append(f"stage {i} {st['name']}: {st['steps']} steps ({st['steps_from']}), {loss}, "
                     f"train {', '.join(st['train'])}")
    for f, d in p["data"].items():
        why = f" {d['skipped']}" if d.get("skipped") else ""
        lines.append(f"data {d['split']} {f}: {d['good']} good, {d['bad']} bad rows{why}")
    out = p["output"]
    lines.append(f"output {out['dir']} ({'exists' if out['exists'] else 'new'}): {out['action']}"
                 + (f": {out['why']}" if out.get("why") else ""))
    lines.append(f"total: {p['total_steps']} optimizer steps")
    return "\n".join(lines)


# Read by mmalign.cli when it registers the command: trailing key=value tokens are overrides, not options.
train.typer_kwargs = {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True}}


def demo(
    name: str = typer.Argument("text", help=f"one of {sorted(DEMOS)}"),
    out: str = typer.Option("outputs/demo", help="output directory (a subdirectory per demo, one per seed in it)"),
    seeds: int = typer.Option(3, "--seeds", min=1, help="run seeds 0..N-1 (training, data and sampling seeds) and "
                              "report the mean, std and 95 % t-interval of the metric"),
    full: bool = typer.Option(False, "--full/--fast", help="--full: the setting of the README's figures (seed 0 is "
                              "its single-seed run); --fast (default): a reduced budget that only shows the "
                              "pipeline runs"),
) -> None:
    """Run a demo end to end over seeds and print its report (see the list below)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        # Demo models are tiny: a second intra-op thread only adds spin-waits (measured several times slower on a
        # shared 2-core machine). OMP_NUM_THREADS overrides this.
        torch.set_num_threads(1)
    try:
        run = get_demo(name)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    from ..demos.seeds import run_seeds

    target = Path(out) / name
    report = run_seeds(name, run, target, seeds=seeds, full=full, log=lambda m: typer.echo(m, err=True))
    typer.echo(json.dumps({k: v for k, v in report.items() if k not in ("losses_available", "per_seed")}, indent=1))
    typer.echo(f"report: {target / 'report.md'}")


def _demo_help() -> str:
    """``mmalign demo --help``: one line per demo with its measured effect and run times (``\\b`` keeps click's line
    breaks)."""
    lines = []
    for name in DEMOS:
        what, effect, fast, full = SUMMARY.get(name, ("(no summary)", None, None, None))
        times = f"fast ~{fast:.0f} s" if fast else "fast: not timed"
        times += f", --full ~{full:.0f} s per seed" if full else ", --full: not timed"
        lines.append(f"{name}: {what}. " + (f"--full, 3 seeds: {effect}. " if effect else "") + times + ".")
    return (f"{demo.__doc__}\n\n\b\n" + "\n".join(lines) + "\n\nEffects: mean ± std over seeds 0-2. Times: 2-core "
            "CPU, one thread; the fast default (3 seeds) includes imports. Every demo writes OUT/NAME/report.json "
            "(before/after = means over seeds, per_seed, before_spread/after_spread), report.md, seeds.png and "
            "seed{k}/ with each seed's own report.")


demo.__doc__ = _demo_help()


def losses() -> None:
    """List every loss in mmalign.losses.LOSSES with the first line of its docstring."""
    from ..losses import LOSSES

    for name, fn in sorted(LOSSES.items()):
        first = (fn.__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:24s} {first}")
