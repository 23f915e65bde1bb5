"""``mmalign sample vlm``: answers of a trained vision-language model for images and videos, beside a reference's.

    mmalign sample vlm --model outputs/vlm/tiny_qwen2vl_dpo/final --reference outputs/vlm/base \\
        --data assets/vlm/prefs.jsonl --limit 8 --out vlm_samples/
    mmalign sample vlm --model DIR --video clip.mp4 --prompt "Describe the video in detail."

Writes ``samples.md`` (a table: frame strip, question, one column per model), ``samples.json`` and
``frames/NNN.png`` (the frames each answer saw) under ``--out``. Prompts and media come from VLM rows (``--data``:
TRL / ms-swift / TEMPLE rows, :mod:`mmalign.data.vlm_rows`; candidates unused) or from ``--image`` / ``--video``
with ``--prompt`` (one example per medium). A plain function; :mod:`mmalign.cli` registers it from the ``vlm`` row
of :data:`mmalign.registry.MODALITIES`.
"""

from __future__ import annotations

from typing import Annotated

import typer
from typer import Option


def sample_vlm(
    model: Annotated[str, Option(help="VLM checkpoint directory (e.g. <output_dir>/final of a vlm run)")],
    reference: Annotated[str | None, Option(help="second checkpoint answered side by side (e.g. the base)")] = None,
    data: Annotated[list[str] | None, Option(help="VLM rows file (repeatable): prompts and media")] = None,
    image: Annotated[list[str] | None, Option(help="image file (repeatable), asked --prompt")] = None,
    video: Annotated[list[str] | None, Option(help="video file (repeatable), asked --prompt")] = None,
    prompt: Annotated[str, Option(help="question for --image / --video")] = "Describe this in detail.",
    limit: Annotated[int | None, Option(help="at most this many rows of --data")] = None,
    max_new_tokens: Annotated[int, Option(help="tokens per answer")] = 64,
    temperature: Annotated[float, Option(help="0: greedy; > 0: sampling with a seed per example")] = 0.0,
    seed: Annotated[int, Option(help="seed of the first example (example i uses seed + i)")] = 0,
    fps: Annotated[float | None, Option(help="video frames sampled per second (default: max-frames uniformly)")] = 1.0,
    max_frames: Annotated[int, Option(help="the most frames per video")] = 16,
    max_pixels: Annotated[int | None, Option(help="upper bound of H*W per image / frame")] = None,
    media_root: Annotated[str | None, Option(help="folder relative media paths in --data start from")] = None,
    device: Annotated[str | None, Option(help="cpu / cuda (default: cuda when available)")] = None,
    out: Annotated[str, Option(help="output directory")] = "vlm_samples",
) -> None:
    """Answer each row / medium with MODEL (and REFERENCE): markdown + JSON + PNG frame strips."""
    import torch

    from ..data.rows import DataError
    from ..data.vlm_media import BadRow, MediaLoader, MediaSpec
    from ..data.vlm_rows import VLMExample, read_vlm_rows
    from ..models.vlm import load_vlm
    from ..sample.vlm import generate_answers, write_report

    if not (data or image or video):
        typer.echo("error: give --data, --image or --video", err=True)
        raise typer.Exit(2)
    try:
        spec = MediaSpec(fps=fps, max_frames=max_frames, max_pixels=max_pixels, factor=1)
        examples = read_vlm_rows(list(data), media=spec, root=media_root, limit=limit)[0] if data else []
        loader = None
        for kind, paths in (("image", image or []), ("video", video or [])):
            if paths:
                loader = loader or MediaLoader(spec, None)
            for i, p in enumerate(paths):
                content = [{"type": kind}, {"type": "text", "text": prompt}]
                ex = VLMExample([{"role": "user", "content": content}], [""], source=p, row=i)
                if kind == "image":
                    im, _ = loader.load_image(p, "<command line>", f"--image[{i}]")
                    ex.images.append(im)
                    ex.image_paths.append(p)
                else:
                    frames, vid_fps, _ = loader.load_video(p, "<command line>", f"--video[{i}]")
                    ex.videos.append(frames)
                    ex.video_fps.append(vid_fps)
                    ex.video_paths.append(p)
                examples.append(ex)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        columns = {}
        for name, path in (("model", model), ("reference", reference)):
            if path is None:
                continue
            net, inputs = load_vlm(path)
            columns[name] = generate_answers(net.to(device), inputs, examples, max_new_tokens=max_new_tokens,
                                             temperature=temperature, seed=seed)
            del net
    except BadRow as bad:
        typer.echo(f"error: {bad.details[1]} {bad.details[3]}; fix: {bad.details[4]}", err=True)
        raise typer.Exit(2) from None
    except (FileNotFoundError, OSError, ValueError, DataError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    paths = write_report(out, examples, columns)
    for i, ex in enumerate(examples):
        typer.echo(f"> [{i}] {ex.source}:{ex.row}")
        for name, answers in columns.items():
            typer.echo(f"  [{name}] {answers[i]!r}")
    typer.echo(f"wrote {paths['markdown']}, {paths['json']} and {paths['frames']}/")
