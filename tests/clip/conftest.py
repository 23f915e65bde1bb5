"""Shared fixtures of the CLIP tests: a tiny open_clip bundle, the shipped assets, small synthetic pair sets."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets" / "clip"


@pytest.fixture(scope="session")
def tiny_bundle():
    from mmalign.models.clip import load_clip

    return load_clip("tiny", seed=0)


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory) -> Path:
    """24 synthetic images with 4 captions each, as ``pairs.jsonl`` + ``images/``."""
    from mmalign.data.synthetic_images import write_pairs

    out = tmp_path_factory.mktemp("pairs")
    write_pairs(out, 24, seed=0)
    return out
