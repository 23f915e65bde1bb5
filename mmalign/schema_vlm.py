"""The ``vlm:`` section of a run config (``modality: vlm``): vision-language LMs on images and video (Qwen2-VL,
Qwen2.5-VL, LLaVA-OneVision, LLaVA-NeXT-Video; :mod:`mmalign.adapters.vlm_family`).

Sizes of a tiny random model (``model.name_or_path: tiny``) are ``model.tiny`` keys, as for every family:
``hidden_size``, ``num_layers``, ``num_heads``, ``num_kv_heads``, ``intermediate_size``, ``vocab_size``,
``vision_hidden_size``, ``vision_layers``, ``vision_heads``, ``image_size``, ``patch_size``
(:data:`mmalign.models.vlm.TINY_DEFAULTS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

ARCH_NAMES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava_next_video")  # = mmalign.models.vlm.ARCHS


def _h(text: str, default: Any = None, factory: Any = None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class VLMConfig:
    """Vision-language LM settings: the tiny model's architecture, what trains, and how media are sampled.

    Defaults follow TEMPLE's released DPO scripts (arXiv 2503.16929; ms-swift ``--freeze_vit true``, ``FPS=1``);
    ms-swift's ``freeze_aligner`` default (true) is from memory, UNVERIFIED.
    """

    arch: Literal["qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava_next_video"] = _h(
        "architecture of the tiny model built for model.name_or_path=tiny (a checkpoint says its own, from "
        "config.json's model_type)", "qwen2_vl")
    freeze_vision_tower: bool = _h("keep the vision encoder frozen and out of LoRA (TEMPLE/ms-swift freeze_vit)", True)
    freeze_projector: bool = _h("keep the vision-to-LM projector frozen and out of LoRA (Qwen's merger, LLaVA's "
                                "multi_modal_projector and image_newline; ms-swift freeze_aligner)", True)
    fps: float | None = _h("frames sampled per second of video (TEMPLE: 1); null: max_frames frames uniformly", 1.0)
    max_frames: int = _h("the most frames per video (TEMPLE: FPS_MAX_FRAMES=600)", 16)
    min_pixels: int | None = _h("lower bound of H*W per image / frame, for reading and the Qwen processors "
                                "(TEMPLE: VIDEO_MIN_PIXELS=3136); null: the processor's own", None)
    max_pixels: int | None = _h("upper bound of H*W per image / frame (null: the processor's own); fewer pixels "
                                "= fewer visual tokens", None)
    media_root: str | None = _h("folder relative image/video paths start from (default: each data file's folder)",
                                None)
    video_backend: Literal["auto", "decord", "av"] = _h("video decoder", "auto")
    share_prompt: bool = _h("run media + prompt once per example and share its KV cache among the candidates "
                            "(false: one [prompt; completion] row per candidate, TRL's layout)", True)

    def validate(self) -> list[str]:
        errs = []
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            errs.append(f"fps={self.fps} must be a finite number > 0, or null (uniform sampling)")
        if self.max_frames < 1:
            errs.append(f"max_frames={self.max_frames} must be >= 1")
        for name in ("min_pixels", "max_pixels"):
            v = getattr(self, name)
            if v is not None and v < 1:
                errs.append(f"{name}={v} must be >= 1 or null")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            errs.append(f"min_pixels={self.min_pixels} must be <= max_pixels={self.max_pixels}")
        return errs
