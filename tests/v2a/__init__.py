"""Video-to-audio tests: tiny random generators (diffusers' LongCat audio DiT, MMAudio VAE/vocoder), synthetic
flashing-square videos with their tone bursts (mmalign.data.synthetic_v2a), written once per session."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TINY_V2A = {"latent": "mel", "sample_rate": 8000, "duration": 1.0, "fps": 8.0, "frame_size": 8,
            "mel": {"n_fft": 256, "hop_length": 64, "win_length": 256, "n_mels": 16, "f_max": 4000.0}, "steps": 4}


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_config(out_dir: Path, train: Path, **sections: Any) -> dict:
    """A 2-step tiny flow-DPO run (full fine-tune, frozen-copy reference); sections override."""
    base = {
        "modality": "v2a",
        "model": {"name_or_path": "tiny", "tiny": {"hidden": 16, "layers": 1, "heads": 2, "cond_dim": 16}},
        "data": {"train": [str(train)]},
        "loss": {"name": "dpo"},
        "reference": {"strategy": "copy"},
        "optim": {"lr": 1e-3, "scheduler": "constant"},
        "v2a": TINY_V2A,
        "run": {"output_dir": str(out_dir), "max_steps": 2, "batch_size": 2, "report_to": ["jsonl"],
                "progress": False, "resume": "never"},
    }
    return merge(base, sections)
