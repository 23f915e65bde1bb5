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

# name -> (what it shows, measured effect over seeds 0-2 of --full as mean ± std, or None where not measured here,
# wall seconds of the fast default (3 seeds, one process), wall seconds of one full seed or None). Measured
# 2026-12-03 on a 2-core CPU, one thread, under requirements.lock; per-seed values: the README's "Demo figures".
SUMMARY: dict[str, tuple[str, str | None, float, float | None]] = {
    "text": ("SFT then DPO of a tiny Llama on warm-colour lists; mean reward of samples",
             "0.486 ± 0.016 → 0.797 ± 0.156", 18, 15),
    "seq_contrastive": ("contrastive training with self-made negatives; held-out ranking accuracy",
                        "0.310 ± 0.018 → 0.491 ± 0.024 (more MLE: 0.410 ± 0.081)", 24, 18),
    "curriculum": ("auto pairs from weak/sft/strong models, easy→hard DPO vs shuffled mix; reward",
                   "weak 0.455 ± 0.011 → curriculum 0.332 ± 0.344, mix 0.413 ± 0.365 (no effect)", 22, 20),
    "token_guidance": ("learned token-level reward guides the LM (Yang et al. 2023); reward",
                       "0.486 ± 0.016 → 0.668 ± 0.170", 18, 15),
    "tdpo": ("DPO vs TDPO2 from one SFT model; reward at equal KL",
             "DPO 0.670 ± 0.280 vs TDPO2 0.929 ± 0.015", 20, 16),
    "online_dpo": ("online DPO (and XPO) judged by the programmatic reward; reward",
                   "0.486 ± 0.016 → 0.911 ± 0.009", 20, 21),
    "diffusion": ("tiny pixel UNet: Diffusion-DPO, Diffusion-NPO, Self-NPO, NPO-CFG; image reward",
                  "0.803 ± 0.062 → 0.821 ± 0.038 (2 of 3 seeds)", 16, 230),
    "clip": ("tiny CLIP post-pre-trained with CLIP-Refine; modality gap (lower is better)",
             "0.840 ± 0.076 → 0.648 ± 0.110", 25, 22),
    "prior": ("PRIOR token weighting vs plain NTP in a tiny LVLM; accuracy on image tokens",
              "0.426 ± 0.085 → 0.669 ± 0.026", 17, 10),
    "temple": ("TEMPLE pairs and Pre-SFT DPO curriculum on a tiny video LLM; order-question accuracy", None, 55, None),
    "v2a": ("AVP-RPO on a toy video-to-audio generator; AV-sync error in ms (lower is better)", None, 79, None),
    "losses": ("every DPO loss_type and f-divergence vs the margin (deterministic: run once)", None, 2, 2),
}


def get_demo(name: str) -> Callable[..., dict]:
    """The ``run`` function of demo ``name``; unknown names list the valid ones."""
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; valid: {sorted(DEMOS)}")
    return resolve(DEMOS[name])
