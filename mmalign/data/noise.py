"""Per-example diffusion noise draws, made in the collate so that policy and reference passes share them.

See :mod:`mmalign.adapters.diffusion` for why the noise and timestep are shared by an example's K candidates and
seeded by ``(run seed, example index, epoch)``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor


def example_seed(seed: int, index: int, epoch: int) -> int:
    """A 63-bit generator seed for one example's draws (stable across processes and Python versions)."""
    digest = hashlib.sha256(f"mmalign-diffusion:{seed}:{index}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class NoiseSampler:
    """Draws, per example, the noise, timestep (or flow σ) and VAE posterior noise shared by its candidates.

    Attributes:
        latent_shape: ``(C, h, w)`` of one candidate's latents.
        seed: the run seed.
        flow: flow matching (SD3) instead of DDPM timesteps.
        num_train_timesteps: N of the training scheduler.
        min_timestep, max_timestep: DDPM timesteps are uniform on ``[min, max)`` (default ``[0, N)``).
        flow_sigmas, flow_timesteps: the *training* scheduler's tables (descending, length N).
        weighting_scheme: ``logit_normal`` | ``uniform`` | ``mode`` (diffusers' names) for flow σ.
        logit_mean, logit_std, mode_scale: their parameters (SD3 defaults 0, 1, 1.29).
        vae_sample: draw posterior noise so latents are a sample of the VAE posterior (else its mean).
        fixed: leave the epoch out of the seed (noise fixed per example; needed by a precomputed reference).
        proportion_empty_prompts: probability that an example's caption is replaced by "" (Salesforce 0.2).
    """

    latent_shape: tuple[int, int, int]
    seed: int = 0
    flow: bool = False
    num_train_timesteps: int = 1000
    min_timestep: int = 0
    max_timestep: int | None = None
    flow_sigmas: Tensor | None = None
    flow_timesteps: Tensor | None = None
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    vae_sample: bool = False
    fixed: bool = False
    proportion_empty_prompts: float = 0.0

    def draw(self, index: int, epoch: int, num_candidates: int) -> dict[str, Tensor | bool]:
        """One example's draws: ``noise [C,h,w]``, ``timesteps []``, ``sigmas []`` (flow),
        ``vae_noise [C,h,w]`` (if vae_sample), ``drop_caption`` (bool). ``num_candidates`` is unused (kept so
        per-candidate draws can be added without changing callers)."""
        g = torch.Generator().manual_seed(example_seed(self.seed, index, 0 if self.fixed else epoch))
        out: dict[str, Tensor | bool] = {"noise": torch.randn(self.latent_shape, generator=g)}
        if self.flow:
            u = self._flow_u(g)
            n = len(self.flow_sigmas)
            i = min(int(u * n), n - 1)  # diffusers: (u * num_train_timesteps).long() into the scheduler's tables
            out["timesteps"] = self.flow_timesteps[i].float()
            out["sigmas"] = self.flow_sigmas[i].float()
        else:
            hi = self.max_timestep if self.max_timestep is not None else self.num_train_timesteps
            out["timesteps"] = torch.randint(self.min_timestep, hi, (), generator=g)
        if self.vae_sample:
            # One posterior draw shared by the K candidates too (the reference scripts draw per image): identical
            # images then get identical latents, so the shared-noise invariants hold exactly.
            out["vae_noise"] = torch.randn(self.latent_shape, generator=g)
        # drawn unconditionally so that turning prompt dropout on does not shift the other draws
        out["drop_caption"] = bool(torch.rand((), generator=g) < self.proportion_empty_prompts)
        return out

    def _flow_u(self, g: torch.Generator) -> float:
        # Same densities as diffusers.training_utils.compute_density_for_timestep_sampling, one draw at a time.
        if self.weighting_scheme == "logit_normal":
            return torch.sigmoid(torch.randn((), generator=g) * self.logit_std + self.logit_mean).item()
        u = torch.rand((), generator=g).item()
        if self.weighting_scheme == "mode":
            return 1 - u - self.mode_scale * (math.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def key(self) -> str:
        """Everything that changes the draws (for reference-score cache keys)."""
        skip = {"flow_sigmas", "flow_timesteps"}
        parts = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        if self.flow_sigmas is not None:
            parts["flow_sigmas"] = hashlib.sha256(self.flow_sigmas.numpy().tobytes()).hexdigest()[:16]
        return repr(sorted(parts.items()))
