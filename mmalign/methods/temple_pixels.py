"""TEMPLE's self-generated pairs on pixels: the video LLM's own responses on clean vs perturbed frame (or clip) lists.

Li et al., arXiv 2503.16929 (TEMPLE), §3: "comparing the model's responses on clean and perturbed video inputs".
Research note ``video_audio_clip_prior.md`` §1.2 and §1.5 item 1: the released code (``lscpku/TEMPLE``
``inference/generator_base.py``) has ``video_input_type`` ``clip`` / ``video`` paths that feed frames to the VLM,
but its released configuration (``get_vidpo_configs``) enables only ``caption``, the text-only path of
:mod:`mmalign.methods.temple_gen`. This module is the pixel path the paper's abstract describes:

1. each video is decoded and sampled once (:class:`~mmalign.data.vlm_media.MediaSpec`, the model's ``vlm.fps``);
2. its frame list (``unit="frame"``) or its list of clips of ``clip_len`` consecutive frames (``unit="clip"``; the
   reference's clips are 2 keyframes per shot run) is perturbed at every (kind, magnitude) with
   :func:`mmalign.data.perturb.apply_perturbation` (drop / shuffle / reverse, chunk semantics of the reference);
3. the VLM answers one instruction on the clean video (the chosen response) and on every perturbed one (the
   rejected ones) — batched, left-padded, through the model's own ``generate`` (KV cache on); a perturbation that
   leaves the list unchanged (a shuffle that drew the identity) gives no rejected response;
4. :func:`mmalign.data.temple.build_temple_pairs` applies the released code's filters (drop-not-shorter, substring,
   length ratio 1.5, identical/empty), and :func:`write_pixel_pairs` writes the pairs, one file per magnitude in
   the curriculum order (``temple_r<m>.jsonl`` + ``stages.yaml``) and the same as ms-swift DPO JSON
   (``temple_r<m>.json``, ``convert_to_swift.py``'s layout). Both responses train on the clean video (§1.5 item 4).

Deviations from the reference: sampling settings are arguments (the reference: temperature 0.7, repetition
penalty 1.05, max_new_tokens 8192); perturbed frame lists are padded with their last frame up to the processor's
temporal patch (Qwen: 2), since a drop at magnitude 16 can keep a single frame; the frame rate passed to the
processor is the clean video's (a dropped video is shorter, not slower). The reference's drop_by_similarity /
drop_by_group are off in its configs and not used here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..data.perturb import PERTURBATIONS, apply_perturbation
from ..data.rows import DataError
from ..data.temple import TEMPLE_MAGNITUDES, VideoResponses
from ..models.vlm import QWEN, VLMInputs

__all__ = ["DESCRIBE", "PixelVideo", "batched_generate", "generate_pixel_responses", "load_pixel_videos",
           "perturb_frames", "write_pixel_pairs"]

DESCRIBE = "Describe what happens in the video, in the order it happens."
UNITS = ("frame", "clip")


@dataclass
class PixelVideo:
    """One decoded video: ``frames`` uint8 ``[T, H, W, 3]`` at ``fps``; ``video`` the path written into rows."""

    video: str
    frames: np.ndarray
    fps: float
    video_id: str


def _seed(seed: int, video_id: str, kind: str, magnitude: int) -> int:
    # Stable across processes (hash() is salted) and independent of the video's position in the list.
    digest = hashlib.sha256(f"{seed}|{video_id}|{kind}|{magnitude}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def perturb_frames(frames: np.ndarray, kind: str, magnitude: int, *, seed: int, unit: str = "frame",
                   clip_len: int = 2, frame_factor: int = 1) -> tuple[np.ndarray, list[int]]:
    """``(perturbed frames, indices)``: the frame list, or the list of clips of ``clip_len`` consecutive frames
    (the last clip may be shorter), perturbed as :func:`~mmalign.data.perturb.apply_perturbation` does; the
    indices are those of the perturbed units (frames or clips). The result is padded by repeating its last frame
    to a multiple of ``frame_factor``.

    Raises:
        ConfigError: unknown ``unit``, ``clip_len`` < 1, or a bad kind / magnitude.
    """
    if unit not in UNITS or clip_len < 1 or frame_factor < 1:
        raise ConfigError(f"unit={unit!r} must be one of {list(UNITS)}, clip_len={clip_len} and "
                          f"frame_factor={frame_factor} must be >= 1")
    n = len(frames)
    units = [[i] for i in range(n)] if unit == "frame" else \
        [list(range(s, min(s + clip_len, n))) for s in range(0, n, clip_len)]
    perturbed, idx = apply_perturbation(units, kind, int(magnitude), seed=seed)
    order = [i for u in perturbed for i in u]
    out = frames[order]
    pad = (-len(out)) % frame_factor
    if pad:
        out = np.concatenate([out, np.repeat(out[-1:], pad, axis=0)])
    return out, idx


def load_pixel_videos(rows: Sequence[Mapping], *, media, root: str | Path | None = None,
                      source: str = "<videos>") -> list[PixelVideo]:
    """Decode the ``video`` of each row ``{video: path, video_id?}`` with ``media``
    (:class:`~mmalign.data.vlm_media.MediaSpec`); relative paths start from ``root``.

    Raises:
        DataError: naming the row, the path and the fix (a missing or unreadable video).
    """
    from ..data.vlm_media import BadRow, MediaLoader

    loader = MediaLoader(media, root)
    out = []
    for n, row in enumerate(rows, start=1):
        value = row.get("video") if isinstance(row, Mapping) else None
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{source} row {n}: field 'video' is {value!r}; give the video file path "
                            "({\"video\": \"clips/a.mp4\"} per row)")
        try:
            frames, fps, _ = loader.load_video(value, source, "video")
        except BadRow as bad:
            raise DataError(f"{source} row {n}: {bad}") from None
        out.append(PixelVideo(value, frames, float(fps), str(row.get("video_id") or Path(value).stem)))
    return out


def _prompt(instruction: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": instruction}]}]


@torch.no_grad()
def batched_generate(model: nn.Module, inputs: VLMInputs, videos: Sequence[np.ndarray], fps: Sequence[float],
                     instructions: Sequence[str], *, max_new_tokens: int = 32, temperature: float = 0.0,
                     seed: int = 0, batch_size: int = 16, repetition_penalty: float = 1.0) -> list[str]:
    """One answer per (video, instruction), ``batch_size`` at a time: the processor pads the prompts on the left
    and the model's ``generate`` decodes with its KV cache; greedy at ``temperature`` 0, else sampling seeded per
    batch (``seed + batch index``)."""
    if not (len(videos) == len(fps) == len(instructions)):
        raise ValueError(f"{len(videos)} videos, {len(fps)} frame rates and {len(instructions)} instructions")
    model.eval()
    device = next(model.parameters()).device
    tok, proc = inputs.tokenizer, inputs.processor
    side = tok.padding_side
    tok.padding_side = "left"  # generation continues each row at its end, so padding goes first
    answers: list[str] = []
    try:
        for b, start in enumerate(range(0, len(videos), batch_size)):
            sl = slice(start, start + batch_size)
            texts = [proc.apply_chat_template(_prompt(q), add_generation_prompt=True, tokenize=False)
                     for q in instructions[sl]]
            vids = [np.ascontiguousarray(v) for v in videos[sl]]
            kwargs: dict[str, Any] = {}
            if inputs.arch in QWEN:
                kwargs["video_metadata"] = [{"total_num_frames": len(v), "fps": float(f)}
                                            for v, f in zip(vids, fps[sl], strict=True)]
            bos = getattr(tok, "bos_token", None)
            batch = dict(proc(text=texts, videos=vids, padding=True, return_tensors="pt",
                              add_special_tokens=not (bos and texts[0].startswith(bos)), **kwargs))
            if inputs.arch not in QWEN:
                batch.pop("mm_token_type_ids", None)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            torch.manual_seed(seed + b)
            sample = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            out = model.generate(**batch, max_new_tokens=max_new_tokens, use_cache=True,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                                 repetition_penalty=repetition_penalty, **sample)
            new = out[:, batch["input_ids"].shape[1]:]
            answers += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = side
    return answers


def generate_pixel_responses(model: nn.Module, inputs: VLMInputs, videos: Sequence[PixelVideo], *,
                             kinds: Sequence[str] = ("drop", "shuffle", "reverse"),
                             magnitudes: Sequence[int] = TEMPLE_MAGNITUDES, unit: str = "frame", clip_len: int = 2,
                             instruction: str = DESCRIBE, seed: int = 0, max_new_tokens: int = 64,
                             temperature: float = 0.7, batch_size: int = 16, repetition_penalty: float = 1.05,
                             keep_frames: bool = False) -> list[VideoResponses]:
    """One clean and up to ``len(kinds) × len(magnitudes)`` perturbed responses per video (module docstring).

    Returns :class:`~mmalign.data.temple.VideoResponses` for :func:`~mmalign.data.temple.build_temple_pairs`;
    with ``keep_frames`` each also carries ``perturbed[(kind, m)] = (frames, indices)`` (for figures).
    """
    bad = [k for k in kinds if k not in PERTURBATIONS or k == "none"]
    if bad or not kinds or any(isinstance(m, bool) or int(m) < 1 for m in magnitudes):
        raise ConfigError(f"kinds must be among {[k for k in PERTURBATIONS if k != 'none']} and magnitudes ints "
                          f">= 1; got kinds={list(kinds)}, magnitudes={list(magnitudes)}")
    ff = 2 if inputs.arch in QWEN else 1  # Qwen's temporal patch: the processor needs an even frame count
    clips, fps, slots = [], [], []  # slots[i] = (video index, (kind, magnitude) | None for the clean input)
    kept: list[dict] = [{} for _ in videos]
    for v, pv in enumerate(videos):
        clean, _ = perturb_frames(pv.frames, "none", 1, seed=0, unit=unit, clip_len=clip_len, frame_factor=ff)
        clips.append(clean)
        fps.append(pv.fps)
        slots.append((v, None))
        n_units = len(pv.frames) if unit == "frame" else -(-len(pv.frames) // clip_len)
        for kind in kinds:
            for m in magnitudes:
                frames, idx = perturb_frames(pv.frames, kind, int(m), seed=_seed(seed, pv.video_id, kind, int(m)),
                                             unit=unit, clip_len=clip_len, frame_factor=ff)
                if list(idx) == list(range(n_units)):
                    continue  # nothing changed: the pair would differ by sampling noise only
                clips.append(frames)
                fps.append(pv.fps)
                slots.append((v, (kind, int(m))))
                if keep_frames:
                    kept[v][(kind, int(m))] = (frames, idx)
    texts = batched_generate(model, inputs, clips, fps, [instruction] * len(clips), max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed, batch_size=batch_size,
                             repetition_penalty=repetition_penalty)
    out = [VideoResponses(video=pv.video, chosen="", video_id=pv.video_id) for pv in videos]
    for (v, key), text in zip(slots, texts, strict=True):
        if key is None:
            out[v].chosen = text
        else:
            out[v].rejected[key] = text
    if keep_frames:
        for r, k in zip(out, kept, strict=True):
            r.perturbed = k  # type: ignore[attr-defined]  # figures only; not part of the pair rows
    return out


def write_pixel_pairs(responses: Sequence[VideoResponses], out_dir: str | Path, *,
                      magnitudes: Sequence[int] = TEMPLE_MAGNITUDES, instruction: str = DESCRIBE, seed: int = 0,
                      base_dir: str | Path | None = None, swift: bool = True) -> dict:
    """Filter and write the pairs (module docstring, step 4) under ``out_dir``: ``responses.jsonl``,
    ``pairs.jsonl``, ``temple_r<m>.jsonl`` per magnitude (+ ``temple_r<m>.json`` in ms-swift's DPO layout with
    ``swift``) and ``stages.yaml``. Rows carry the generation ``instruction`` as their prompt (the pair is what the
    model said to it). Returns the stats of :func:`~mmalign.data.temple.build_temple_pairs` with the paths.

    Magnitudes left with no pairs are dropped from the stages and listed under ``empty_magnitudes``.

    Raises:
        DataError: no pair survives the filters at all (the message lists the counts).
    """
    import yaml

    from ..data.pairs import write_jsonl
    from ..data.temple import build_temple_pairs, magnitude_stages
    from ..data.vlm_rows import write_swift_video_dpo

    out = Path(out_dir)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    # absolute video paths: the per-magnitude files live in out_dir, so paths relative to base_dir would break
    responses = [VideoResponses(str((base / r.video).resolve()), r.chosen, dict(r.rejected), r.video_id)
                 for r in responses]
    write_jsonl([{"video": r.video, "video_id": r.video_id, "chosen": r.chosen,
                  "rejected": {f"{k}_{m}": t for (k, m), t in sorted(r.rejected.items())}} for r in responses],
                out / "responses.jsonl")
    rows, stats = build_temple_pairs(responses, seed=seed, instructions=(instruction,))
    pairs_file = write_jsonl(rows, out / "pairs.jsonl")
    by_mag = {m: [r for r in rows if r["magnitude"] == m] for m in magnitudes}
    kept = [m for m in magnitudes if by_mag[m]]
    if not kept:
        raise DataError(f"no TEMPLE pair survived the filters ({stats}); fix: sample the responses with a higher "
                        "temperature, more max_new_tokens, or a model that describes the videos")
    # a magnitude with no pairs is left out of the curriculum (and reported), not fatal: the others still train
    stages = magnitude_stages(by_mag, out, kept)
    (out / "stages.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    result = {"out": str(out), "pairs_file": str(pairs_file), "stages_file": str(out / "stages.yaml"),
              "magnitudes": kept, "empty_magnitudes": [m for m in magnitudes if not by_mag[m]], **stats}
    if swift:
        result["swift_files"] = [str(write_swift_video_dpo(by_mag[m], out / f"temple_r{m}.json")) for m in kept]
    return result
