"""Demos: tiny models, synthetic data, a measured effect (``mmalign demo NAME --out DIR [--seeds N] [--full]``).

Every demo is a single-seed ``run(out_dir, *, seed=0, ...) -> report`` that writes ``report.json`` (method, metric,
before, after, higher_is_better, ...), ``report.md`` and PNGs into ``out_dir``, and declares ``SEEDS``
(:class:`mmalign.demos.seeds.SeedSpec`: its fast and full settings, the fields to aggregate); ``mmalign demo`` runs
it over seeds 0..N-1 through :func:`mmalign.demos.seeds.run_seeds` (mean, spread, per-seed values). Which demos
exist is the registry's business: each family's row lists its own (:data:`mmalign.registry.MODALITIES`), plus
:data:`mmalign.registry.DEMOS` for those of no family; :data:`SUMMARY` holds the line ``mmalign demo --help`` prints
for each (kept here, without importing the demo modules, so that ``--help`` stays fast).
"""

from __future__ import annotations

from collections.abc import Callable

from ..registry import all_demos, resolve

# name -> "module:function"; imported lazily so that one demo never imports another's dependencies.
DEMOS: dict[str, str] = all_demos()

# name -> (what it shows, measured wall seconds of the fast default (3 seeds), of one full seed); 2-core CPU,
# one thread. The effects and their spreads over seeds are in the README ("Demo figures").
SUMMARY: dict[str, tuple[str, float, float]] = {
    "text": ("SFT then DPO of a tiny Llama on warm-colour lists; mean reward of samples", 0, 15),
    "seq_contrastive": ("contrastive training with self-made negatives vs more MLE; held-out ranking accuracy", 0, 21),
    "curriculum": ("auto pairs from weak/sft/strong models, easy→hard DPO vs shuffled mix; reward", 0, 32),
    "token_guidance": ("learned token-level reward guides the LM (Yang et al. 2023); reward", 0, 15),
    "tdpo": ("DPO vs TDPO2 from one SFT model: reward at equal KL", 0, 16),
    "online_dpo": ("online DPO (and XPO) judged by the programmatic reward; reward", 0, 21),
    "diffusion": ("tiny pixel UNet: Diffusion-DPO, Diffusion-NPO, Self-NPO, NPO-CFG; image reward", 0, 262),
    "clip": ("tiny CLIP post-pre-trained with CLIP-Refine; modality gap (lower is better)", 0, 27),
    "prior": ("PRIOR token weighting vs plain NTP in a tiny LVLM; accuracy on image tokens", 0, 14),
    "losses": ("every DPO loss_type and f-divergence vs the margin (deterministic, no seeds)", 0, 3),
}


def get_demo(name: str) -> Callable[..., dict]:
    """The ``run`` function of demo ``name``; unknown names list the valid ones."""
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; valid: {sorted(DEMOS)}")
    return resolve(DEMOS[name])
