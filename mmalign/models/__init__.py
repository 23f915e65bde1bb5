"""Model families: loading, saving and building tiny test models (one file per family)."""

from __future__ import annotations


def sub_state_dict(state: dict | None, prefix: str) -> dict | None:
    """The entries of ``state`` under ``prefix`` (e.g. ``"base."``), with the prefix removed; ``None`` stays
    ``None``. Used to hand the gathered weights of a sharded run (see ``mmalign.train.loop.gathered_state_dict``)
    to the submodule that writes them."""
    if state is None or not prefix:
        return state
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
