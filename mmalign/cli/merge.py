"""``mmalign merge``: a LoRA run's adapter merged into its base, written as full weights that load without peft
(a plain function; :mod:`mmalign.cli` registers it from :data:`mmalign.registry.COMMANDS`).

    mmalign merge outputs/dpo_lora/final --out outputs/dpo_lora/merged

Text and LVLM adapters name their base in ``adapter_config.json`` (a tiny run's base is saved beside it);
diffusion runs record theirs in ``mmalign_diffusion.json`` (``--base`` for a diffusers LoRA without it). The
output is written to ``<out>.tmp``, verified, and renamed — the same atomic export as ``final/``; training with
``run.merge_lora_at_end=true`` does this at the end of the run (``<output_dir>/final_merged``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer import Argument, Option


def merge(
    adapter_dir: Annotated[str, Argument(help="a LoRA run's final/ directory (or a PEFT / diffusers LoRA dir)")],
    out: Annotated[str, Option(help="directory for the merged full weights")],
    base: Annotated[str | None, Option(help="diffusion only: the base pipeline directory, when the adapter "
                                            "records none")] = None,
    dtype: Annotated[str, Option(help="float32 | bfloat16 | float16: load, merge and save in this dtype")]
    = "float32",
    overwrite: Annotated[bool, Option(help="replace an existing --out directory")] = False,
) -> None:
    """Merge the LoRA adapter in ADAPTER_DIR into its base model and write full weights to --out."""
    from ..config import ConfigError
    from ..train.checkpoint import describe_os_error
    from ..train.final_save import export_merged

    dest = Path(out).expanduser()
    if dtype not in ("float32", "bfloat16", "float16"):
        typer.echo(f"error: --dtype {dtype!r} is not one of float32, bfloat16, float16", err=True)
        raise typer.Exit(2)
    if dest.exists() and not overwrite:
        typer.echo(f"error: {dest} exists; pass --overwrite to replace it, or choose another --out", err=True)
        raise typer.Exit(2)
    if dest.resolve() == Path(adapter_dir).expanduser().resolve():
        typer.echo("error: --out must differ from ADAPTER_DIR (the adapter is read while the merge is written)",
                   err=True)
        raise typer.Exit(2)
    try:
        path, info = export_merged(Path(adapter_dir), dest, dtype=dtype, base=base)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    except OSError as err:
        typer.echo(f"error: writing {dest} failed: {describe_os_error(err)}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"merged the {info['kind']} LoRA adapter of {adapter_dir} into {info['class']} full weights: {path}")
