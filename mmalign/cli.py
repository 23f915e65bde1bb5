"""``mmalign`` command line: a thin layer over the Python API.

    mmalign train CONFIG.yaml [key=value ...]     train (see `mmalign train --help-config` for every key)
    mmalign sample text --model DIR [--reference DIR] --prompt "..."   generate side by side
    mmalign demo NAME --out DIR                    the demos with a measured effect (text, diffusion, clip,
                                                   prior, losses, ...)
    mmalign losses                                 list the loss engine's functions
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import typer

from .demos import DEMOS, get_demo

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
sample_app = typer.Typer(no_args_is_help=True, help="Generate samples from trained checkpoints.")
app.add_typer(sample_app, name="sample")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate checkpoints (e.g. CLIP zero-shot/retrieval).")
app.add_typer(eval_app, name="eval")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: str = typer.Argument(None, help="YAML config file (configs/...)"),
    help_config: bool = typer.Option(False, "--help-config", help="print every config key and exit"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Train with CONFIG; trailing key=value pairs override it (e.g. run.max_steps=10 loss.kwargs.beta=0.05)."""
    from .config import ConfigError, describe
    from .data.rows import DataError
    from .schema import TrainConfig

    if help_config:
        typer.echo(describe(TrainConfig))
        raise typer.Exit()
    _setup_logging(verbose)
    overrides = list(ctx.args)
    if config and "=" in config and not Path(config).exists():  # only overrides, no file
        overrides, config = [config, *overrides], None
    from .api import train as api_train

    try:
        summary = api_train(config, overrides)
    except (ConfigError, DataError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(summary, indent=1, default=str))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # a launcher waits on un-destroyed groups at exit
        dist.destroy_process_group()


@sample_app.command("text")
def sample_text(
    model: str = typer.Option(..., help="checkpoint directory (e.g. outputs/run/final)"),
    reference: str = typer.Option(None, help="second checkpoint to sample side by side (e.g. the SFT model)"),
    prompt: list[str] = typer.Option(None, help="prompt (repeatable)"),
    prompts_file: str = typer.Option(None, help="text file, one prompt per line"),
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    chat: bool = typer.Option(False, help="wrap prompts in the tokenizer's chat template"),
    out: str = typer.Option(None, help="write the samples to this jsonl file"),
) -> None:
    """Generate completions with the same prompts and seed for MODEL and (optionally) REFERENCE."""
    from .models.text import load_causal_lm, load_tokenizer
    from .sample.text import generate

    prompts = list(prompt or [])
    if prompts_file:
        prompts += [line.rstrip("\n") for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        typer.echo("error: give --prompt or --prompts-file", err=True)
        raise typer.Exit(2)
    tok = load_tokenizer(model)
    columns = {"model": generate(load_causal_lm(model), tok, prompts, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed, chat=chat).completions}
    if reference:
        columns["reference"] = generate(load_causal_lm(reference), load_tokenizer(reference), prompts,
                                        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                        chat=chat).completions
    rows = [{"prompt": p, **{k: v[i] for k, v in columns.items()}} for i, p in enumerate(prompts)]
    for r in rows:
        typer.echo(f"> {r['prompt']!r}")
        for k in columns:  # repr: a newline inside a completion must not break the columns
            typer.echo(f"  [{k}] {r[k]!r}")
    if out:
        Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows))


@app.command()
def demo(
    name: str = typer.Argument("text", help=f"one of {sorted(DEMOS)}"),
    out: str = typer.Option("outputs/demo", help="output directory (a subdirectory per demo)"),
) -> None:
    """Run a demo end to end and print its report."""
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
    target = Path(out) / name
    report = run(target)
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "losses_available"}, indent=1))
    typer.echo(f"report: {target / 'report.md'}")


@app.command()
def losses() -> None:
    """List every loss in mmalign.losses.LOSSES with the first line of its docstring."""
    from .losses import LOSSES

    for name, fn in sorted(LOSSES.items()):
        first = (fn.__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:24s} {first}")


# Modality command modules register their `sample`/`eval`/`pairs` commands on the apps above.
from . import cli_clip, cli_diffusion, cli_pairs  # noqa: E402,F401


def main() -> None:
    app(prog_name="mmalign")


if __name__ == "__main__":
    sys.exit(main())
