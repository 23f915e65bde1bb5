"""``mmalign sample text``: completions of trained text checkpoints side by side (a plain function;
:mod:`mmalign.cli` registers it from the ``text`` row of :data:`mmalign.registry.MODALITIES`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def sample_text(
    model: str = typer.Option(..., help="checkpoint directory (e.g. outputs/run/final)"),
    reference: str = typer.Option(None, help="second checkpoint to sample side by side (e.g. the SFT model)"),
    prompt: list[str] = typer.Option(None, help="prompt (repeatable)"),  # noqa: B008 (typer declares options so)
    prompts_file: str = typer.Option(None, help="text file, one prompt per line"),
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    chat: bool = typer.Option(False, help="wrap prompts in the tokenizer's chat template"),
    chat_template: str = typer.Option(None, help="with --chat: a Jinja chat template (text or file) replacing "
                                                 "the checkpoints' own"),
    out: str = typer.Option(None, help="write the samples to this jsonl file"),
) -> None:
    """Generate completions with the same prompts and seed for MODEL and (optionally) REFERENCE."""
    from ..errors import ConfigError
    from ..models.chat import set_chat_template
    from ..models.text import load_causal_lm, load_tokenizer
    from ..sample.text import generate

    prompts = list(prompt or [])
    if prompts_file:
        prompts += [line.rstrip("\n") for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        typer.echo("error: give --prompt or --prompts-file", err=True)
        raise typer.Exit(2)
    def side(path: str) -> list[str]:
        tok = set_chat_template(load_tokenizer(path), chat_template, where="--chat-template")
        return generate(load_causal_lm(path), tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        seed=seed, chat=chat).completions

    try:  # a bad checkpoint (ModelLoadError) or template is one error line, not a traceback
        columns = {"model": side(model), **({"reference": side(reference)} if reference else {})}
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    rows = [{"prompt": p, **{k: v[i] for k, v in columns.items()}} for i, p in enumerate(prompts)]
    for r in rows:
        typer.echo(f"> {r['prompt']!r}")
        for k in columns:  # repr: a newline inside a completion must not break the columns
            typer.echo(f"  [{k}] {r[k]!r}")
    if out:
        Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows))
