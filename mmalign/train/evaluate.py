"""Evaluation during training: the policy's loss and metrics on a stage's eval set (:func:`evaluate`), samples
from fixed prompts and seeds (:class:`Validation`, ``run.eval_prompts``), and :func:`run_evaluation`, which the
loop calls every ``run.eval_every`` steps and at each stage's end: it runs both, logs one record (metrics.jsonl,
TensorBoard, wandb) and prints one line on the console.

Sampling validation, like the peers' (diffusers' training scripts' ``validation_prompts``, TRL's
``LogCompletionsCallback``), per modality (:data:`VALIDATORS`):

- **text**: each seed samples one completion per prompt (× ``samples_per_prompt``) from the policy and, where
  the run has a generative reference (``copy``, ``sync`` / ``ema``, or the LoRA ``adapter`` reference), from the
  reference with the same seed; logged: ``validation/reward`` and ``validation/reward_reference`` (with
  ``run.eval_reward``), ``validation/win_rate`` and ``validation/kl`` (per sequence, :mod:`mmalign.eval.text`);
  the samples go to ``<output_dir>/validation/step_<n>.jsonl``. A static reference's samples are drawn once per
  stage and reused. ``precomputed`` / ``none`` references have no model to sample: reward only.
- **diffusion**: one image per prompt and seed from the policy (and from the reference, as above) →
  ``<output_dir>/validation/step_<n>.png`` (rows: prompt × model, columns: seeds), also logged to
  TensorBoard / wandb as ``validation/images``; with ``run.eval_reward`` the reward and win-rate too.

Validation samples on the main process only, from the unwrapped policy, under a forked RNG (training's random
stream is the same with or without it, so resumed runs stay exact). Generation through FSDP / ZeRO-3 sharded
models is untested (as for the online recipes).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, from_dict
from ..methods.task import StageData, Task
from ..schema import TrainConfig
from .reference import AdapterReference, CopyReference, MovingReference, Reference
from .run_state import Run
from .stage import Stage, collate_with_index


def mean_metrics(items: list[dict]) -> dict[str, float]:
    acc: dict[str, list[float]] = defaultdict(list)
    for m in items:
        for k, v in m.items():
            acc[k].append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items()}


@torch.no_grad()
def evaluate(task: Task, model, data: StageData, reference: Reference, cfg: TrainConfig, accelerator) -> dict:
    """Mean loss and metrics over the eval set (every process evaluates all of it; results are identical).

    Runs under a forked RNG with a fixed seed: methods that sample during scoring (diffusion noise and
    timesteps) get the same draws at every evaluation, and training's random stream is the same whether or
    not (and how often) the run evaluated, which keeps resumed runs exact."""
    if data.eval is None or len(data.eval) == 0:
        return {}
    model.eval()
    bs, rows = cfg.run.batch_size, []
    n_batches = math.ceil(len(data.eval) / bs)
    if cfg.run.eval_batches:
        n_batches = min(n_batches, cfg.run.eval_batches)
    dev = accelerator.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(cfg.run.seed + 104_729)
        for b in range(n_batches):
            idx = list(range(b * bs, min((b + 1) * bs, len(data.eval))))
            batch = collate_with_index(data.collate, data.eval, idx).to(dev)
            with accelerator.autocast():
                pol = model(batch)
                ref = reference.scores(batch) if task.needs_reference else None
                out = task.loss(pol, ref, batch)
            rows.append({"loss": out.loss.item(), **{k: v.item() for k, v in out.metrics.items()}})
    model.train()
    return {f"eval/{k}": v for k, v in mean_metrics(rows).items()}


# -- sampling validation (run.eval_prompts) ------------------------------------------------------------------


@dataclass
class GenerationOptions:
    """``run.eval_generation``: how validation samples are drawn (text keys, then diffusion keys)."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    chat: bool = False
    samples_per_prompt: int = 1
    batch_size: int = 32
    steps: int = 25
    guidance_scale: float = 5.0
    sampler: str = "ddim"


def _text_reward(spec: str):
    from ..methods.rewards import ModelReward, load_reward_fn

    return ModelReward(spec) if Path(spec).expanduser().is_dir() else load_reward_fn(spec)


def _image_reward(spec: str):
    from ..eval.diffusion import load_image_reward

    return load_image_reward(spec)


def reward_message(message: str) -> str:
    """The reward loaders' messages name the online recipes' key; here the value came from run.eval_reward."""
    return message.replace("options.reward_fn=", "the reward ").replace("options.reward_model=", "the reward ")


# modality -> (its sampling validation, its reward loader); a modality missing here cannot set run.eval_prompts
VALIDATORS: dict[str, tuple[str, Any]] = {"text": ("_validate_text", _text_reward),
                                          "diffusion": ("_validate_diffusion", _image_reward)}


class Validation:
    """The sampling validation of a run (``run.eval_prompts``), built and checked before training."""

    def __init__(self, cfg: TrainConfig):
        from ..data.rows import DataError
        from ..eval.paired import read_prompts

        rc, errs = cfg.run, []
        self.cfg, self.reward_fn, self._cache, self._cache_key = cfg, None, {}, None
        self.written: Path | None = None  # the samples file / image grid of the last call
        if cfg.modality not in VALIDATORS:
            errs.append(f"run.eval_prompts: sampling validation exists for modality {sorted(VALIDATORS)}, not "
                        f"{cfg.modality!r}; fix: drop run.eval_prompts (run.eval_every still evaluates the loss)")
        if not rc.eval_seeds:
            errs.append("run.eval_seeds is empty; give at least one seed, e.g. run.eval_seeds=[0, 1]")
        try:
            self.prompts = read_prompts(rc.eval_prompts, where="run.eval_prompts")
        except DataError as err:
            errs.append(str(err))
        try:
            self.options = from_dict(GenerationOptions, dict(rc.eval_generation), source="run.eval_generation")
        except ConfigError as err:
            errs += [f"run.eval_generation: {e}" for e in err.errors]
        else:
            o = self.options
            errs += [f"run.eval_generation.{k}={getattr(o, k)} must be >= 1" for k in
                     ("max_new_tokens", "samples_per_prompt", "batch_size", "steps") if getattr(o, k) < 1]
        if rc.eval_reward and cfg.modality in VALIDATORS:
            try:
                self.reward_fn = VALIDATORS[cfg.modality][1](rc.eval_reward)
            except (ConfigError, ImportError, OSError, ValueError) as err:
                errs += [f"run.eval_reward={rc.eval_reward!r}: {reward_message(m)}" for m in
                         (err.errors if isinstance(err, ConfigError) else [str(err)])]
        if errs:
            raise ConfigError(errs)

    @classmethod
    def build(cls, cfg: TrainConfig) -> Validation | None:
        """None when ``run.eval_prompts`` is empty (a reward without prompts is refused)."""
        if not cfg.run.eval_prompts:
            if cfg.run.eval_reward:
                raise ConfigError(f"run.eval_reward={cfg.run.eval_reward!r} scores samples of run.eval_prompts, "
                                  "which is empty; fix: set run.eval_prompts (a list, or a prompt file)")
            return None
        return cls(cfg)

    def _reference(self, run: Run, stage: Stage):
        """The generative reference (a model, the adapter-disabled policy, or None) and whether its samples may be
        reused within the stage (it changes only at a stage start, or never)."""
        from ..eval.text import ADAPTER_DISABLED

        ref = run.reference
        if isinstance(ref, AdapterReference):
            return ADAPTER_DISABLED, True
        if isinstance(ref, CopyReference):
            return ref.model, not isinstance(ref, MovingReference)
        return None, False

    def _cache_for(self, stage: Stage, static: bool) -> dict | None:
        if not static:
            return None
        if self._cache_key != stage.idx:
            self._cache, self._cache_key = {}, stage.idx
        return self._cache

    def __call__(self, run: Run, stage: Stage) -> dict[str, float]:
        """Sample, score, write and log; returns ``validation/*`` metrics (main process; {} elsewhere)."""
        if not run.accelerator.is_main_process:
            return {}
        folder = run.out_dir / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        dev = run.accelerator.device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            result = getattr(self, VALIDATORS[self.cfg.modality][0])(run, stage, folder)
        return {f"validation/{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))}

    def _validate_text(self, run: Run, stage: Stage, folder: Path) -> dict:
        from ..eval.text import compare_text

        o, task = self.options, run.task
        reference, static = self._reference(run, stage)
        result = compare_text(task.model, task.tokenizer, self.prompts, reference=reference,
                              reward_fn=self.reward_fn, seeds=self.cfg.run.eval_seeds,
                              samples_per_prompt=o.samples_per_prompt, max_new_tokens=o.max_new_tokens,
                              temperature=o.temperature, top_p=o.top_p, chat=o.chat, batch_size=o.batch_size,
                              reference_cache=self._cache_for(stage, static))
        path = folder / f"step_{run.state.global_step}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in result["samples"]))
        self.written = path
        return {k: v for k, v in result.items() if k not in ("per_seed", "samples", "n_samples")}

    def _validate_diffusion(self, run: Run, stage: Stage, folder: Path) -> dict:
        from ..eval.diffusion import compare_diffusion, sample_images, save_comparison_grid
        from ..sample import diffusion as SD

        o, task, seeds = self.options, run.task, self.cfg.run.eval_seeds
        policy = task.model
        net = policy.get_base_model() if hasattr(policy, "get_base_model") else policy  # LoRA layers stay active
        device = next(net.parameters()).device
        comps = task.components
        for m in [comps.vae, *comps.text_encoders]:
            if m is not None:
                m.to(device)
        kw = dict(guidance_scale=o.guidance_scale, steps=o.steps, batch_size=o.batch_size,
                  height=self.cfg.diffusion.resolution, width=self.cfg.diffusion.resolution)
        reference, static = self._reference(run, stage)
        was_training = net.training
        net.eval()
        try:
            images = {}
            if reference is not None:
                cache = self._cache_for(stage, static)
                if cache is not None and "images" in cache:
                    images["reference"] = cache["images"]
                elif isinstance(reference, str):  # the adapter-disabled policy: the base, no second copy
                    images["reference"] = sample_images(SD.build_pipeline(comps, net, sampler=o.sampler),
                                                        self.prompts, seeds, context=policy.disable_adapter(), **kw)
                else:
                    images["reference"] = sample_images(SD.build_pipeline(comps, reference, sampler=o.sampler),
                                                        self.prompts, seeds, **kw)
                if cache is not None:
                    cache["images"] = images["reference"]
            images["policy"] = sample_images(SD.build_pipeline(comps, net, sampler=o.sampler), self.prompts, seeds,
                                             **kw)
        finally:
            net.train(was_training)
        result = compare_diffusion(images["policy"], self.prompts, seeds, reference_images=images.get("reference"),
                                   reward_fn=self.reward_fn)
        r, step = result.get("rewards"), run.state.global_step
        labels = None if r is None else {"policy": r["model"], **({"reference": r["reference"]} if "reference" in r
                                                                  else {})}
        path = save_comparison_grid(images, self.prompts, seeds, folder / f"step_{step}.png", rewards=labels,
                                    title=f"step {step} (stage {stage.config.name}), w={o.guidance_scale:g}, "
                                          f"{o.steps} {o.sampler} steps")
        run.logger.log_image("validation/images", path, step)
        self.written = path
        return {k: v for k, v in result.items() if k not in ("per_seed", "rewards", "n_images")}


# The console line's metrics (with every validation/* mean); a family's other metrics go to the logs only.
_SHOWN = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/rewards/chosen")


def run_evaluation(run: Run, stage: Stage) -> dict:
    """The evaluation at the current step: :func:`evaluate` on the stage's eval set plus the sampling validation
    (``run.validation``), logged as one record and printed as one line. Returns the stage's latest results."""
    state = run.state
    new = evaluate(run.task, stage.model, stage.data, stage.eval_ref, run.cfg, run.accelerator)
    validation = run.validation
    if validation is not None:
        validation.written = None
        new = {**new, **validation(run, stage)}
        run.accelerator.wait_for_everyone()  # the others wait while the main process samples
    state.eval = new or state.eval
    state.eval_step = state.global_step
    if state.eval:
        run.logger.log(state.global_step, state.eval, stage=stage.config.name)
    if new and run.accelerator.is_main_process:
        from tqdm.auto import tqdm

        keys = [k for k in new if k in _SHOWN or (k.startswith("validation/") and not k.endswith("_std"))]
        shown = " ".join(f"{k}={new[k]:.4g}" for k in keys or new)  # every metric stays in metrics.jsonl
        where = validation.written if validation is not None else None
        tqdm.write(f"[eval] step {state.global_step} (stage {stage.config.name}): {shown}"
                   + (f" -> {where}" if where else ""))
    return state.eval
