"""The batch classes (one per kind of media), built by the data code's collate functions, read by the adapters.

All extend :class:`mmalign.types.CandidateBatch` (B examples × K candidates, ``.to(device)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..types import CandidateBatch


@dataclass
class TextBatch(CandidateBatch):
    """A tokenised batch of B examples with K completions each.

    Prompts are left-padded (so every prompt ends at the same position and its KV cache can be shared by all
    K completions); completions are right-padded.

    Attributes:
        prompt_ids: ``[B, P]`` left-padded prompt token ids.
        prompt_mask: ``[B, P]`` 1 on real prompt tokens.
        completion_ids: ``[B, K, C]`` right-padded completion token ids (EOS included where the row had one).
        completion_mask: ``[B, K, C]`` 1 on completion tokens that are scored.
        candidate_mask: ``[B, K]`` bool, False for padding candidates of ragged lists.
        labels: ``[B, K]`` float: unpaired desirability (1/0), or ranking position (0 = best), or NaN.
        meta: per-example python values (row index, source file, difficulty, ...), not moved to device.
        extras: other ``[B, ...]`` tensors (precomputed reference scores ``ref_logps`` [B, K], margins,
            sample weights), moved to device with the batch.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    candidate_mask: Tensor | None = None
    labels: Tensor | None = None
    meta: list[dict] = field(default_factory=list)
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def num_candidates(self) -> int:
        return self.completion_ids.shape[1]


@dataclass
class ImageBatch(CandidateBatch):
    """A batch of B examples (one caption each) with K candidate images.

    Attributes:
        captions: B captions (after prompt dropout, if any).
        pixel_values: ``[B, K, 3, H, W]`` in [-1, 1], or None when ``latent_params`` are cached.
        latent_params: ``[B, K, 2C, h, w]`` VAE posterior parameters (mean ‖ logvar), or ``[B, K, 3, H, W]``
            pixels for pixel-space models; filled by the adapter on first use, so the reference pass reuses
            the policy pass's encoding.
        prompt_embeds: ``[B, L, D]`` text conditioning (cached, or filled on first use).
        pooled_prompt_embeds: ``[B, P]`` pooled text embedding (SDXL, SD3), else None.
        candidate_mask: ``[B, K]`` bool, False for padding candidates of ragged ranked lists.
        labels: ``[B, K]``: unpaired desirability (1/0), ranking position (0 = best), 0.5 for kept ties, or NaN.
        meta: per-example python values (source file, row, caption), not moved to device.
        extras: ``noise [B, C, h, w]``, ``timesteps [B]``, ``sigmas [B]`` (flow), ``vae_noise [B, C, h, w]``
            (posterior sample, shared by the candidates), ``time_ids [B, K, 6]`` (SDXL), ``index [B]`` (added by
            the loop).
    """

    captions: list[str]
    pixel_values: Tensor | None = None
    latent_params: Tensor | None = None
    prompt_embeds: Tensor | None = None
    pooled_prompt_embeds: Tensor | None = None
    candidate_mask: Tensor | None = None
    labels: Tensor | None = None
    meta: list[dict] = field(default_factory=list)
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.captions)

    @property
    def num_candidates(self) -> int:
        src = self.latent_params if self.latent_params is not None else self.pixel_values
        return int(src.shape[1])

    @property
    def device(self) -> torch.device:
        return self.extras["noise"].device


@dataclass
class ImageTextBatch(CandidateBatch):
    """B image–caption pairs (or B images, or B captions).

    Attributes:
        pixel_values: ``[B, 3, H, W]`` transformed images, or None for a text-only batch.
        input_ids: ``[B, L]`` caption token ids, or None for an image-only batch.
        attention_mask: ``[B, L]`` 1 on real tokens (transformers models use it; open_clip pools at EOT).
        meta: per-example python values (source file, row, image path), not moved to device.
        extras: ``[B]`` tensors: ``index`` (dataset index, added by the loop), ``image_index`` (the record
            actually used, which differs from ``index`` when a bad image was replaced), ``caption_index``.
    """

    pixel_values: Tensor | None
    input_ids: Tensor | None
    attention_mask: Tensor | None = None
    meta: list[dict] = field(default_factory=list)
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        x = self.pixel_values if self.pixel_values is not None else self.input_ids
        return 0 if x is None else x.shape[0]


class EncoderCache:
    """Outputs of a frozen media encoder for one batch, keyed by a fingerprint of the encoder's weights; filled
    and read by the adapter, so that the reference pass reuses the policy pass's encoding. Not a dict, so batch
    hashing ignores it; ``.to()`` hands the same object to the moved batch."""

    def __init__(self):
        self.entries: dict[str, Tensor] = {}
        self.encoder_calls = 0  # how many times an encoder actually ran on this batch


@dataclass
class VisionTextBatch(CandidateBatch):
    """B examples, each one image + one prompt, with K text completions (vision-language preference rows).

    Attributes:
        prompt_ids: ``[B, P]`` left-padded prompt ids, holding the ``<image>`` placeholders (one per image
            feature) where the image goes.
        prompt_mask: ``[B, P]`` 1 on real prompt tokens.
        completion_ids: ``[B, K, C]`` right-padded completion ids (pairs: 0 = chosen, 1 = rejected).
        completion_mask: ``[B, K, C]`` 1 on scored completion tokens.
        pixel_values: ``[B, C, H, W]`` preprocessed pixels, one image per example (shared by its K candidates).
        candidate_mask: ``[B, K]`` bool, False for padding candidates, or None.
        labels: ``[B, K]`` float: unpaired desirability (1/0), ranking position (0 = best), or NaN.
        meta: per-example python values (data file, row, image path), not moved to device.
        extras: other ``[B, ...]`` tensors (``margin``, ``weight``, the loop's ``index``), moved with the batch.
        encoder_cache: frozen-encoder outputs shared by the passes that score this batch (see
            :class:`EncoderCache`).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    pixel_values: Tensor | None = None
    candidate_mask: Tensor | None = None
    labels: Tensor | None = None
    meta: list[dict] = field(default_factory=list)
    extras: dict[str, Tensor] = field(default_factory=dict)
    encoder_cache: EncoderCache = field(default_factory=EncoderCache, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def num_candidates(self) -> int:
        return self.completion_ids.shape[1]
