"""``mmalign eval av``: retrieval and audio-offset metrics of SF-CAVP-style models (a plain function;
:mod:`mmalign.cli` registers it from the ``av`` row of :data:`mmalign.registry.MODALITIES`).

    mmalign eval av --model outputs/cavp/final --model tiny --data eval_rows.jsonl --offset 1 --offset 4 --out av.json

Each ``--model`` (a saved SF-CAVP directory, or ``tiny`` for an untrained baseline) becomes a column of the printed
table (:mod:`mmalign.eval.av`: v2a/a2v recall@1/5/10, offset_acc@k); ``--out`` gets the same numbers as JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def eval_av(
    model: Annotated[list[str], typer.Option(help="SF-CAVP model directory, or 'tiny' (repeatable)")],
    data: Annotated[list[str], typer.Option(help="audio-visual rows file/dir: {video, audio?} (repeatable)")],
    offset: Annotated[list[int], typer.Option(help="audio shift in fast frames to detect (repeatable)")] = None,
    slow_weight: Annotated[float, typer.Option(help="weight of the slow (semantic) cosine")] = 1.0,
    fast_weight: Annotated[float, typer.Option(help="weight of the fast (per-time-step) cosine")] = 1.0,
    media_root: Annotated[str, typer.Option(help="resolve relative media paths against this folder")] = None,
    max_videos: Annotated[int, typer.Option(help="use at most this many rows of --data")] = None,
    batch_size: int = 16,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... (default: cuda when available)")] = None,
    out: Annotated[str, typer.Option(help="write the metrics as JSON here")] = None,
) -> None:
    """Evaluate one or more SF-CAVP models: audio↔video recall@k and offset-detection accuracy."""
    import torch

    from ..config import ConfigError
    from ..data.av_clips import AVOptions
    from ..data.rows import DataError
    from ..eval.av import evaluate_av, format_table, write_json
    from ..models.cavp import build_sf_cavp, load_sf_cavp

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    offsets = tuple(offset or (1, 2, 4))
    if any(k < 1 for k in offsets):
        typer.echo(f"error: --offset values must be >= 1 fast frames, got {list(offsets)}", err=True)
        raise typer.Exit(2)
    try:
        results = {}
        for name in model:
            m = build_sf_cavp() if name == "tiny" else load_sf_cavp(name)
            results[name] = evaluate_av(m, data, offsets=offsets, weights=(slow_weight, fast_weight),
                                        options=AVOptions(media_root=media_root), max_videos=max_videos,
                                        batch_size=batch_size, device=dev)
    except (ConfigError, DataError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_table(results))
    if out:
        typer.echo(f"wrote {write_json(results, Path(out))}")
