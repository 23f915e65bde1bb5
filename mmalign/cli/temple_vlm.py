"""``mmalign temple-pairs-vlm``: TEMPLE (arXiv 2503.16929) pairs on pixels — a video LLM's own responses on clean
vs perturbed frame (or clip) lists (:mod:`mmalign.methods.temple_pixels`), registered from the ``vlm`` row of
:data:`mmalign.registry.MODALITIES`. The caption path of the released code is ``mmalign temple-pairs`` (text row).

    mmalign temple-pairs-vlm --model outputs/vlm/sft/final --videos videos.jsonl --out outputs/temple_pairs
    mmalign temple-pairs-vlm --model /ckpt/Qwen2.5-VL-7B-Instruct --videos videos.jsonl --out pairs/ \\
        --unit clip --clip-len 2 --fps 1 --max-frames 64 --device cuda

Writes ``responses.jsonl``, ``pairs.jsonl``, ``temple_r<m>.jsonl`` + ``temple_r<m>.json`` (ms-swift DPO rows) per
magnitude and ``stages.yaml`` (the easy → hard curriculum for ``stages:`` of ``configs/vlm/tiny_temple.yaml``).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def temple_pairs_vlm(
    model: str = typer.Option(..., help="video LLM checkpoint directory (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, "
                                        "LLaVA-NeXT-Video) that answers the instruction"),
    videos: str = typer.Option(..., help=".jsonl with {video: path, video_id?} per row (paths relative to its "
                                         "folder)"),
    out: str = typer.Option(..., help="output directory"),
    kinds: str = typer.Option("drop,shuffle,reverse", help="perturbations, comma-separated"),
    magnitudes: str = typer.Option("16,8,4,2", help="magnitudes, comma-separated; the stage order (easy -> hard)"),
    unit: str = typer.Option("frame", help="what is perturbed: frame (the sampled frame list) or clip (runs of "
                                           "--clip-len frames, as the reference's 2-keyframe clips)"),
    clip_len: int = typer.Option(2, help="frames per clip with --unit clip"),
    instruction: str = typer.Option(None, help="the prompt answered on clean and perturbed videos (default: a "
                                               "chronological-description instruction)"),
    max_new_tokens: int = 64,
    temperature: float = typer.Option(0.7, help="sampling temperature (the reference: 0.7; 0 = greedy)"),
    seed: int = 0,
    batch_size: int = 16,
    fps: float = typer.Option(None, help="frames sampled per second (default: --max-frames frames uniformly)"),
    max_frames: int = 16,
    max_pixels: int = typer.Option(None, help="upper bound of H*W per frame (fewer visual tokens)"),
    device: str = typer.Option("auto", help="auto (cuda when available) | cpu | cuda"),
) -> None:
    """TEMPLE pixel-path pairs: the model's responses on clean vs perturbed videos, filtered as the released code
    does, one file per magnitude (jsonl + ms-swift JSON)."""
    import torch

    from ..data.rows import DataError, load_rows
    from ..data.vlm_media import MediaSpec
    from ..methods.temple_pixels import DESCRIBE, generate_pixel_responses, load_pixel_videos, write_pixel_pairs
    from ..models.vlm import QWEN, load_vlm

    try:
        mags = [int(m) for m in magnitudes.split(",") if m.strip()]
        kind_list = [k.strip() for k in kinds.split(",") if k.strip()]
        if unit not in ("frame", "clip"):
            raise ValueError(f"--unit {unit!r}: choose frame or clip")
        vlm, inputs = load_vlm(model)
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        vlm.to(dev)
        ip = inputs.processor.image_processor
        qwen = inputs.arch in QWEN
        factor = int(getattr(ip, "patch_size", 14)) * int(getattr(ip, "merge_size", 2)) if qwen else 1
        spec = MediaSpec(fps=fps, max_frames=max_frames, max_pixels=max_pixels, factor=factor,
                         frame_factor=2 if qwen and max_frames >= 2 else 1)
        rows = [row for _, _, row in load_rows(videos)]
        decoded = load_pixel_videos(rows, media=spec, root=Path(videos).parent, source=videos)
        responses = generate_pixel_responses(
            vlm, inputs, decoded, kinds=kind_list, magnitudes=mags, unit=unit, clip_len=clip_len,
            instruction=instruction or DESCRIBE, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature,
            batch_size=batch_size)
        result = write_pixel_pairs(responses, out, magnitudes=mags, instruction=instruction or DESCRIBE, seed=seed,
                                   base_dir=Path(videos).parent)
    except (ValueError, DataError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result, indent=1))
