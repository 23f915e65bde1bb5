"""The ``diffusion:`` section of a run config (used when ``modality: diffusion``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DiffusionConfig:
    """Diffusion-specific settings; filled in by the diffusion recipe."""
