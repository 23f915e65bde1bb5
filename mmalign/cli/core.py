"""The commands of no model family: ``mmalign train``, ``mmalign demo``, ``mmalign losses`` (plain functions;
:mod:`mmalign.cli` registers them from :data:`mmalign.registry.COMMANDS`)."""

from __future__ import annotations

import json
import logging
import os
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
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check the config and data, print the plan (stages, "
                                 "steps, data counts, output, memory); train and write nothing"),
) -> None:
    """Train with CONFIG; trailing key=value pairs override it (e.g. run.max_steps=10 loss.kwargs.beta=0.05)."""
    from ..config import ConfigError, describe
    from ..data.rows import DataError
    from ..schema import TrainConfig

    if help_config:
        typer.echo(describe(TrainConfig))
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
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(summary, indent=1, default=str))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # a launcher waits on un-destroyed groups at exit
        dist.destroy_process_group()


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
