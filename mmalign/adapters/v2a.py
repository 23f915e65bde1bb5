"""The video-to-audio adapter: ``(V2ADenoiser, V2ABatch) → Scores`` with ``logps = −(per-sample velocity MSE)``.

For B videos with K candidate audios each, the adapter encodes the frames once per batch (frozen frame encoder) and
the audios to latents (VAE posterior parameters or mel latents), kept on the batch so the reference pass reuses
them; every candidate of an example is noised with **the example's one noise tensor and one flow time** (drawn in
the collate by :class:`~mmalign.data.noise.NoiseSampler`, seeded by ``(run seed, index, epoch)``), and the
denoiser runs once over the B·K valid candidates. Flow matching in MMAudio's convention (arXiv 2412.15322;
research/video_audio_clip_prior.md §2.5, σ_min = 0): with t = 1 − σ,

    x_t = (1 − t)·noise + t·x1,   u = x1 − noise,   err = mean_{C,L} (v_θ(x_t, t, video) − u)²

— :func:`~mmalign.adapters.diffusion.flow_noisy_and_target` (diffusers' σ convention, target ``noise − x1`` = −u)
and :func:`~mmalign.adapters.diffusion.candidate_errors` are the diffusion adapter's own arithmetic, shared. Flow
DPO (§2.2) then reads ``Δ = err_θ − err_ref`` per candidate. The learned null condition replaces the video of the
examples whose ``extras["null"]`` is set (classifier-free guidance dropout), for policy and reference alike.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.v2a import V2ABatch
from ..types import Scores
from .diffusion import candidate_errors, flow_noisy_and_target, per_sample_mse

__all__ = ["V2AAdapter"]


class V2AAdapter:
    """Scores a :class:`V2ABatch` with a :class:`~mmalign.models.v2a.V2ADenoiser`; holds the frozen parts
    (``components``: :class:`~mmalign.models.v2a.V2AComponents`; its ``denoiser`` is not used here, the model to
    score is passed to :meth:`score`, so the same adapter serves policy and reference)."""

    def __init__(self, components):
        self.c = components
        self._placed: torch.device | None = None

    def _place(self, device: torch.device) -> None:
        # The loop moves only the trained model; the frozen encoders follow the first batch.
        if self._placed != device:
            for m in self.c.frozen():
                m.to(device)
            self._placed = device

    def ensure_inputs(self, batch: V2ABatch) -> None:
        """Encode frames and audios once per batch."""
        self._place(batch.device)
        if batch.features is None:
            batch.features = self.c.encode_frames(batch.frames).to(batch.device)
        if batch.latent_params is None:
            b, k = batch.waves.shape[:2]
            params = self.c.encode_audio(batch.waves.flatten(0, 1).to(batch.device))
            batch.latent_params = params.reshape(b, k, *params.shape[1:]).to(batch.device)

    def latents(self, batch: V2ABatch) -> Tensor:
        """``[B, K, C, L]`` flow targets x1 (a VAE posterior draw shared by the K candidates, or its mean)."""
        self.ensure_inputs(batch)
        b, k = batch.latent_params.shape[:2]
        flat = batch.latent_params.flatten(0, 1)
        noise = batch.extras.get("vae_noise")
        noise = None if noise is None else noise.repeat_interleave(k, dim=0)
        x1 = self.c.latents(flat, noise)
        return x1.reshape(b, k, *x1.shape[1:])

    def score(self, model: nn.Module, batch: V2ABatch) -> Scores:
        """``Scores(logps=−err [B, K])``; ``extras["err"]`` the raw errors (0 on padding candidates),
        ``extras["timesteps"]`` the shared flow times t ``[B]`` (MMAudio's t: 0 = noise, 1 = data)."""
        x1 = self.latents(batch)
        sigmas = batch.extras["sigmas"].to(x1.device)
        null = batch.extras.get("null")

        def errors_of(rows: Tensor, cols: Tensor) -> Tensor:
            x_t, noise_minus_x1 = flow_noisy_and_target(x1[rows, cols], batch.extras["noise"].to(x1)[rows],
                                                        sigmas[rows])
            pred = model(x_t, 1.0 - sigmas[rows], batch.features[rows],
                         None if null is None else null.to(x1.device)[rows])
            return per_sample_mse(pred, -noise_minus_x1)

        err = candidate_errors(x1, batch.candidate_mask, errors_of)
        return Scores(logps=-err, extras={"err": err, "timesteps": (1.0 - sigmas).float()})

    __call__ = score
