"""Truncated diffusion fine-tuning (TDFT): the noise-level math of Self-NPO (Wang et al., arXiv 2505.11777).

Model-free pieces that :class:`mmalign.methods.self_npo.SelfNPOTask` composes into one training step:

* :class:`NoiseLevels` / :func:`noise_levels`: α, σ and the denoiser's timestep input per integer training level of
  a diffusers scheduler (DDPM-family or flow matching, x_t = (1 − σ)x0 + σε with α = 1 − σ).
* :func:`to_x0_eps`: a denoiser's raw ε-, v-, x0- ("sample") or flow output → ``(x̂0, ε̂)``.
* :func:`ddim_grid` / :func:`truncated_rollout`: K DDIM (η = 0) teacher steps on an N-step grid of the training
  levels, ending with the teacher's x0 estimate ``x̂0 = E[x0 | x_{t_K}]``.
* :func:`higher_levels` / :func:`renoise`: a level s ~ U{t_K + 1, …, T − 1} and the forward diffusion of the state
  x_{t_K} to it::

      x_s = (α_s/α_t)·x_t + sqrt(σ_s² − σ_t²·α_s²/α_t²)·ε          (α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t))

* The data-free inputs: :class:`SeedRange` (example indices with a visit count, for per-example seeds),
  :class:`SelfNPOBatch` (captions and every random draw of a step) and :func:`read_prompts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor


@dataclass
class NoiseLevels:
    """α, σ and the denoiser's timestep input for the integer training levels t = 0 … T−1 of a scheduler.

    DDPM-family schedulers: ``α = sqrt(ᾱ_t)``, ``σ = sqrt(1 − ᾱ_t)``, timestep input t. Flow matching
    (``FlowMatchEulerDiscreteScheduler``): level t has the (shifted) training sigma ``σ = sigmas[T−1−t]``,
    ``α = 1 − σ`` and timestep input ``σ·T`` (diffusers' SD3 training convention).
    """

    alpha: Tensor  # [T] float64
    sigma: Tensor  # [T] float64
    model_t: Tensor  # [T] float32, what the denoiser's ``timestep`` argument receives
    prediction_type: str  # "epsilon" | "v_prediction" | "sample" | "flow"

    @property
    def num_levels(self) -> int:
        return self.alpha.shape[0]

    def at(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(α_t, σ_t)`` broadcastable to ``x`` (``[B, 1, 1, 1]``); t = −1 means clean (α = 1, σ = 0)."""
        t = t.long().cpu()
        clean = t < 0
        idx = t.clamp(min=0)
        a = torch.where(clean, torch.ones((), dtype=torch.float64), self.alpha[idx])
        s = torch.where(clean, torch.zeros((), dtype=torch.float64), self.sigma[idx])
        shape = (-1,) + (1,) * (x.dim() - 1)
        return a.to(x.device, torch.float32).view(shape), s.to(x.device, torch.float32).view(shape)

    def timestep_input(self, t: Tensor, device: torch.device) -> Tensor:
        """The denoiser's ``timestep`` argument: integer levels for DDPM-family models (as in training), the
        float ``σ·T`` for flow matching."""
        out = self.model_t[t.long().clamp(min=0).cpu()]
        return (out if self.prediction_type == "flow" else out.long()).to(device)


def noise_levels(scheduler, prediction_type: str | None = None) -> NoiseLevels:
    """:class:`NoiseLevels` of a diffusers training scheduler (DDPM/DDIM-family or flow matching)."""
    if hasattr(scheduler, "alphas_cumprod"):
        ac = scheduler.alphas_cumprod.double()
        pred = prediction_type or str(scheduler.config.prediction_type)
        return NoiseLevels(ac.sqrt(), (1 - ac).sqrt(), torch.arange(len(ac), dtype=torch.float32), pred)
    if hasattr(scheduler, "sigmas") and "FlowMatch" in type(scheduler).__name__:
        n = int(scheduler.config.num_train_timesteps)
        sig = scheduler.sigmas.double()[:n].flip(0)  # ascending: level 0 is the least noisy
        return NoiseLevels(1 - sig, sig, (sig * n).float(), "flow")
    raise ValueError(f"{type(scheduler).__name__} has neither alphas_cumprod nor flow-matching sigmas; Self-NPO "
                     "needs a DDPM-family or FlowMatchEulerDiscrete training scheduler")


def to_x0_eps(output: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """The denoiser's raw output at ``x = α·x0 + σ·ε`` → ``(x̂0, ε̂)``.

    ε: x0 = (x − σε)/α · v (= αε − σx0): x0 = αx − σv, ε = σx + αv (α² + σ² = 1) · sample: x0 directly ·
    flow (v = ε − x0, α = 1 − σ): x0 = x − σv, ε = x + αv.
    """
    out, x = output.float(), x.float()
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out, sigma * x + alpha * out
    if prediction_type == "sample":
        return out, (x - alpha * out) / sigma.clamp(min=1e-8)
    if prediction_type == "flow":
        return x - sigma * out, x + alpha * out
    raise ValueError(f"prediction_type={prediction_type!r} is not one of epsilon, v_prediction, sample, flow")


def renoise(x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor, noise: Tensor) -> Tensor:
    """Forward-diffuse a state at level t to the noisier level s (paper step 3)::

        x_s = (α_s/α_t)·x_t + sqrt(σ_s² − σ_t²·α_s²/α_t²)·ε

    If ``x_t = α_t x0 + σ_t ε'`` then ``x_s = α_s x0 + σ_s ε''`` in distribution: the mean scales by α_s/α_t and
    the added variance tops σ_t²α_s²/α_t² up to σ_s². The released code's
    ``α_s·(x_t/α_t + sqrt(σ_s²/α_s² − σ_t²/α_t²)·ε)`` is the same expression. s must be noisier (σ_s/α_s ≥
    σ_t/α_t); the variance is clamped at 0 against rounding.
    """
    ratio = alpha_s / alpha_t
    var = (sigma_s**2 - (sigma_t * ratio) ** 2).clamp(min=0)
    return ratio * x_t + var.sqrt() * noise


def ddim_grid(num_levels: int, grid_steps: int) -> Tensor:
    """Descending ``[N]`` grid ``T−1, T−1−stride, …`` with stride ``T // N`` (the code's 999, 959, …, 39)."""
    if not 1 <= grid_steps <= num_levels:
        raise ValueError(f"grid_steps={grid_steps} must lie in [1, {num_levels}]")
    stride = num_levels // grid_steps
    return torch.arange(num_levels - 1, -1, -stride)[:grid_steps]


@torch.no_grad()
def truncated_rollout(
    predict,
    x: Tensor,
    start_index: Tensor,
    grid: Tensor,
    levels: NoiseLevels,
    k_steps: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """K DDIM (η = 0) steps per sample along ``grid`` from ``grid[start_index]``; returns ``(x_end, t_end, x0_hat)``.

    ``predict(x, t) -> (x̂0, ε̂)`` is the (guided) teacher at integer levels ``t [B]``. A DDIM step to level t' is
    ``x_{t'} = α_{t'} x̂0 + σ_{t'} ε̂`` (the flow-matching Euler step is the same expression). A sample whose next
    grid point would fall below level 0 steps to the clean sample (t = −1) and stays there. The target is the
    teacher's x̂0 at the end point (one more evaluation), or the clean sample itself where t_end = −1.
    """
    stride = int(grid[0] - grid[1]) if len(grid) > 1 else int(grid[0]) + 1
    t = grid[start_index.long().cpu()].clone()
    for _ in range(k_steps):
        active = t >= 0
        if not active.any():
            break
        x0_hat, eps_hat = predict(x, t.clamp(min=0))
        t_next = torch.where(active, t - stride, t)
        t_next = torch.where(active & (t_next < 0), torch.full_like(t_next, -1), t_next)
        a, s = levels.at(t_next, x)
        stepped = a * x0_hat + s * eps_hat
        keep = active.to(x.device).view(-1, *([1] * (x.dim() - 1)))
        x = torch.where(keep, stepped.to(x.dtype), x)
        t = t_next
    target = x.clone()
    live = t >= 0
    if live.any():
        x0_hat, _ = predict(x, t.clamp(min=0))
        target = torch.where(live.to(x.device).view(-1, *([1] * (x.dim() - 1))), x0_hat.to(x.dtype), target)
    return x, t, target


def higher_levels(t_end: Tensor, u: Tensor, num_levels: int) -> Tensor:
    """s ~ U{t_end + 1, …, T − 1} per sample from uniform draws ``u`` in [0, 1) (t_end = −1 allows every level;
    t_end = T − 1 gives s = T − 1)."""
    low = (t_end.long().cpu() + 1).clamp(max=num_levels - 1)
    return (low + (u.double().cpu() * (num_levels - low)).floor().long()).clamp(max=num_levels - 1)


# ------------------------------------------------------------------------------------------ data-free inputs


@dataclass
class SelfNPOBatch:
    """B data-free examples: captions and every random draw of their step (drawn in the collate).

    ``extras``: ``noise [B, C, h, w]`` (x_T, or the noise of the data image), ``renoise [B, C, h, w]`` (ε of
    step 2), ``start_index [B]`` (grid index the rollout starts from), ``level_u [B]`` (uniform draw that picks s),
    ``time_ids [B, 6]`` (SDXL), ``index [B]`` (added by the loop). ``images``: the data images' batch
    (``start: data``), else None.
    """

    captions: list[str]
    extras: dict[str, Tensor]
    images: object = None  # an ImageBatch for start="data"
    meta: list[dict] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device | str) -> SelfNPOBatch:
        extras = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.extras.items()}
        images = self.images.to(device) if self.images is not None else None
        return SelfNPOBatch(self.captions, extras, images, self.meta)


class SeedRange(torch.utils.data.Dataset):
    """``num_samples`` example indices; the epoch of each visit (for the seeds) is counted per index."""

    def __init__(self, n: int):
        self.n = n
        self._visits: dict[int, int] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[int, int]:
        epoch = self._visits.get(index, 0)
        self._visits[index] = epoch + 1
        return index, epoch


def read_prompts(path: str) -> list[str]:
    """The prompts of ``loss.kwargs.prompts_file``: one per non-empty line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"loss.kwargs.prompts_file={path!r} does not exist; give a text file with one "
                                "prompt per line")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"loss.kwargs.prompts_file={path!r} holds no prompts (one per line)")
    return prompts
