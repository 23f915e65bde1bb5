"""Demos: tiny models, synthetic data, a measured effect (``mmalign demo NAME --out DIR``).

Every demo is ``run(out_dir) -> report`` and writes ``report.json`` (method, metric, before, after,
higher_is_better, ...), ``report.md`` and PNGs into ``out_dir``. Which demos exist is the registry's business:
each family's row lists its own (:data:`mmalign.registry.MODALITIES`), plus :data:`mmalign.registry.DEMOS` for
those of no family.
"""

from __future__ import annotations

from collections.abc import Callable

from ..registry import all_demos, resolve

# name -> "module:function"; imported lazily so that one demo never imports another's dependencies.
DEMOS: dict[str, str] = all_demos()


def get_demo(name: str) -> Callable[..., dict]:
    """The ``run`` function of demo ``name``; unknown names list the valid ones."""
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; valid: {sorted(DEMOS)}")
    return resolve(DEMOS[name])
