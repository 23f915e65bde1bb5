"""Diffusion recipe tests: tiny random components (latents 4×8×8), the synthetic assets in assets/diffusion.

Shared helpers live here (one torch thread is pinned for every test by tests/conftest.py).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets" / "diffusion"


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_config(out_dir: Path, **sections: Any) -> dict:
    """A 2-step tiny Diffusion-DPO run on the asset pairs (LoRA + adapter reference); sections override."""
    base = {
        "modality": "diffusion",
        "model": {"name_or_path": "tiny"},
        "lora": {"enabled": True, "r": 4, "alpha": 4},
        "data": {"train": [str(ASSETS / "pairs.jsonl")]},
        "loss": {"name": "dpo", "kwargs": {"beta": 5000}},
        "reference": {"strategy": "adapter"},
        "optim": {"lr": 1e-3, "scheduler": "constant"},
        "diffusion": {"resolution": 16},
        "run": {"output_dir": str(out_dir), "max_steps": 2, "batch_size": 2, "report_to": ["jsonl"],
                "progress": False, "resume": "never"},
    }
    return merge(base, sections)


def perturbed(model, seed: int, scale: float):
    """A deep copy of ``model`` with seeded Gaussian noise of std ``scale`` added to every parameter."""
    import torch

    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out
