"""The diffusion task: the generic :class:`~mmalign.methods.preference.PreferenceTask` over the diffusion family
(:class:`~mmalign.adapters.diffusion_family.DiffusionFamily`) for ``modality: diffusion``.

Every row of :data:`~mmalign.methods.table.METHODS` the family can feed runs here: Diffusion-DPO with any
``loss_type`` (``dpo``), Diffusion-NPO (``npo_diffusion``), Diffusion-KTO (``kto``), Plackett–Luce over ranked
lists, SFT on the preferred images, and the other sequence-score losses. The family scores a candidate as
``logps = −c·err`` (c = ½ in the original β convention, 1 in the diffusers one), so the user's β (``loss.kwargs.
beta`` in ``diffusion.beta_convention``; default 5000 original / 2500 diffusers) goes straight into the loss.
Recipes with their own task (``loss.name: self_npo``) are picked by :func:`mmalign.api.build_task` from their
METHODS row.
"""

from __future__ import annotations

from ..adapters.diffusion_build import build_components, build_denoiser
from ..adapters.diffusion_family import DEFAULT_BETA, DiffusionFamily
from ..schema import TrainConfig
from .preference import PreferenceTask
from .table import ALIASES, Method, get_method

__all__ = ["ALIASES", "DEFAULT_BETA", "DiffusionFamily", "DiffusionTask", "build_components", "build_denoiser",
           "get_diffusion_method"]


def get_diffusion_method(name: str) -> Method:
    """The METHODS row ``name`` (or an alias) as the diffusion family runs it; ConfigError otherwise."""
    return get_method(name, DiffusionFamily)


class DiffusionTask(PreferenceTask):
    """Any METHODS row on a diffusion / flow-matching generator. ``components``: prebuilt
    ``DiffusionComponents`` (else built from the config)."""

    family_cls = DiffusionFamily

    def __init__(self, cfg: TrainConfig, *, components=None):
        super().__init__(cfg, components=components)

    @property
    def components(self):
        return self.family.components

    @property
    def adapter(self):
        return self.family.adapter
