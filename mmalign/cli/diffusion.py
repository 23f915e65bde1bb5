"""``mmalign sample diffusion``: image grids from trained diffusion models, with optional NPO-guided CFG.

    mmalign sample diffusion --model outputs/dpo/final --prompt "a red circle on a black background" \
        --seeds 0 1 2 3 --guidance-scale 5 --npo outputs/self_npo/final --alpha 1 --beta 1 --out grid.png

Rows are prompts × settings (plain CFG, and NPO-CFG when ``--npo`` is given), columns are seeds; every setting
uses the same seeds, so the columns are paired. ``--model`` is a run's ``final/`` directory (full weights or
LoRA) or a diffusers pipeline directory; the base model is the one the run recorded (``--base`` overrides).
A plain function; :mod:`mmalign.cli` registers it from the ``diffusion`` row of :data:`mmalign.registry.MODALITIES`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from typer import Option


def sample_diffusion(
    model: Annotated[str, Option(help="trained run directory (<output_dir>/final) or diffusers pipeline directory")],
    base: Annotated[str | None, Option(help="base pipeline directory (default: the one the run recorded)")] = None,
    npo: Annotated[str | None, Option(help="NPO model directory (Diffusion-NPO / Self-NPO run) or offset "
                                           "directory")] = None,
    alpha: Annotated[float, Option(help="θ_neg = θ_base + α·(θ_pos − θ_base) + β·δ_npo: weight of the positive "
                                        "offset")] = 1.0,
    beta: Annotated[float, Option(help="weight of the NPO offset δ_npo")] = 1.0,
    prompt: Annotated[list[str] | None, Option(help="prompt (repeatable)")] = None,
    prompts_file: Annotated[str | None, Option(help="text file, one prompt per line")] = None,
    seeds: Annotated[list[int] | None, Option(help="one column per seed (repeatable; default 0 1 2 3)")] = None,
    guidance_scale: Annotated[list[float] | None, Option(help="CFG scale w (repeatable: one setting per value; "
                                                             "default 5)")] = None,
    negative_prompt: Annotated[str | None, Option(help="negative prompt of the unconditional branch")] = None,
    steps: Annotated[int, Option(help="sampling steps")] = 25,
    sampler: Annotated[str, Option(help="ddim | euler | dpm | ddpm (flow-matching models keep theirs)")] = "ddim",
    dtype: Annotated[str, Option(help="weights dtype")] = "float32",
    device: Annotated[str | None, Option(help="cpu / cuda (default: cuda when available)")] = None,
    save_offset: Annotated[str | None, Option(help="also write δ_npo to this directory "
                                                   "(npo_offset.safetensors)")] = None,
    out: Annotated[str, Option(help="output PNG (a .json with the settings is written beside it)")] = "samples.png",
) -> None:
    """Sample a labelled grid (prompts × settings rows, seeds columns) from MODEL, optionally with NPO-CFG."""
    import torch

    from ..models import npo_weights as npo_ops
    from ..sample import diffusion as SD

    seeds = list(seeds or [0, 1, 2, 3])
    guidance_scale = list(guidance_scale or [5.0])
    prompts = list(prompt or [])
    if prompts_file:
        prompts += [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        typer.echo("error: give --prompt or --prompts-file", err=True)
        raise typer.Exit(2)
    try:
        comps = SD.load_components(base or model, dtype=dtype)
        positive = SD.load_denoiser(model, comps) if Path(model).resolve() != SD.base_pipeline_dir(
            base or model).resolve() else comps.denoiser
        negative = offset = None
        if npo:
            offset = SD.npo_offset_from(npo, comps)
            negative = npo_ops.negative_model(comps.denoiser, positive=positive, alpha=alpha, npo_offset=offset,
                                              beta=beta)
            if save_offset:
                npo_ops.save_offset(offset, save_offset, metadata={"npo_model": npo, "base": str(
                    SD.base_pipeline_dir(base or model))})
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    comps.to(dev)
    positive.to(dev)
    pipe = SD.build_pipeline(comps, positive, sampler=sampler)
    settings = []
    extra = {"negative_prompt": negative_prompt} if negative_prompt else {}
    for w in guidance_scale:
        settings.append(SD.Setting(f"cfg w={w:g}", w, kwargs=extra))
        if negative is not None:
            settings.append(SD.Setting(f"npo w={w:g} a={alpha:g} b={beta:g}", w, negative=negative, kwargs=extra))
    images = SD.sample_settings(pipe, settings, prompts, list(seeds), num_inference_steps=steps)
    rows, labels = SD.grid_rows(images, prompts)
    path = SD.save_grid(rows, out, row_labels=labels, col_labels=[f"seed {s}" for s in seeds],
                        title=f"{model} ({sampler}, {steps} steps)")
    meta = {"model": model, "base": str(SD.base_pipeline_dir(base or model)), "npo": npo, "alpha": alpha,
            "beta": beta, "prompts": prompts, "seeds": list(seeds), "settings": [s.name for s in settings],
            "guidance_scale": list(guidance_scale), "steps": steps, "sampler": sampler}
    if offset is not None:
        meta["npo_offset"] = npo_ops.offset_norms(offset)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    typer.echo(f"wrote {path} ({len(labels)} rows × {len(seeds)} seeds)")
