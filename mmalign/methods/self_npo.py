"""Self-NPO (Wang et al., arXiv 2505.11777, AAAI 2026): data-free negative preference optimisation by
*truncated diffusion fine-tuning* (TDFT), trained through the one loop as :class:`SelfNPOTask`.

The model's own imperfect samples are implicitly low-reward; fine-tuning on them yields a negative model that is
correlated with the base (so CFG's variance does not blow up) and is used as θ_neg in NPO-guided CFG
(:mod:`mmalign.models.npo_weights`, :mod:`mmalign.sample.diffusion`). One training step, per sample:

1. **Truncated rollout** (teacher, no grad): K solver steps (DDIM, η = 0) on an N-step grid of the training
   timesteps, ``x_{t_0} → … → x_{t_K}``; the target is the teacher's x0 estimate at the stopping point,
   ``x̂0 = E[x0 | x_{t_K}]``.
2. **Re-noise forward** to a higher level s ~ U{t_K + 1, …, T − 1} (x̂0 itself is a blurred average, so it is
   not re-noised; the state x_{t_K} is)::

       x_s = (α_s/α_t)·x_t + sqrt(σ_s² − σ_t²·α_s²/α_t²)·ε          (α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t))

   which gives x_s the teacher's noised marginal at level s (:func:`mmalign.methods.tdft.renoise`).
3. **x0 regression**: the student's x0 prediction at (x_s, s, c) regresses x̂0 with
   :func:`mmalign.losses.self_npo_regression` (pseudo-Huber, c = 1e-3, as in the released code).

The model-free math of steps 1–2 (noise levels, x0/ε conversion, the rollout, re-noising) is in
:mod:`mmalign.methods.tdft`; this module is the task around it.

Paper vs released code (research/diffusion.md §4; the paper was read through a digest, so the paper column
is **unverified** beyond what the digest states). Defaults follow the paper; the code's choices are options
(``loss.kwargs``):

=====================  =====================================  ==============================================
                       paper (default here)                   released ``Self-NPO/train.py`` (option)
=====================  =====================================  ==============================================
rollout start          pure noise x_T (``start: noise``)       a dataset image noised to a random grid index
                                                              i ∈ {0..N−1} (``start: data``; needs images)
teacher                the frozen reference (base) model       an EMA copy of the student, rate 0.999
                       (``teacher: frozen``)                  (``teacher: ema``, ``ema_decay``)
teacher guidance       not stated: unguided conditional        ε_c + w(ε_c − ε_u), w = −1 (SD1.5: pure
                       prediction (``teacher_guidance: 0``)    unconditional), w = −5 (SDXL)
grid / K               K = 5                                   25-step DDIM grid (stride 40), K = 5
regression loss        "standard diffusion loss"               pseudo-Huber c = 1e-3 (launcher; argparse l2)
=====================  =====================================  ==============================================

Both variants: samples whose rollout reaches t < 0 (only possible with ``start: data``) are clean, and then
the target is the clean sample itself (the code masks such samples out of further steps). With
``start: noise`` the student only sees levels above t_K (the top K/N of the trajectory); the grid size N sets
how deep that reaches. ε-, v-, x0- ("sample") and flow-matching (x_t = (1 − σ)x0 + σε, α = 1 − σ) models are
supported; the released code assumes ε-prediction for the student's x0 conversion. An ε-model with zero terminal
SNR (α_T = 0) has no x0 estimate at t = T, which the task rejects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..adapters.diffusion_family import DiffusionFamily
from ..config import ConfigError
from ..types import Scores
from .diffusion import DiffusionTask
from .task import StageData

# NoiseLevels is unused here but re-exported: the TDFT math lived in this module first and is still imported from it.
from .tdft import NoiseLevels as NoiseLevels
from .tdft import (
    SeedRange,
    SelfNPOBatch,
    ddim_grid,
    higher_levels,
    noise_levels,
    read_prompts,
    renoise,
    to_x0_eps,
    truncated_rollout,
)

# ------------------------------------------------------------------------------------------------ the task

_START = ("noise", "data")
_TEACHERS = ("frozen", "ema")


@dataclass
class SelfNPOOptions:
    """``loss.kwargs`` of a Self-NPO run (``modality: diffusion``, ``loss.name: self_npo``).

    Attributes:
        k_steps: K, truncated teacher solver steps (paper and code: 5).
        grid_steps: N, the DDIM grid the steps walk on (code: 25, stride T/N).
        start: ``noise`` (paper: from x_T) or ``data`` (code: a ``data.train`` image noised to a random grid index).
        teacher: ``frozen`` (the reference model; with LoRA the base with the adapter disabled) or ``ema``
            (code: an EMA of the student, updated after every optimizer step).
        ema_decay: EMA rate of the ``ema`` teacher (code: 0.999).
        teacher_guidance: w of the teacher's ``ε_c + w(ε_c − ε_u)``; 0 = conditional (default), −1 = purely
            unconditional (code, SD1.5), −5 (code, SDXL). ``ε_u`` uses the empty prompt's embedding (the SDXL
            code uses all-zero embeddings instead).
        loss, huber_c: the regression (:func:`mmalign.losses.self_npo_regression`).
        prompts: conditioning captions for ``start: noise``; default: the captions of ``data.train`` if given,
            else the empty prompt only. ``prompts_file``: a text file, one prompt per line.
        empty_prompt_prob: probability that a sample's prompt is replaced by "" (trains the unconditional
            branch, the one NPO-CFG evaluates the negative model on).
        num_samples: length of the data-free "dataset" (seed indices); only sets what an epoch means.

    The image size is ``diffusion.resolution``; model, LoRA and dtype come from the usual sections.
    """

    k_steps: int = 5
    grid_steps: int = 25
    start: str = "noise"
    teacher: str = "frozen"
    ema_decay: float = 0.999
    teacher_guidance: float = 0.0
    loss: str = "pseudo_huber"
    huber_c: float = 1e-3
    prompts: list[str] | None = None
    prompts_file: str | None = None
    empty_prompt_prob: float = 0.0
    num_samples: int = 1000

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> SelfNPOOptions:
        from dataclasses import fields

        names = {f.name for f in fields(cls)}
        errors = [f"loss.kwargs.{k} is not a Self-NPO option; valid: {sorted(names)}" for k in kwargs if k not in names]
        opts = cls(**{k: v for k, v in kwargs.items() if k in names})
        if opts.k_steps < 1:
            errors.append(f"loss.kwargs.k_steps={opts.k_steps} must be >= 1")
        if not 1 <= opts.grid_steps <= 1000:
            errors.append(f"loss.kwargs.grid_steps={opts.grid_steps} must lie in [1, 1000]")
        if opts.start not in _START:
            errors.append(f"loss.kwargs.start={opts.start!r} must be one of {list(_START)}")
        if opts.teacher not in _TEACHERS:
            errors.append(f"loss.kwargs.teacher={opts.teacher!r} must be one of {list(_TEACHERS)}")
        if not 0.0 <= opts.ema_decay < 1.0:
            errors.append(f"loss.kwargs.ema_decay={opts.ema_decay} must lie in [0, 1)")
        if opts.loss not in ("pseudo_huber", "l2"):
            errors.append(f"loss.kwargs.loss={opts.loss!r} must be one of ['l2', 'pseudo_huber']")
        if not 0.0 <= opts.empty_prompt_prob <= 1.0:
            errors.append(f"loss.kwargs.empty_prompt_prob={opts.empty_prompt_prob} must lie in [0, 1]")
        if opts.num_samples < 1:
            errors.append(f"loss.kwargs.num_samples={opts.num_samples} must be >= 1")
        if errors:
            raise ConfigError(errors)
        return opts


class SelfNPOTask(DiffusionTask):
    """Self-NPO (``modality: diffusion``, ``loss.name: self_npo``): the generic task over the diffusion family
    (components, denoiser with or without LoRA, the run's save layout) plus hooks: data-free :meth:`stage_data`,
    :meth:`score` (teacher rollout, re-noising, student x0), :meth:`loss`, :meth:`after_step` and
    :meth:`state_dict` (the EMA teacher).

    The teacher is the task's own (the row needs no reference: the teacher runs *before* the student, on states
    the student then sees): a frozen copy of the initial denoiser, the denoiser with its LoRA adapter disabled
    (no copy), or an EMA copy updated after every optimizer step and checkpointed, so resumed runs are exact.
    Each example's draws (x_T or data noise, re-noising ε, start index, level of s, prompt) come from a generator
    seeded with ``(run seed, index, visit)``: they ride on the batch, whatever the batch size or process count.
    """

    family: DiffusionFamily

    @classmethod
    def check(cls, cfg, uses) -> list[str]:
        errors = [f"stages.{i}.loss: per-stage loss overrides are not supported by self_npo (one loss.kwargs)"
                  for i, s in enumerate(cfg.stages) if s.loss]
        errors += [f"stages.{i}.merge_lora=true is not supported by self_npo (use one stage)"
                   for i, s in enumerate(cfg.stages) if s.merge_lora]
        try:
            SelfNPOOptions.from_kwargs(dict(cfg.loss.kwargs))
        except ConfigError as e:
            errors += e.errors
        return errors

    def __init__(self, cfg, *, components=None):
        import copy

        super().__init__(cfg, components=components)  # checks everything (check above), builds the family once
        self.opts = SelfNPOOptions.from_kwargs(dict(cfg.loss.kwargs))
        self.resolution = cfg.diffusion.resolution
        self.levels = noise_levels(self.components.scheduler)
        self.grid = ddim_grid(self.levels.num_levels, self.opts.grid_steps)
        if self.levels.prediction_type == "epsilon" and float(self.levels.alpha[-1]) == 0.0:
            raise ConfigError(["self_npo: an ε-prediction model with zero terminal SNR (α_T = 0) has no x0 "
                               "estimate at t = T = (x − σε̂)/α; use a v- or x0-prediction model"])
        self.latent_shape = self.components.latent_shape(self.resolution)
        self.prompts = self._prompts()
        self._text: dict[str, tuple[Tensor, Tensor | None]] = {}
        self._lora = _has_lora(self.model)
        self._teacher = None
        if self.opts.teacher == "ema" or not self._lora:
            self._teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self._image_data = None

    # -- data -------------------------------------------------------------------------------------------------
    def _prompts(self) -> list[str]:
        if self.opts.prompts:
            return [str(p) for p in self.opts.prompts]
        if self.opts.prompts_file:
            return read_prompts(self.opts.prompts_file)
        if self.cfg.data.train and self.opts.start == "noise":
            from ..data.image import load_image_records

            records, _ = load_image_records(self.cfg.data.train, skip_bad_rows=self.cfg.data.skip_bad_rows)
            return sorted({r.caption for r in records}) or [""]
        return [""]

    def stage_data(self, stage):
        if self.opts.start == "data":
            return self._image_stage_data(stage)
        ds = SeedRange(self.opts.num_samples)
        key = f"self_npo:{self.cfg.run.seed}:{self.opts.num_samples}:{self.prompts!r}"
        return StageData(train=ds, collate=self.collate, stats={"prompts": len(self.prompts)}, key=key)

    def _image_stage_data(self, stage):
        from ..adapters.diffusion import make_noise_sampler
        from ..data.image import ImageDataset, load_image_records

        sources = stage.train or self.cfg.data.train
        if not sources:
            raise ConfigError(["loss.kwargs.start=data (the released code's variant) needs images: set data.train "
                               "to image-caption rows ({caption, image}), or use start=noise (data-free)"])
        records, stats = load_image_records(sources, skip_bad_rows=self.cfg.data.skip_bad_rows)
        self._image_data = ImageDataset(records, resolution=self.resolution, seed=self.cfg.run.seed)
        # The image collate draws DPO-style noise/timesteps too; Self-NPO ignores them and draws its own.
        self._image_data.noise_sampler = make_noise_sampler(self.components, self.resolution, seed=self.cfg.run.seed)
        return StageData(train=self._image_data, collate=self.collate, stats=dict(stats),
                         key=f"self_npo_data:{len(records)}")

    def collate(self, items) -> SelfNPOBatch:
        from ..data.noise import example_seed

        images = None
        if self.opts.start == "data":
            images = self._image_data.collate([ex for ex in items])
            keys = [(ex.index, ex.epoch) for ex in items]
            captions = list(images.captions)
        else:
            keys, captions = list(items), []
        draws: dict[str, list[Tensor]] = {"noise": [], "renoise": [], "start_index": [], "level_u": []}
        for n, (index, epoch) in enumerate(keys):
            g = torch.Generator().manual_seed(example_seed(self.cfg.run.seed + 7, index, epoch))
            draws["noise"].append(torch.randn(self.latent_shape, generator=g))
            draws["renoise"].append(torch.randn(self.latent_shape, generator=g))
            draws["start_index"].append(torch.randint(0, len(self.grid), (), generator=g))
            draws["level_u"].append(torch.rand((), generator=g, dtype=torch.float64))
            prompt = self.prompts[int(torch.randint(0, len(self.prompts), (), generator=g))]
            drop = bool(torch.rand((), generator=g) < self.opts.empty_prompt_prob)
            if self.opts.start == "noise":
                captions.append("" if drop else prompt)
            elif drop:
                captions[n] = ""
        extras = {k: torch.stack(v) for k, v in draws.items()}
        if self.opts.start == "noise":
            extras["start_index"] = torch.zeros_like(extras["start_index"])  # the paper starts at x_T
        r = float(self.resolution)
        extras["time_ids"] = torch.tensor([[r, r, 0.0, 0.0, r, r]] * len(keys))
        return SelfNPOBatch(captions, extras, images, [{"index": i, "epoch": e} for i, e in keys])

    # -- conditioning ---------------------------------------------------------------------------------------------
    def _encode(self, captions: list[str], device) -> tuple[Tensor, Tensor | None]:
        missing = sorted({c for c in captions if c not in self._text})
        if missing:
            embeds, pooled = self.components.encode_prompt(missing)
            for i, cap in enumerate(missing):
                self._text[cap] = (embeds[i].detach().cpu(), None if pooled is None else pooled[i].detach().cpu())
        embeds = torch.stack([self._text[c][0] for c in captions]).to(device)
        pooled = None if self._text[captions[0]][1] is None else torch.stack([self._text[c][1] for c in captions])
        return embeds, None if pooled is None else pooled.to(device)

    # -- teacher ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _ema_update(self, student: nn.Module) -> None:
        d = self.opts.ema_decay
        src = dict(_unwrap(student).named_parameters())
        for name, p in self._teacher.named_parameters():
            p.mul_(d).add_(src[name].detach().to(device=p.device, dtype=p.dtype), alpha=1 - d)

    def _teacher_context(self, model: nn.Module):
        from contextlib import contextmanager, nullcontext

        if self._teacher is not None:
            return nullcontext(self._teacher)
        net = _unwrap(model)

        @contextmanager
        def disabled():
            was = net.training
            net.eval()
            if hasattr(net, "disable_adapter"):  # peft.PeftModel
                with net.disable_adapter():
                    yield net
            else:  # diffusers' PEFT integration
                net.disable_adapters()
                try:
                    yield net
                finally:
                    net.enable_adapters()
            net.train(was)

        return disabled()

    # -- scores and loss ----------------------------------------------------------------------------------------------
    def after_step(self, step: int) -> None:
        """The loop's per-optimizer-step hook: θ_teacher ← d·θ_teacher + (1 − d)·θ (``teacher: ema``)."""
        if self.opts.teacher == "ema":
            self._ema_update(self.model)

    def state_dict(self) -> dict:
        if self.opts.teacher != "ema":
            return {}  # a frozen teacher is rebuilt from the start weights
        return {"teacher": {k: v.detach().cpu().clone() for k, v in self._teacher.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("teacher"):
            self._teacher.load_state_dict(state["teacher"])

    def score(self, model: nn.Module, batch: SelfNPOBatch) -> Scores:
        noise = batch.extras["noise"]
        dev, b = noise.device, batch.batch_size
        self._to_device(dev)
        embeds, pooled = self._encode(batch.captions, dev)
        time_ids = batch.extras["time_ids"].to(dev) if self.components.kind == "sdxl" else None
        w = float(self.opts.teacher_guidance)
        if w:
            u_embeds, u_pooled = self._encode([""] * b, dev)
        start = batch.extras["start_index"]
        if self.opts.start == "data":
            x0 = self.adapter.latents(batch.images)[:, 0].to(dev)
            a, s = self.levels.at(self.grid[start.cpu()], x0)
            x = a * x0 + s * noise.to(x0)
        else:
            x = noise.float()
        pt = self.levels.prediction_type

        def predict(x_in: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            t_in = self.levels.timestep_input(t, dev)
            if w:
                both = self.adapter.predict(
                    teacher, torch.cat([x_in, x_in]), torch.cat([t_in, t_in]), torch.cat([embeds, u_embeds]),
                    None if pooled is None else torch.cat([pooled, u_pooled]),
                    None if time_ids is None else torch.cat([time_ids, time_ids]))
                cond, uncond = both.float().chunk(2)
                out = cond + w * (cond - uncond)
            else:
                out = self.adapter.predict(teacher, x_in, t_in, embeds, pooled, time_ids).float()
            a_t, s_t = self.levels.at(t, x_in)
            return to_x0_eps(out, x_in, a_t, s_t, pt)

        with torch.no_grad(), self._teacher_context(model) as teacher:
            x_end, t_end, target = truncated_rollout(predict, x, start, self.grid, self.levels, self.opts.k_steps)
        s_level = higher_levels(t_end, batch.extras["level_u"], self.levels.num_levels)
        a_t, s_t = self.levels.at(t_end, x_end)
        a_s, s_s = self.levels.at(s_level, x_end)
        x_s = renoise(x_end, a_t, s_t, a_s, s_s, batch.extras["renoise"].to(x_end))
        out = self.adapter.predict(model, x_s, self.levels.timestep_input(s_level, dev), embeds, pooled, time_ids)
        pred_x0, _ = to_x0_eps(out, x_s, a_s, s_s, pt)
        err = (pred_x0.detach() - target).pow(2).flatten(1).mean(1)
        return Scores(logps=-err[:, None], extras={"pred_x0": pred_x0, "target_x0": target,
                                                   "t_end": t_end.float().to(dev), "s": s_level.float().to(dev)})

    def loss(self, policy: Scores, reference: Scores | None, batch: SelfNPOBatch, aux: Scores | None = None):
        from ..losses import LossOutput, self_npo_regression

        out = self_npo_regression(policy.extras["pred_x0"], policy.extras["target_x0"], loss=self.opts.loss,
                                  huber_c=self.opts.huber_c)
        metrics = dict(out.metrics)
        metrics["self_npo/t_end"] = policy.extras["t_end"].mean()
        metrics["self_npo/level_s"] = policy.extras["s"].mean()
        return LossOutput(out.loss, out.per_example, metrics)

    def _to_device(self, device) -> None:
        c = self.components
        for m in [c.vae, *c.text_encoders, self._teacher]:
            if m is not None and next(m.parameters()).device != torch.device(device):
                m.to(device)

    # -- model lifecycle --------------------------------------------------------------------------------------------
    def save_pretrained(self, model: nn.Module, path, state_dict: dict | None = None) -> None:
        """The family's layout (that of every diffusion run), so the sampler and :mod:`mmalign.models.npo_weights`
        read Self-NPO results like any other; ``mmalign_diffusion.json`` records Self-NPO's options."""
        self.family.save(model, path, state_dict=state_dict,
                         info={"method": "self_npo", "self_npo": dict(vars(self.opts))})

    def merge_lora(self) -> None:
        raise NotImplementedError("stage.merge_lora is not supported by self_npo (use one stage)")



def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _has_lora(model: nn.Module) -> bool:
    return hasattr(_unwrap(model), "peft_config")
