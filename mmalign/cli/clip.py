"""``mmalign eval clip``: geometry, zero-shot and retrieval metrics of CLIP checkpoints (a plain function;
:mod:`mmalign.cli` registers it from the ``clip`` row of :data:`mmalign.registry.MODALITIES`).

    mmalign eval clip --model outputs/clip_refine/final --model ViT-B-32 --pretrained openai.pt \\
        --data coco/captions_val2017.json --image-root coco/val2017 --zeroshot imagenet_val/ --out eval.json

Each ``--model`` becomes a column of the printed table; ``--out`` gets the same numbers as JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def eval_clip(
    model: Annotated[list[str], typer.Option(help="model directory, 'tiny', or an open_clip name (repeatable)")],
    data: Annotated[list[str], typer.Option(help="image–caption file/dir for geometry + retrieval (repeatable)")]
    = None,
    zeroshot: Annotated[str, typer.Option(help="zero-shot folder: one sub-folder of images per class")] = None,
    pretrained: Annotated[str, typer.Option(help="open_clip weights for a built-in model name")] = None,
    image_root: Annotated[str, typer.Option(help="resolve relative image paths against this folder")] = None,
    image_key: Annotated[str, typer.Option(help="image column name")] = None,
    caption_key: Annotated[str, typer.Option(help="caption column name")] = None,
    max_images: Annotated[int, typer.Option(help="use at most this many images of --data")] = None,
    batch_size: int = 64,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... (default: cuda when available)")] = None,
    out: Annotated[str, typer.Option(help="write the metrics as JSON here")] = None,
) -> None:
    """Evaluate one or more CLIP models on image–caption data and/or a zero-shot classification folder."""
    import torch

    from ..config import ConfigError
    from ..data.image_text import ImageTextOptions, load_image_text, load_zeroshot
    from ..data.rows import DataError
    from ..eval.clip import evaluate_clip, format_table, write_json
    from ..models.clip import load_clip

    if not data and not zeroshot:
        typer.echo("error: give --data and/or --zeroshot", err=True)
        raise typer.Exit(2)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        opts = ImageTextOptions(image_root=image_root, image_key=image_key, caption_key=caption_key, limit=max_images)
        pairs, tables = (load_image_text(data, opts)[:2] if data else (None, None))
        zs = load_zeroshot(zeroshot) if zeroshot else None
        results = {}
        for name in model:
            bundle = load_clip(name, pretrained=pretrained)
            results[name] = evaluate_clip(bundle.model, bundle.tokenizer, bundle.transform, pairs=pairs, zeroshot=zs,
                                          batch_size=batch_size, device=dev, tables=tables)
    except (ConfigError, DataError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_table(results))
    if out:
        typer.echo(f"wrote {write_json(results, Path(out))}")
