"""Demos: tiny models, synthetic data, a measured effect (``mmalign demo NAME --out DIR``).

Every demo is ``run(out_dir) -> report`` and writes ``report.json`` (method, metric, before, after,
higher_is_better, ...), ``report.md`` and PNGs into ``out_dir``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

# name -> "module:function"; imported lazily so that one demo never imports another's dependencies.
DEMOS: dict[str, str] = {
    "text": "mmalign.demos.text:run",
    "losses": "mmalign.demos.loss_showcase:run",
    "diffusion": "mmalign.demos.diffusion:run",
    "clip": "mmalign.demos.clip:run",
    "prior": "mmalign.demos.prior:run",
    "seq_contrastive": "mmalign.demos.seq_contrastive:run",
    "curriculum": "mmalign.demos.curriculum:run",
    "token_guidance": "mmalign.demos.token_guidance:run",
    "tdpo": "mmalign.demos.token_dpo:run",
    "online_dpo": "mmalign.demos.online_dpo:run",
}


def get_demo(name: str) -> Callable[..., dict]:
    """The ``run`` function of demo ``name``; unknown names list the valid ones."""
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; valid: {sorted(DEMOS)}")
    module, _, fn = DEMOS[name].partition(":")
    return getattr(importlib.import_module(module), fn)
