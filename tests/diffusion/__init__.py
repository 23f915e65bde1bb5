"""Diffusion recipe tests: tiny random components (latents 4×8×8), the synthetic assets in assets/diffusion.

Shared helpers live here. ``single_thread`` pins torch to one thread for a test module: on the 2 shared CPU
cores of CI a tiny UNet step is ~50× slower with 2 spinning OpenMP threads than with one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets" / "diffusion"


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
