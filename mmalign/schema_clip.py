"""The ``clip:`` and ``prior:`` sections of a run config (``modality: clip`` / ``modality: prior``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ClipConfig:
    """Contrastive (CLIP/SigLIP) post-pre-training settings; filled in by the CLIP recipe."""


@dataclass
class PriorConfig:
    """PRIOR token-reweighting settings; filled in by the PRIOR recipe."""
