"""Shared fixtures of the audio-visual (SF-CAVP-style) tests: synthetic flash/tone videos and a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def av_rows(tmp_path_factory) -> Path:
    """8 synthetic 3 s videos (16 fps, 32 px) with matching tone bursts; every 4th carries its own audio stream."""
    from mmalign.data.synthetic_av import write_synthetic_av

    return write_synthetic_av(tmp_path_factory.mktemp("av"), 8, seed=0, mux_every=4)


@pytest.fixture(scope="session")
def tiny_model():
    from mmalign.models.cavp import build_sf_cavp

    return build_sf_cavp(seed=0)


def base_overrides(rows: Path, out: Path, *extra: str) -> list[str]:
    return ["modality=av", "model.name_or_path=tiny", "loss.name=cavp", f"data.train=[{rows}]",
            f"run.output_dir={out}", "run.resume=never", "run.report_to=[jsonl]", "run.progress=false",
            "run.batch_size=4", "optim.lr=2e-3", "optim.scheduler=constant", *extra]
