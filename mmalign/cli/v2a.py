"""``mmalign sample v2a``: audio for videos from a trained video-to-audio generator.

    mmalign sample v2a --model outputs/v2a/tiny_flow/final --video clip.mp4 --seeds 0 1 --guidance-scale 4.5 \
        --out samples/

For each video and seed: ``<video stem>_seed<s>.wav``, a spectrogram ``.png`` and an ``.mp4`` with the generated
audio muxed into the video; ``samples.json`` lists them with the settings. ``--model`` is a v2a model directory (a
v2a run's ``final/``). A plain function; :mod:`mmalign.cli` registers it from the ``v2a`` row of
:data:`mmalign.registry.MODALITIES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer import Option


def sample_v2a(
    model: Annotated[str, Option(help="v2a model directory (<output_dir>/final of a v2a run)")],
    video: Annotated[list[str] | None, Option(help="video file (repeatable)")] = None,
    videos_file: Annotated[str | None, Option(help="text file, one video path per line")] = None,
    seeds: Annotated[list[int] | None, Option(help="one sample per seed and video (repeatable; default 0)")] = None,
    guidance_scale: Annotated[float | None, Option(help="CFG scale with the learned null condition "
                                                        "(default 4.5, MMAudio's)")] = None,
    steps: Annotated[int, Option(help="Euler flow steps")] = 25,
    device: Annotated[str | None, Option(help="cpu / cuda (default: cuda when available)")] = None,
    out: Annotated[str, Option(help="output directory")] = "v2a_samples",
) -> None:
    """Generate audio for each VIDEO with MODEL: wav, spectrogram PNG and mp4 per video and seed."""
    import torch

    from ..data.rows import DataError
    from ..data.v2a import MediaOptions, load_clip_frames
    from ..models.v2a import load_v2a
    from ..sample.v2a import generate, write_outputs

    videos = list(video or [])
    if videos_file:
        videos += [line.strip() for line in Path(videos_file).read_text().splitlines() if line.strip()]
    if not videos:
        typer.echo("error: give --video or --videos-file", err=True)
        raise typer.Exit(2)
    seeds = list(seeds or [0])
    w = 4.5 if guidance_scale is None else guidance_scale
    try:
        comps = load_v2a(model)
        s = comps.spec
        size = comps.frame_encoder.config.image_size if comps.frame_encoder is not None else s.frame_size
        opts = MediaOptions(sample_rate=s.sample_rate, num_samples=s.num_samples, fps=s.fps, num_frames=s.num_frames,
                            frame_size=size)
        frames = torch.stack([load_clip_frames(Path(v), opts) for v in videos])
    except (FileNotFoundError, ValueError, DataError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    comps.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    waves = generate(comps, None, frames, seeds, steps=steps, guidance_scale=w)
    settings = {"model": model, "seeds": seeds, "guidance_scale": w, "steps": steps, "sample_rate": s.sample_rate,
                "duration": s.duration}
    written = write_outputs(comps, videos, waves, seeds, out, settings=settings)
    typer.echo(f"wrote {len(written)} samples (wav, png, mp4) to {out}")
