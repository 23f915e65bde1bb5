"""The state of a run: what a checkpoint saves and what a resumed run restores.

:class:`RunState` is the loop's position and last results (``trainer_state.json``, plus the precomputed
reference tables of the current anchor in ``loop_extra.pt``); :class:`Run` bundles it with what stays fixed for
the run (task, config, accelerator, logger) and the current reference. :func:`save` writes a checkpoint of a run
inside a stage and :func:`restore` puts a resumed stage back where the checkpoint left it; model, optimizer and
RNG states travel through ``accelerator.save_state``/``load_state`` (see :mod:`mmalign.train.checkpoint`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from ..methods.task import Task
from ..schema import StageConfig, TrainConfig
from . import checkpoint as ckpt
from .metrics_log import MetricsLogger
from .output_guard import training_config
from .reference import PrecomputedReference, Reference

if TYPE_CHECKING:
    from .stage import Stage


@dataclass
class RunState:
    """Where the run is. Its fields are the keys of ``trainer_state.json`` (``anchors`` excepted), so checkpoints
    written before this class existed resume unchanged."""

    stage_names: list[str]
    global_step: int = 0
    stage_idx: int = 0
    step_in_stage: int = 0
    stage_steps: list[int] = field(default_factory=list)  # steps of every stage so far, the current one's planned
    metrics: dict = field(default_factory=dict)  # the last step's (reduced) training metrics
    eval: dict = field(default_factory=dict)  # the current stage's last evaluation
    eval_step: int = -1  # the global step of that evaluation
    anchors: dict[str, str] = field(default_factory=dict)  # data key -> precomputed table (see stage.py)

    def start_stage(self, idx: int, n_steps: int) -> None:
        self.stage_idx, self.step_in_stage = idx, 0
        self.metrics, self.eval, self.eval_step = {}, {}, -1
        self.stage_steps.append(n_steps)

    def to_json(self, stage: Stage) -> dict:
        """``trainer_state.json`` of a checkpoint taken now (with the stage's batch-order positions)."""
        return {"global_step": self.global_step, "stage_idx": self.stage_idx, "step_in_stage": self.step_in_stage,
                "stage_names": self.stage_names, "stage_steps": list(self.stage_steps),
                "order": stage.order.state_dict(),
                "aux_order": stage.aux_order.state_dict() if stage.aux_order else None,
                "metrics": self.metrics, "eval": self.eval, "eval_step": self.eval_step}

    def load_json(self, saved: dict) -> None:
        """The position inside the resumed stage (earlier stages were replayed by the loop)."""
        self.step_in_stage, self.global_step = saved["step_in_stage"], saved["global_step"]
        self.metrics, self.eval = saved.get("metrics", {}), saved.get("eval", {})
        self.eval_step = saved.get("eval_step", -1)


@dataclass
class Resume:
    """The checkpoint a run resumes from: ``state`` (trainer_state.json) and ``extra`` (loop_extra.pt)."""

    path: Path
    state: dict
    extra: dict

    @classmethod
    def read(cls, path: Path, stages: list[StageConfig]) -> Resume:
        state = ckpt.read_state(path)
        check_resume(state, stages, path)
        return cls(path, state, ckpt.read_extra(path))

    @property
    def stage_idx(self) -> int:
        return self.state["stage_idx"]


def check_resume(state: dict, stages: list[StageConfig], path: Path) -> None:
    names, idx = [s.name for s in stages], state["stage_idx"]
    saved = state.get("stage_names")
    if saved is not None and saved[: idx + 1] != names[: idx + 1]:
        problem = f"the checkpoint was written by a run with stages {saved}, this config has {names}"
    elif idx >= len(stages):
        problem = f"the checkpoint is in stage {idx} but this config has {len(stages)} stage(s)"
    else:
        return  # stages after the checkpoint's may change (e.g. a stage appended to a finished run)
    raise ConfigError(f"run.resume: {problem}; resume with the config that wrote it, or start over with "
                      "run.resume=never or a new run.output_dir", source=str(path))


@dataclass
class Run:
    """One call of :func:`~mmalign.train.loop.fit`: the fixed parts, the current reference and the state."""

    task: Task
    cfg: TrainConfig
    accelerator: Any
    logger: MetricsLogger
    reference: Reference  # the training reference (a stage's train table under ``precomputed``)
    state: RunState
    summary: dict = field(default_factory=lambda: {"stages": []})
    model: Any = None  # the prepared (possibly sharded) policy of the current stage
    stage: Any = None  # the current Stage (the final save checkpoints the state before exporting)
    saved_at: Path | None = None  # the checkpoint of the current state: the last one saved or resumed from
    validation: Any = None  # mmalign.train.evaluate.Validation when run.eval_prompts is set
    t0: float = field(default_factory=time.time)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.run.output_dir)


def save(run: Run, stage: Stage, *, pre_export: bool = False) -> Path:
    """A checkpoint at the current step: accelerate's state, the run state and the objects beside them.
    ``pre_export``: the one kept while the final model is written (no older checkpoint is pruned for it, and
    the final save removes it once ``final/`` is complete)."""
    state = run.state
    # the training config the checkpoint was written under, compared when a run resumes (output_guard)
    saved = {**state.to_json(stage), "config": training_config(run.cfg)}
    if pre_export:
        saved["pre_export"] = True
    extra = {"scheduler": stage.scheduler.state_dict(), "reference": run.reference.state_dict(),
             "anchor_tables": state.anchors, "task": run.task.state_dict()}
    keep = 1 << 30 if pre_export else run.cfg.run.keep_last
    run.saved_at = ckpt.save_checkpoint(run.accelerator, run.out_dir, state.global_step, saved, keep_last=keep,
                                        extra=extra)
    return run.saved_at


def restore(run: Run, stage: Stage, resume: Resume) -> None:
    """Put a freshly set-up stage back where ``resume`` left it."""
    saved = resume.extra
    run.accelerator.load_state(str(resume.path))  # weights, optimizer, RNG, accelerate's step counter
    stage.scheduler.load_state_dict(saved["scheduler"])
    if not isinstance(run.reference, PrecomputedReference):  # its tables come back through the anchors
        run.reference.load_state_dict(saved.get("reference", {}))
    if "task" in saved:  # checkpoints of tasks without recipe state, written before every task had one, lack it
        run.task.load_state_dict(saved["task"])
    stage.order.load_state_dict(resume.state["order"])
    if stage.aux_order is not None and resume.state.get("aux_order"):
        stage.aux_order.load_state_dict(resume.state["aux_order"])
    run.state.load_json(resume.state)
    run.saved_at = resume.path
    run.logger.log(run.state.global_step, {}, event="resumed", checkpoint=str(resume.path))
