"""Image sampling for qualitative checks and evaluation, with **NPO-guided classifier-free guidance**.

Diffusion-NPO (arXiv 2505.11245) and Self-NPO (arXiv 2505.11777) replace the model of the unconditional CFG
branch with a *negative* model θ_neg (built by :mod:`mmalign.models.npo_weights`)::

    ε̃ = ε_neg(x_t, ∅) + w · (ε_pos(x_t, c) − ε_neg(x_t, ∅))            (w = diffusers' guidance_scale)

Implementation: the stock diffusers pipeline runs unchanged (StableDiffusion, SDXL, SD3 — prompt encoding,
``scheduler.scale_model_input``, guidance rescale, the scheduler's step and the VAE are all the pipeline's own),
and only its denoiser (``pipe.unet`` / ``pipe.transformer``) is swapped for :class:`GuidedDenoiser` while
sampling. The pipeline feeds the CFG-doubled batch ``[uncond; cond]`` (negative-prompt embeddings first); the
wrapper runs θ_neg on the first half and θ_pos on the second and concatenates, so the pipeline's own
``uncond + w·(cond − uncond)`` becomes the NPO combination above. This fixes a flaw of the reference code's
double-UNet pipelines, which call both UNets on the raw latents and skip ``scale_model_input`` (wrong for
Euler/Heun-type schedulers, e.g. SDXL's default; research/diffusion.md §3.3). With ``negative`` = θ_pos
(α = 1, β = 0) the output equals the stock pipeline's up to the last bits of two batch-B forwards instead of
one batch-2B forward; CFG is skipped when ``guidance_scale <= 1`` (the negative model is then unused).

Seeds are per image (one ``torch.Generator`` per sample), so the same prompt and seed give the same initial
noise for every model and setting, whatever the batch composition: before/after comparisons are paired.
Models without a VAE (pixel-space denoisers, ``pipe.vae is None``) sample in pixel space: the pipeline returns
its latents and ``[-1, 1]`` pixels are mapped to ``[0, 1]`` here.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

SAMPLERS = ("ddim", "euler", "dpm", "ddpm")


def sampling_scheduler(training_scheduler, sampler: str = "ddim"):
    """A fresh sampling scheduler built from a training scheduler's config (never the training object itself:
    ``set_timesteps`` changes a flow-matching scheduler's tables). Flow-matching models keep their own class."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    if isinstance(training_scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchEulerDiscreteScheduler.from_config(training_scheduler.config)
    table = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler,
             "ddpm": DDPMScheduler}
    if sampler not in table:
        raise ValueError(f"sampler={sampler!r} is not one of {sorted(table)}")
    return table[sampler].from_config(training_scheduler.config)


def build_pipeline(components, denoiser: nn.Module | None = None, *, sampler: str = "ddim"):
    """A diffusers pipeline over :class:`~mmalign.models.diffusion.DiffusionComponents` (modules shared, not
    copied) with a fresh ``sampler`` scheduler; ``denoiser`` replaces the components' one (e.g. a trained copy)."""
    pipe = components.pipeline(denoiser)
    pipe.scheduler = sampling_scheduler(components.scheduler, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_name(pipe) -> str:
    """``"unet"`` or ``"transformer"``: the attribute that holds a pipeline's denoiser."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer component")


class GuidedDenoiser(nn.Module):
    """Stands in for a pipeline's denoiser: θ_neg on the unconditional half of a CFG batch, θ_pos on the rest.

    ``cfg_batch`` is the size of the CFG-doubled batch (2 × images). Calls with exactly that batch are split;
    any other call (no CFG, SD3's skip-layer pass of batch B) goes to the positive model alone. Every tensor
    argument (also inside dict arguments such as SDXL's ``added_cond_kwargs``) whose first dimension is
    ``cfg_batch`` is split the same way; a scalar timestep is shared.
    """

    def __init__(self, positive: nn.Module, negative: nn.Module, *, cfg_batch: int):
        super().__init__()
        self.positive, self.negative, self.cfg_batch = positive, negative, cfg_batch

    # The pipeline reads config, dtype, device and a few submodules (e.g. SDXL's add_embedding) off its denoiser.
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["positive"], name)

    def _half(self, value: Any, part: int) -> Any:
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == self.cfg_batch:
            return value.chunk(2)[part]
        if isinstance(value, dict):
            return {k: self._half(v, part) for k, v in value.items()}
        return value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if sample is None or sample.shape[0] != self.cfg_batch:
            return self.positive(*args, **kwargs)
        outs = []
        for part, model in ((0, self.negative), (1, self.positive)):
            out = model(*[self._half(a, part) for a in args], **{k: self._half(v, part) for k, v in kwargs.items()})
            outs.append(out[0] if isinstance(out, tuple) else out.sample)
        pred = torch.cat(outs)
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=pred)  # a BaseOutput with .sample, like UNet2DConditionOutput
        return (pred,)


@contextmanager
def npo_guidance(pipe, negative: nn.Module | None, *, cfg_batch: int):
    """Within the block, ``pipe``'s denoiser is a :class:`GuidedDenoiser` (no-op when ``negative`` is None).

    The attribute is swapped with ``object.__setattr__`` so that the pipeline's registered config (used by
    ``save_pretrained``) is never touched, and restored on exit even if sampling raises.
    """
    if negative is None:
        yield pipe
        return
    name = denoiser_name(pipe)
    positive = getattr(pipe, name)
    if next(negative.parameters()).device != positive.device or next(negative.parameters()).dtype != positive.dtype:
        negative = negative.to(device=positive.device, dtype=positive.dtype)
    negative.eval()
    object.__setattr__(pipe, name, GuidedDenoiser(positive, negative, cfg_batch=cfg_batch))
    try:
        yield pipe
    finally:
        object.__setattr__(pipe, name, positive)


def _pixels_to_images(latents: Tensor) -> Tensor:
    """Pixel-space pipelines (no VAE) return latents that are images in [-1, 1]."""
    return (latents.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    guidance_scale: float = 5.0,
    num_inference_steps: int = 25,
    negative: nn.Module | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 32,
    height: int | None = None,
    width: int | None = None,
    **pipe_kwargs: Any,
) -> Tensor:
    """Sample image ``i`` for ``prompts[i]`` from seed ``seeds[i]``; returns ``[N, 3, H, W]`` floats in [0, 1].

    ``negative``: the θ_neg denoiser for NPO-guided CFG (None: ordinary CFG with the pipeline's denoiser).
    Other keyword arguments go to the pipeline call (``eta``, ``guidance_rescale``, ...).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per image")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    pixel_space = getattr(pipe, "vae", None) is None
    device = getattr(pipe, "_execution_device", None) or torch.device("cpu")
    gen_device = "cpu" if torch.device(device).type == "mps" else device
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = list(prompts[start:start + batch_size]), seeds[start:start + batch_size]
        generators = [torch.Generator(device=gen_device).manual_seed(int(s)) for s in chunk_seeds]
        kwargs = dict(prompt=chunk, generator=generators, guidance_scale=guidance_scale,
                      num_inference_steps=num_inference_steps, output_type="latent" if pixel_space else "pt",
                      **pipe_kwargs)
        if negative_prompt is not None:
            kwargs["negative_prompt"] = [negative_prompt] * len(chunk)
        if height is not None:
            kwargs["height"] = height
        if width is not None:
            kwargs["width"] = width
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        with npo_guidance(pipe, negative, cfg_batch=2 * len(chunk)):
            images = pipe(**kwargs).images
        images = _pixels_to_images(images) if pixel_space else images.float().clamp(0, 1)
        out.append(images.cpu())
    return torch.cat(out)


@dataclass
class Setting:
    """One column group of a sample grid: a guidance scale and an optional NPO negative model."""

    name: str
    guidance_scale: float
    negative: nn.Module | None = None
    pipe: Any = None  # a different pipeline (e.g. the DPO model) for this setting; None: the default one
    kwargs: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def sample_settings(
    pipe,
    settings: Sequence[Setting],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 25,
    batch_size: int = 32,
) -> dict[str, Tensor]:
    """For every setting, one image per (prompt, seed): ``{name: [P, S, 3, H, W]}`` with shared seeds."""
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"setting names must be unique; got {names}")
    flat_prompts = [p for p in prompts for _ in seeds]
    flat_seeds = [s for _ in prompts for s in seeds]
    out = {}
    for s in settings:
        imgs = generate(s.pipe or pipe, flat_prompts, flat_seeds, guidance_scale=s.guidance_scale,
                        num_inference_steps=num_inference_steps, negative=s.negative, batch_size=batch_size,
                        **s.kwargs)
        out[s.name] = imgs.reshape(len(prompts), len(seeds), *imgs.shape[1:])
    return out


def save_grid(
    images: Tensor,
    path: str | Path,
    *,
    row_labels: Sequence[str] = (),
    col_labels: Sequence[str] = (),
    title: str | None = None,
    scale: int = 3,
    pad: int = 2,
) -> Path:
    """Save ``[R, C, 3, H, W]`` images in [0, 1] as one labelled PNG (nearest-neighbour upscaled ``scale``×)."""
    from PIL import Image, ImageDraw

    if images.dim() != 5:
        raise ValueError(f"images must be [rows, cols, 3, H, W]; got {tuple(images.shape)}")
    r, c, _, h, w = images.shape
    h, w = h * scale, w * scale
    label_w = 8 + 6 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    top = (14 if title else 0) + (14 if col_labels else 0)
    canvas = Image.new("RGB", (label_w + c * (w + pad) + pad, top + r * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 1), title, fill="black")
    for j, label in enumerate(col_labels):
        draw.text((label_w + pad + j * (w + pad), top - 13), str(label)[: max(1, w // 6)], fill="black")
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()
    for i in range(r):
        if i < len(row_labels):
            draw.text((3, top + pad + i * (h + pad) + h // 2 - 5), str(row_labels[i]), fill="black")
        for j in range(c):
            tile = Image.fromarray(arr[i, j]).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + j * (w + pad), top + pad + i * (h + pad)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def grid_rows(images: dict[str, Tensor], prompts: Sequence[str] | None = None, *, max_cols: int | None = None,
              label_width: int = 40) -> tuple[Tensor, list[str]]:
    """Stack ``{setting: [P, S, ...]}`` into ``[P·settings, S, ...]`` rows labelled ``"<prompt> | <setting>"`` (the
    prompt cut to ``label_width`` characters; ``p<i>`` only when no prompts are given), as the eval grids are."""
    rows, labels = [], []
    n_prompts = next(iter(images.values())).shape[0]
    if prompts is not None and len(prompts) != n_prompts:
        raise ValueError(f"{len(prompts)} prompts for {n_prompts} rows of images: give one prompt per row")
    for p in range(n_prompts):
        text = f"p{p}" if prompts is None else str(prompts[p])
        text = text if len(text) <= label_width else text[:label_width - 3] + "..."
        for name, imgs in images.items():
            rows.append(imgs[p, :max_cols] if max_cols else imgs[p])
            labels.append(f"{text} | {name}")
    return torch.stack(rows), labels


# ------------------------------------------------------------------------------------------------ loading

INFO_FILE = "mmalign_diffusion.json"  # written by the diffusion recipes' save_pretrained


def base_pipeline_dir(path: str | Path) -> Path:
    """The base pipeline of a model directory: a trained run's ``final/`` (its ``base_pipeline/`` for tiny
    bases, else the ``base`` it records) or a diffusers pipeline directory itself."""
    import json

    path = Path(path)
    info_file = path / INFO_FILE
    if info_file.is_file():
        if (path / "base_pipeline" / "model_index.json").is_file():
            return path / "base_pipeline"
        base = json.loads(info_file.read_text()).get("base")
        if base and base != "tiny" and Path(base).is_dir():
            return Path(base)
        raise FileNotFoundError(f"{info_file} names base {base!r}, which is not a local pipeline directory; pass "
                                "the base pipeline explicitly (--base / base=)")
    if (path / "model_index.json").is_file():
        return path
    raise FileNotFoundError(
        f"{str(path)!r} is neither a trained mmalign diffusion model (no {INFO_FILE}) nor a diffusers pipeline "
        "directory (no model_index.json); pass <output_dir>/final of a diffusion run or a pipeline directory")


def load_denoiser(path: str | Path, components) -> nn.Module:
    """The denoiser a model directory holds, on top of ``components`` (its base, not modified).

    A pipeline directory (or a run saved with full weights) loads with ``from_pretrained``; a LoRA run
    (``pytorch_lora_weights.safetensors``) is loaded into a copy of the base denoiser with the pipeline's
    ``load_lora_weights``, as a user would.
    """
    import copy
    import json

    path = Path(path)
    sub = "transformer" if components.kind == "sd3" else "unet"
    cls = type(components.denoiser)
    dtype = components.dtype
    info_file = path / INFO_FILE
    if not info_file.is_file():
        if (path / sub).is_dir():
            return cls.from_pretrained(path, subfolder=sub, torch_dtype=dtype).eval()
        raise FileNotFoundError(f"{str(path)!r} has no {sub}/ subfolder and no {INFO_FILE}")
    info = json.loads(info_file.read_text())
    if info.get("kind") not in (None, components.kind):
        raise ValueError(f"{info_file}: model kind {info.get('kind')!r} does not match the base ({components.kind!r})")
    if info.get("format") == "lora":
        pipe = components.pipeline(copy.deepcopy(components.denoiser))
        pipe.load_lora_weights(str(path))
        return getattr(pipe, sub).eval()
    return cls.from_pretrained(path, subfolder=sub, torch_dtype=dtype).eval()


def load_components(path: str | Path, *, dtype: str = "float32"):
    """:class:`~mmalign.models.diffusion.DiffusionComponents` of a model directory's base pipeline (pixel-space
    tiny pipelines included: ``load_diffusion_components`` reads both). A trained run's ``final/`` also carries
    the scheduler it was trained with (``scheduler/``: zero terminal SNR, a prediction-type override), which
    replaces the base pipeline's."""
    from ..models.diffusion import load_diffusion_components

    comps = load_diffusion_components(base_pipeline_dir(path), dtype=dtype)
    trained = Path(path) / "scheduler"
    if (Path(path) / INFO_FILE).is_file() and (trained / "scheduler_config.json").is_file():
        comps.scheduler = type(comps.scheduler).from_pretrained(str(trained))
    return comps


def npo_offset_from(path: str | Path, components) -> dict[str, Tensor]:
    """δ = θ_npo − θ_base from an offset directory (``npo_offset.safetensors``) or an NPO model directory
    (Diffusion-NPO or Self-NPO run, full weights or LoRA)."""
    from ..models import npo_weights as npo

    path = Path(path)
    if (path / npo.OFFSET_FILE).is_file() or path.suffix == ".safetensors":
        return npo.load_offset(path)
    return npo.weight_offset(load_denoiser(path, components), components.denoiser)
