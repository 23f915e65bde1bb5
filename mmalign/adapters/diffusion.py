"""The diffusion adapter: ``(denoiser, ImageBatch) → Scores`` with ``logps = −(per-sample denoising error)``.

For B examples with K candidate images each (K=2 pairs: 0 = chosen, 1 = rejected; K=1 unpaired/SFT; K>2
ranked lists with ``candidate_mask``), the adapter encodes the images to latents (or takes cached VAE
posterior parameters), noises every candidate of an example with **one noise tensor and one timestep shared
by its K candidates**, runs the denoiser once over the B·K valid candidates, and returns the per-sample MSE
(mean over C, H, W, in fp32) to the ε, v or flow-velocity target. Diffusion-DPO's algebra needs the shared
noise and timestep (research/diffusion.md §1.1, pitfall 1): identical images then give identical errors.

All randomness is drawn in the collate (:class:`NoiseSampler`), from one generator per example seeded with
``(run seed, example index, epoch)``: the policy and reference passes see the very same noise (it rides on the
batch), a resumed run redraws exactly what the uninterrupted run drew, and the draw does not depend on the
batch size or the number of processes. With ``fixed=True`` the epoch is left out, so an example's noise never
changes — the condition under which a *precomputed* reference (scores cached once) is valid.

Targets (diffusers' training scripts): ε → ``noise``; v → ``scheduler.get_velocity(x0, noise, t)``;
x0 → ``x0``; flow matching (SD3) → ``noise − x0`` with ``x_t = (1−σ)·x0 + σ·noise`` and σ drawn as in
diffusers' ``train_dreambooth_lora_sd3.py`` (``compute_density_for_timestep_sampling``: u ~ logit-normal,
index ``⌊u·N⌋`` into the training scheduler's shifted ``sigmas``/``timesteps``).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from ..data.batches import ImageBatch
from ..data.noise import NoiseSampler, example_seed
from ..types import Scores

__all__ = ["DiffusionAdapter", "ImageBatch", "NoiseSampler", "candidate_errors", "example_seed",
           "flow_noisy_and_target", "per_sample_mse"]


def flow_noisy_and_target(x0: Tensor, noise: Tensor, sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """Flow matching in diffusers' convention (SD3, research/diffusion.md §5): ``x_t = (1−σ)·x0 + σ·noise`` and the
    velocity target ``noise − x0``, for ``[N, ...]`` samples with per-row ``σ [N]``. MMAudio's convention (t = 1−σ,
    target ``x0 − noise``) is its negation; the squared error is the same."""
    s = sigmas.to(x0).view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - s) * x0 + s * noise, noise - x0


def candidate_errors(x0: Tensor, candidate_mask: Tensor | None, errors_of) -> Tensor:
    """Per-candidate errors ``[B, K]`` (0 on padding candidates) of ``x0 [B, K, ...]``: only the valid candidates go
    through the network. ``errors_of(rows, cols)`` returns the flat per-sample errors ``[N]`` of candidates
    ``x0[rows, cols]`` (rows index the example, so its shared noise and timestep are ``extras[...][rows]``)."""
    b, k = x0.shape[:2]
    valid = (torch.ones(b, k, dtype=torch.bool, device=x0.device) if candidate_mask is None
             else candidate_mask.bool().to(x0.device))
    rows, cols = valid.nonzero(as_tuple=True)
    err_flat = errors_of(rows, cols)
    err = torch.zeros(b, k, dtype=err_flat.dtype, device=err_flat.device)
    return err.index_put((rows, cols), err_flat)


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over every dimension but the first, in fp32 (Diffusion-DPO's reduction, research/diffusion.md §1.1)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def make_noise_sampler(components, resolution: int, **kwargs) -> NoiseSampler:
    """A :class:`NoiseSampler` matching ``components`` (latent shape, scheduler tables)."""
    sched = components.scheduler
    flow = components.kind == "sd3"
    extra = {}
    if flow:
        # The training tables: diffusers' SD3 script deep-copies the scheduler before any set_timesteps call.
        extra = {"flow_sigmas": sched.sigmas.detach().cpu().clone().float(),
                 "flow_timesteps": sched.timesteps.detach().cpu().clone().float()}
    return NoiseSampler(latent_shape=components.latent_shape(resolution), flow=flow,
                        num_train_timesteps=int(sched.config.num_train_timesteps),
                        vae_sample=kwargs.pop("vae_sample", True) and components.vae is not None, **extra, **kwargs)


class DiffusionAdapter:
    """Scores an :class:`ImageBatch` with a denoiser; holds the frozen VAE/text encoders and the scheduler.

    Args:
        components: :class:`mmalign.models.diffusion.DiffusionComponents` (its ``denoiser`` is not used here:
            the model to score is passed to :meth:`score`, so the same adapter serves policy and reference).
        fixed_time_ids: SDXL ``time_ids`` fixed to ``(res, res, 0, 0, res, res)`` (Salesforce) instead of the
            batch's per-image original size and crop (diffusers' SDXL DPO script).
        snr_gamma: Min-SNR-γ weighting of the per-sample errors (Hang et al., arXiv 2303.09556; diffusers'
            ``--snr_gamma``): ε ``min(SNR, γ)/SNR``, v ``min(SNR, γ)/(SNR + 1)``. Not in any reference
            Diffusion-DPO code (default None); both candidates share t, so it acts as a per-example β.
    """

    def __init__(self, components, *, snr_gamma: float | None = None, fixed_time_ids: bool = False,
                 resolution: int | None = None):
        self.c = components
        self.snr_gamma = snr_gamma
        self.fixed_time_ids, self.resolution = fixed_time_ids, resolution
        self._placed: torch.device | None = None
        if snr_gamma is not None and components.prediction_type in ("flow", "sample"):
            raise ValueError(f"snr_gamma is defined for epsilon/v_prediction models, not {components.prediction_type}")

    # -- inputs ---------------------------------------------------------------------------------------------
    def ensure_inputs(self, batch: ImageBatch) -> None:
        """Encode images and captions once per batch (kept on the batch for the reference pass)."""
        self._place(batch.device)
        if batch.latent_params is None:
            px = batch.pixel_values
            b, k = px.shape[:2]
            flat = px.flatten(0, 1)
            params = self.c.encode_images(flat.to(self._vae_device()))
            batch.latent_params = params.reshape(b, k, *params.shape[1:]).float()
        if batch.prompt_embeds is None:
            embeds, pooled = self.c.encode_prompt(batch.captions, device=self._text_device())
            batch.prompt_embeds = embeds.to(batch.device)
            batch.pooled_prompt_embeds = None if pooled is None else pooled.to(batch.device)

    def _place(self, device: torch.device) -> None:
        # The loop moves only the trained model to the accelerator; the frozen encoders follow the first batch.
        if self._placed == device:
            return
        for m in [self.c.vae, *self.c.text_encoders]:
            if m is not None:
                m.to(device)
        self._placed = device

    def _vae_device(self):
        return next(self.c.vae.parameters()).device if self.c.vae is not None else "cpu"

    def _text_device(self):
        return next(m for m in self.c.text_encoders if m is not None).device

    def latents(self, batch: ImageBatch) -> Tensor:
        """``[B, K, C, h, w]`` scaled latents (posterior sample with the batch's ``vae_noise``)."""
        self.ensure_inputs(batch)
        params = batch.latent_params.to(batch.device)
        if self.c.vae is None:
            return params
        mean, logvar = params.float().chunk(2, dim=2)
        z = mean
        if "vae_noise" in batch.extras:
            # DiagonalGaussianDistribution.sample: mean + exp(0.5·clamp(logvar, −30, 20)) · ε
            eps = batch.extras["vae_noise"].to(mean).unsqueeze(1)  # [B, 1, C, h, w]: shared by the K candidates
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps
        shift = getattr(self.c.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.c.vae.config.scaling_factor

    # -- noising and targets --------------------------------------------------------------------------------
    def noisy_and_target(self, x0: Tensor, noise: Tensor, timesteps: Tensor, sigmas: Tensor | None
                         ) -> tuple[Tensor, Tensor]:
        """``(x_t, target)`` for flat ``[N, C, h, w]`` latents with per-row noise/timesteps/σ."""
        pt = self.c.prediction_type
        if pt == "flow":
            return flow_noisy_and_target(x0, noise, sigmas)
        sched = self.c.scheduler
        x_t = sched.add_noise(x0, noise, timesteps)
        if pt == "epsilon":
            return x_t, noise
        if pt == "v_prediction":
            return x_t, sched.get_velocity(x0, noise, timesteps)
        if pt == "sample":
            return x_t, x0
        raise ValueError(f"unknown prediction_type {pt!r}; expected epsilon, v_prediction or sample")

    def _snr_weights(self, timesteps: Tensor) -> Tensor:
        ac = self.c.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = ac / (1.0 - ac)
        w = torch.clamp(snr, max=self.snr_gamma)
        return w / (snr + 1.0) if self.c.prediction_type == "v_prediction" else w / snr

    # -- forward ---------------------------------------------------------------------------------------------
    def predict(self, model: nn.Module, x_t: Tensor, timesteps: Tensor, embeds: Tensor, pooled: Tensor | None,
                time_ids: Tensor | None) -> Tensor:
        """One denoiser forward over flat candidates (UNet, SDXL UNet or SD3 transformer)."""
        dtype = _param_dtype(model)
        x_t, embeds = x_t.to(dtype), embeds.to(dtype)
        if self.c.kind == "sd3":
            return model(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=embeds,
                         pooled_projections=pooled.to(dtype), return_dict=False)[0]
        added = None
        if self.c.kind == "sdxl":
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        return model(x_t, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]

    def score(self, model: nn.Module, batch: ImageBatch) -> Scores:
        """``Scores(logps=−err [B, K])``; ``extras["err"]`` the raw errors (0 on padding candidates),
        ``extras["timesteps"]`` the shared timesteps ``[B]``."""
        x0 = self.latents(batch)  # [B, K, C, h, w]

        def errors_of(rows: Tensor, cols: Tensor) -> Tensor:
            noise = batch.extras["noise"].to(x0)[rows]
            timesteps = batch.extras["timesteps"].to(x0.device)[rows]
            sigmas = batch.extras["sigmas"].to(x0.device)[rows] if "sigmas" in batch.extras else None
            x_t, target = self.noisy_and_target(x0[rows, cols], noise, timesteps, sigmas)
            embeds = batch.prompt_embeds.to(x0.device)[rows]
            pooled = None if batch.pooled_prompt_embeds is None else batch.pooled_prompt_embeds.to(x0.device)[rows]
            time_ids = None
            if self.c.kind == "sdxl":
                time_ids = batch.extras["time_ids"].to(x0.device)[rows, cols]
                if self.fixed_time_ids:  # Salesforce SDXL: (res, res, 0, 0, res, res) whatever the source image
                    res = float(self.resolution or time_ids[0, 4])
                    time_ids = torch.tensor([res, res, 0.0, 0.0, res, res], device=x0.device).expand_as(time_ids)
            pred = self.predict(model, x_t, timesteps, embeds, pooled, time_ids)
            err_flat = per_sample_mse(pred, target)
            return err_flat * self._snr_weights(timesteps) if self.snr_gamma is not None else err_flat

        err = candidate_errors(x0, batch.candidate_mask, errors_of)
        return Scores(logps=-err, extras={"err": err, "timesteps": batch.extras["timesteps"].float()})

    __call__ = score


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# ------------------------------------------------------------------------------------------------ feature caches
# VAE posterior parameters and text embeddings computed once and stored on disk, one file per image / caption,
# keyed by content (raw image bytes or caption text) + preprocessing + a hash of the encoder weights, so that a
# second run (or another method on the same data) reuses them and any change recomputes. Files are loaded on
# demand, so the cache may be far larger than memory (Pick-a-Pic v2: ~1.7 M images).


def _sha(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()


def _save_atomic(obj: dict, path) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


class DiskLatents:
    """index → ``(params [K, 2C, h, w], time_ids [K, 6])`` read from the latent cache."""

    def __init__(self, root, keys: list[list[str]]):
        self.root, self.keys = root, keys

    def path(self, key: str):
        return self.root / key[:2] / f"{key}.pt"

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        items = [torch.load(self.path(k), weights_only=True) for k in self.keys[index]]
        return torch.stack([i["params"] for i in items]), torch.stack([i["time_ids"] for i in items])


class DiskText:
    """caption → ``(prompt_embeds [L, D], pooled [P] or None)`` read from the text cache."""

    def __init__(self, root, encoder_key: str):
        self.root, self.encoder_key = root, encoder_key

    def path(self, caption: str):
        key = _sha(self.encoder_key, caption)
        return self.root / key[:2] / f"{key}.pt"

    def __getitem__(self, caption: str) -> tuple[Tensor, Tensor | None]:
        item = torch.load(self.path(caption), weights_only=True)
        return item["embeds"], item.get("pooled")


@torch.no_grad()
def build_latent_cache(dataset, components, cache_dir, *, batch_size: int = 8, device=None) -> dict[str, int]:
    """Encode every image of ``dataset`` (an :class:`mmalign.data.image.ImageDataset`) once; attach a
    :class:`DiskLatents` store so the dataset yields cached posterior parameters instead of pixels."""
    from pathlib import Path

    from ..hashing import model_hash

    if dataset.random_flip:
        raise ValueError("cached latents cannot follow a random flip; set diffusion.random_flip=false or turn "
                         "diffusion.cache_latents off")
    enc = "pixels" if components.vae is None else model_hash(components.vae)
    prep = f"{dataset.resolution}:{dataset.center_crop}:{enc}"
    root = Path(cache_dir) / "latents"
    store = DiskLatents(root, [[_sha(prep, ref.raw_bytes()) for ref in rec.images] for rec in dataset.records])
    todo = [i for i, ks in enumerate(store.keys) if not all(store.path(k).is_file() for k in ks)]
    device = device or (next(components.vae.parameters()).device if components.vae is not None else "cpu")
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        loaded = [dataset.load_pixels(i) for i in chunk]
        pixels = torch.cat([px for px, _ in loaded])
        params = components.encode_images(pixels.to(device)).float().cpu()
        flat_keys = [k for i in chunk for k in store.keys[i]]
        flat_ids = torch.cat([ids for _, ids in loaded])
        for key, p, t in zip(flat_keys, params, flat_ids, strict=True):
            _save_atomic({"params": p.clone(), "time_ids": t.clone()}, store.path(key))
    dataset.latent_store = store
    return {"latent_cache/images": sum(len(k) for k in store.keys), "latent_cache/encoded_examples": len(todo)}


@torch.no_grad()
def build_text_cache(datasets, components, cache_dir, *, batch_size: int = 32, device=None) -> dict[str, int]:
    """Encode every caption of ``datasets`` (and "" for prompt dropout) once; attach :class:`DiskText`."""
    from pathlib import Path

    from ..hashing import tensor_hash

    enc_key = tensor_hash(v for m in components.text_encoders if m is not None
                          for _, v in sorted(m.state_dict().items()))
    enc_key = _sha(enc_key, components.kind, str(components.max_sequence_length))
    store = DiskText(Path(cache_dir) / "text", enc_key)
    captions = sorted({""} | {r.caption for ds in datasets for r in ds.records})
    todo = [c for c in captions if not store.path(c).is_file()]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        embeds, pooled = components.encode_prompt(chunk, device=device)
        for j, c in enumerate(chunk):
            item = {"embeds": embeds[j].float().cpu().clone()}
            if pooled is not None:
                item["pooled"] = pooled[j].float().cpu().clone()
            _save_atomic(item, store.path(c))
    for ds in datasets:
        ds.text_store = store
    return {"text_cache/captions": len(captions), "text_cache/encoded": len(todo)}
