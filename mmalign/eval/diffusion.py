"""Diffusion evaluation against a base: mean image reward, win-rate over seeds and a labelled PNG grid
(``mmalign eval diffusion``, the mid-run validation images of ``run.eval_prompts``, the diffusion demo's numbers).

Every (prompt, seed) is sampled once by the model and once by the reference (base) with the same initial noise
(:func:`mmalign.sample.diffusion.generate` seeds each image on its own), so the two images of a pair differ
only by the weights; the win-rate compares their rewards (:mod:`mmalign.eval.paired`: ties count ½). Image
rewards take ``(images [N, 3, H, W] in [0, 1], prompts) -> [N]``: :data:`IMAGE_REWARDS` by name
(``shapes``: the caption-colour agreement of :func:`mmalign.data.shapes.reward`, for the synthetic shapes
captions) or any ``"package.module:function"`` of that signature (a CLIP, PickScore or aesthetic scorer).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..sample import diffusion as SD
from .paired import seed_summary, wins

__all__ = ["IMAGE_REWARDS", "compare_diffusion", "load_image_reward", "save_comparison_grid", "sample_images"]

ImageReward = Callable[[Tensor, list[str]], Tensor]
IMAGE_REWARDS: dict[str, str] = {"shapes": "mmalign.data.shapes:reward"}
_KEYS = ("reward", "reward_reference", "win_rate")


def load_image_reward(spec: str) -> ImageReward:
    """An :data:`IMAGE_REWARDS` name or ``"package.module:function"``; returns a function that checks its output
    (one finite number per image)."""
    target = IMAGE_REWARDS.get(spec, spec)
    module, _, name = target.partition(":")
    if not module or not name:
        raise ConfigError(f"image reward {spec!r} is neither one of {sorted(IMAGE_REWARDS)} nor "
                          "'package.module:function' taking (images [N, 3, H, W] in [0, 1], prompts)")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"image reward {spec!r} cannot be imported ({err}); fix: make the module importable "
                          "(on PYTHONPATH) and check the function name") from None

    def call(images: Tensor, prompts: list[str]) -> Tensor:
        out = torch.as_tensor(fn(images, list(prompts)), dtype=torch.float32).flatten().cpu()
        if out.numel() != len(images) or not bool(torch.isfinite(out).all()):
            raise ValueError(f"the image reward {spec!r} must return one finite number per image; got "
                             f"{out.tolist()!r:.200} for {len(images)} images")
        return out

    return call


def sample_images(pipe, prompts: Sequence[str], seeds: Sequence[int], *, guidance_scale: float = 5.0,
                  steps: int = 25, batch_size: int = 32, context: AbstractContextManager | None = None,
                  **kwargs: Any) -> Tensor:
    """``[P, S, 3, H, W]``: one image per prompt and seed (the same seeds for every model), inside ``context``
    (e.g. a PEFT denoiser's ``disable_adapter()``: the base as the reference without a second copy)."""
    with context or nullcontext():
        got = SD.sample_settings(pipe, [SD.Setting("model", guidance_scale, kwargs=kwargs)], list(prompts),
                                 list(seeds), num_inference_steps=steps, batch_size=batch_size)
    return got["model"]


def compare_diffusion(images: Tensor, prompts: Sequence[str], seeds: Sequence[int], *,
                      reference_images: Tensor | None = None, reward_fn: ImageReward | None = None) -> dict:
    """Rewards of ``images`` ``[P, S, 3, H, W]`` (and of ``reference_images``, paired by prompt and seed):
    ``{reward, reward_reference, win_rate (each with _std over seeds), n_images, per_seed, rewards}``. Without
    ``reward_fn`` only the counts are returned."""
    n_p, n_s = len(prompts), len(seeds)
    if tuple(images.shape[:2]) != (n_p, n_s):
        raise ValueError(f"images {tuple(images.shape)} must be [prompts={n_p}, seeds={n_s}, 3, H, W]")
    out: dict[str, Any] = {"n_images": n_p * n_s}
    if reward_fn is None:
        return out
    flat_prompts = [p for p in prompts for _ in seeds]
    r_pol = reward_fn(images.flatten(0, 1), flat_prompts).view(n_p, n_s)
    r_ref = None if reference_images is None else reward_fn(reference_images.flatten(0, 1), flat_prompts).view(n_p,
                                                                                                             n_s)
    per_seed = []
    for j, seed in enumerate(seeds):
        row: dict[str, Any] = {"seed": seed, "reward": float(r_pol[:, j].mean())}
        if r_ref is not None:
            row["reward_reference"] = float(r_ref[:, j].mean())
            w = wins(r_pol[:, j], r_ref[:, j])
            row["win_rate"] = sum(w) / len(w)
        per_seed.append(row)
    out.update(seed_summary(per_seed, _KEYS))
    out["per_seed"] = per_seed
    out["rewards"] = {"model": r_pol.tolist(), **({"reference": r_ref.tolist()} if r_ref is not None else {})}
    return out


def _label(prompt: str, width: int = 36) -> str:
    return prompt if len(prompt) <= width else prompt[:width - 1] + "…"


def save_comparison_grid(images: dict[str, Tensor], prompts: Sequence[str], seeds: Sequence[int], path: str | Path,
                         *, title: str | None = None, rewards: dict[str, list[list[float]]] | None = None,
                         max_prompts: int = 16, scale: int | None = None) -> Path:
    """One PNG: for each prompt a row per model (``{name: [P, S, 3, H, W]}`` in order), labelled
    ``"<prompt> | <name>"`` (with the row's mean reward when ``rewards`` has it), one column per seed."""
    rows, labels = [], []
    for p, prompt in enumerate(list(prompts)[:max_prompts]):
        for name, imgs in images.items():
            rows.append(imgs[p])
            mean = (f" r={sum(rewards[name][p]) / len(rewards[name][p]):.3f}"
                    if rewards and name in rewards else "")
            labels.append(f"{_label(prompt)} | {name}{mean}")
    side = int(next(iter(images.values())).shape[-1])
    scale = scale or max(1, math.ceil(64 / side))  # tiny 16 px images are shown 4× so that they can be seen
    return SD.save_grid(torch.stack(rows), path, row_labels=labels, col_labels=[f"seed {s}" for s in seeds],
                        title=title, scale=scale)
