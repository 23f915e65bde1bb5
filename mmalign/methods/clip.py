"""The CLIP task (``modality: clip``): the generic :class:`~mmalign.methods.preference.PreferenceTask` over the
dual-encoder family (:class:`~mmalign.adapters.contrastive_family.DualEncoderFamily`), with the recipes' per-step
work as :class:`~mmalign.methods.task.Task` hooks.

The losses are the contrastive rows of :data:`~mmalign.methods.table.METHODS` (``clip``, ``siglip``,
``clip_refine``, ``zscl``; compositions in :mod:`mmalign.methods.clip_losses`); building, data, scores (with the
frozen teacher's features for CLIP-Refine and ZSCL), the RaFA stream, ZSCL's L2 term and saving are the family's.
What this task adds is the work that is not a loss:

- :meth:`ClipTask.after_step`: the logit-scale clamp to ≤ ln 100 (open_clip's training loop) and ZSCL's weight
  ensemble (``clip.weight_average``: ``sma`` or ``wise``, every ``clip.average_every`` steps);
- :meth:`ClipTask.save_pretrained`: the weight average (ZSCL saves ``we_model``), then WiSE-FT with the initial
  weights (``clip.final_wise_alpha``), written by the family (LoRA merged);
- :meth:`ClipTask.state_dict` / :meth:`ClipTask.load_state_dict`: the average, its count and the RaFA stream, so a
  resumed run continues both exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..adapters.contrastive import MAX_LOGIT_SCALE
from ..adapters.contrastive_family import DualEncoderFamily
from ..losses import update_weight_average
from ..models.clip import ClipBundle
from ..schema import TrainConfig
from .preference import PreferenceTask

__all__ = ["ClipTask", "DualEncoderFamily"]

log = logging.getLogger(__name__)


class ClipTask(PreferenceTask):
    """Any contrastive METHODS row on a dual encoder, plus weight averaging and the logit-scale clamp (see the module
    docstring). ``bundle``: a prebuilt :class:`~mmalign.models.clip.ClipBundle` (else loaded from the config)."""

    family_cls = DualEncoderFamily
    family: DualEncoderFamily

    def __init__(self, cfg: TrainConfig, *, bundle: ClipBundle | None = None):
        super().__init__(cfg, bundle=bundle)
        self._avg: dict[str, torch.Tensor] | None = None  # the running weight average (trainable parameters)
        self._avg_count = 0
        if cfg.clip.weight_average != "none":
            self._avg = {n: p.detach().float().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    @property
    def bundle(self) -> ClipBundle:
        return self.family.bundle

    @property
    def teacher(self):
        return self.family.teacher

    @property
    def normalize(self) -> bool:
        """Whether the current stage's loss trains on unit-norm features."""
        return self.family.normalize(self.method)

    # -- per-step work -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (1-based): clamp logit_scale to [0, ln 100] as open_clip's training loop,
        and update ZSCL's weight ensemble every ``average_every`` steps (at steps 1, 1 + k, ...: ZSCL updates at
        iteration 0, avg_freq, ... after the optimizer step)."""
        self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        c = self.cfg.clip
        if self._avg is None or (step - 1) % c.average_every:
            return
        current = {n: p.detach() for n, p in self.model.named_parameters() if n in self._avg}
        dev = next(iter(current.values())).device
        self._avg = {k: v.to(dev) for k, v in self._avg.items()}
        anchor = self.family.initial_params(dev) if c.weight_average == "wise" else None
        self._avg_count += 1
        self._avg = update_weight_average(self._avg, current, self._avg_count, anchor=anchor,
                                          wise_alpha=c.wise_alpha)

    # -- the saved weights -------------------------------------------------------------------------------------
    def final_state_dict(self, model: nn.Module, current: dict | None = None) -> dict[str, torch.Tensor]:
        """What ``save_pretrained`` writes: the weight average when one is kept (ZSCL saves ``we_model``), then
        WiSE-FT with the initial weights when ``clip.final_wise_alpha`` < 1. ``current``: the model's weights
        gathered from a sharded run (default: its own ``state_dict()``)."""
        model = getattr(model, "module", model)
        state = {k: v.detach().clone() for k, v in (model.state_dict() if current is None else current).items()}
        if self._avg is not None and self._avg_count:
            state.update({k: v.to(state[k].dtype) for k, v in self._avg.items()})
        alpha = self.cfg.clip.final_wise_alpha
        if alpha < 1.0:
            init = self.family.initial_params(next(model.parameters()).device)
            for k, v in init.items():
                state[k] = (alpha * state[k].float() + (1 - alpha) * v.float()).to(state[k].dtype)
        return state

    def save_pretrained(self, model: nn.Module, path: Path, state_dict: dict | None = None) -> None:
        if self._avg is not None and self._avg_count == 0:
            log.warning("clip.weight_average=%s but no average was taken (after_step never ran, or the run was "
                        "shorter than one update): saving the current weights", self.cfg.clip.weight_average)
        self.family.save(model, path, state_dict=self.final_state_dict(model, state_dict), method=self.method)

    # -- resumable state of the averaging and RaFA streams -----------------------------------------------------
    def state_dict(self) -> dict:
        gen = self.family.generator
        return {"avg": self._avg, "avg_count": self._avg_count, "generator": None if gen is None else gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._avg, self._avg_count = state.get("avg", self._avg), int(state.get("avg_count", 0))
        if state.get("generator") is not None:
            self.family.rafa_generator(next(self.model.parameters()).device).set_state(state["generator"])
