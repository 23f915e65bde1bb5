"""The Python API, mirrored by the CLI: ``mmalign.train(config_or_path, overrides, **extra)``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, dump_yaml, load_config
from .registry import MODALITIES, resolve
from .schema import TrainConfig

log = logging.getLogger(__name__)


def load_train_config(config: str | Path | Mapping | TrainConfig | None = None, overrides: Sequence[str] = (),
                      extra: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults ← YAML file (or mapping) ← ``key=value`` overrides ← ``extra`` (dotted keys → values)."""
    if isinstance(config, TrainConfig):
        from .config import to_dict

        config = to_dict(config)
    return load_config(TrainConfig, config, overrides=list(overrides), extra=dict(extra or {}))


def task_target(cfg: TrainConfig) -> str:
    """The ``"module:Class"`` that builds the configured run: the recipe the run's loss names select (the
    ``recipe`` of their :data:`~mmalign.methods.table.METHODS` rows, when it runs on the modality's family), else
    the modality's task from :data:`mmalign.registry.MODALITIES`. Refuses, before anything is built or written,
    a run that mixes two recipes (each builds its own model) and a run without training data unless its loss's
    row is data-free (Self-NPO samples its own inputs). Unknown names, and rows the family cannot run, are left
    to the task, which reports them with the valid names."""
    from .extras import require
    from .methods.table import find_method

    row = MODALITIES[cfg.modality]
    require(*row.extras, what=f"modality {cfg.modality!r}")  # before the family imports its packages
    family = getattr(resolve(row.task), "family_cls", None)
    names = sorted({cfg.loss.name} | {(s.loss or {}).get("name") for s in cfg.stages} - {None})

    def own(name: str):  # the row, if it is a recipe of this modality's family
        m = find_method(name)
        return m if m is not None and m.recipe and family is not None and m.family == family.name else None

    recipes = sorted({own(n).recipe for n in names if own(n) is not None})
    if len(recipes) > 1:
        raise ValueError(f"one run cannot mix the {cfg.modality} recipes {recipes} (losses {names})")
    main = own(cfg.loss.name)
    if not (main is not None and main.data_free) and not cfg.data.train and not any(s.train for s in cfg.stages):
        raise ConfigError("data.train is empty: give at least one training file (data.train=[path.jsonl])")
    return recipes[0] if recipes else row.task


def build_task(cfg: TrainConfig):
    """The task for the configured run (:func:`task_target`), imported only now, so that a text run never imports
    diffusers or open_clip. Tasks that train auxiliary runs (PRIOR's text-only reference) get :func:`train` as
    ``train_fn``: methods never import the API."""
    cls = resolve(task_target(cfg))
    return cls(cfg, train_fn=train) if MODALITIES[cfg.modality].needs_train_fn else cls(cfg)


def writable_output_dir(out: Path) -> None:
    """Create ``out`` and prove it takes a write (a small file written, flushed to disk and removed), so that a path
    under ``/proc``, under a file, on a read-only or immutable mount, or on a full disk is a clean error naming the
    path before any model is built — not a traceback from the first checkpoint or the final save."""
    import os

    probe = out / f".mmalign-write-test-{os.getpid()}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.output_dir={str(out)!r} is a file, not a directory; fix: pick another path, e.g. "
                          "run.output_dir=outputs/run")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        if out.is_dir():  # a half-written probe must not stay behind
            probe.unlink(missing_ok=True)
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"run.output_dir={str(out)!r} cannot be written ({reason}: {e.filename or out}); fix: pick a "
                          "directory on a writable disk with free space, e.g. run.output_dir=outputs/run") from None


def _looks_local(value: str) -> bool:
    """The rule of mmalign.models.text: what exists, is absolute, starts with . or ~, or has two slashes is a
    path; anything else (``org/name``, ``ViT-B-32``) may be a hub id or a built-in name."""
    return Path(value).expanduser().exists() or value.startswith((".", "~", "/")) or value.count("/") > 1


def check_paths(cfg: TrainConfig) -> None:
    """The paths a config names that must exist before anything is written or built: ``model.name_or_path`` and
    ``model.tokenizer`` when they are local paths, ``run.resume`` when it names a checkpoint. Raises one
    ConfigError with every problem. What is inside a checkpoint (its files, corrupt or non-finite weights) is
    checked by the loaders (:mod:`mmalign.models.load_checks`) when the model is built."""
    from .models.load_checks import incomplete_hint
    from .train import checkpoint as ckpt

    errors = []
    for key, value in (("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer)):
        if not value or value in ("tiny", "tiny-hf") or not _looks_local(value):
            continue
        path = Path(value).expanduser()
        if not path.exists():
            errors.append(f"{key}={value!r} does not exist (working directory: {Path.cwd()}); fix: the path of a "
                          f"checkpoint directory written by save_pretrained, or {key}=tiny{incomplete_hint(path)}")
        elif path.is_dir() and not any(path.iterdir()):
            errors.append(f"{key}={value!r} is an empty directory; fix: download or save the checkpoint into it, or "
                          f"point {key} at a complete checkpoint{incomplete_hint(path)}")
    resume = cfg.run.resume
    if resume not in ("auto", "force", "never") and not (Path(resume).expanduser() / ckpt.STATE_FILE).is_file():
        what = "is not a complete checkpoint (no trainer_state.json inside)" if Path(resume).is_dir() else \
            "does not exist"
        found = [p.name for p in ckpt.list_checkpoints(cfg.run.output_dir)]
        errors.append(f"run.resume={resume!r} {what}; allowed: auto, force, never or a checkpoint directory "
                      f"(complete checkpoints in {cfg.run.output_dir}: {found}); fix: name one of them, or "
                      "run.resume=auto (the newest complete one)")
    if errors:
        raise ConfigError(errors)


@contextlib.contextmanager
def model_errors_named(cfg: TrainConfig):
    """A :class:`~mmalign.config.ModelLoadError` raised while the task builds its model, reported with the
    config key and value it came from (``model.name_or_path='...'``) when its message names that path."""
    from .config import ModelLoadError

    try:
        yield
    except ModelLoadError as err:
        value = cfg.model.name_or_path
        if err.source or value in ("tiny", "tiny-hf") or str(Path(value).expanduser()) not in str(err):
            raise
        raise type(err)(err.errors, f"model.name_or_path={value!r}") from err


def train(config: str | Path | Mapping | TrainConfig | None = None, overrides: Sequence[str] = (), *,
          task=None, **extra: Any) -> dict:
    """Train from a config; returns the run summary (steps, final metrics, eval metrics, output paths).

    ``extra`` takes dotted keys with ``__`` for dots, e.g. ``train(cfg, run__max_steps=10)``.
    """
    cfg = load_train_config(config, overrides, {k.replace("__", "."): v for k, v in extra.items()})
    if task is None:  # every config problem (recipes, data, loss names and options, family checks) before the
        resolve(task_target(cfg)).validate(cfg)  # output directory is written or a model is built
        check_paths(cfg)
    from .train.output_guard import plan_resume

    plan_resume(cfg)  # a changed config over checkpoints, or a finished final/, is refused before anything is written
    out = Path(cfg.run.output_dir)
    writable_output_dir(out)
    dump_yaml(cfg, out / "config.yaml", header="resolved config of this run (mmalign train reads it back)")
    from .train.loop import fit

    with model_errors_named(cfg):
        task = task or build_task(cfg)
    from .train.output_guard import check_free_space

    check_free_space(cfg, getattr(task, "model", None))  # now that the parameter count is known
    # A task built without train_fn (e.g. PriorTask(cfg) by hand) trains its auxiliary runs now (no-op otherwise).
    task.run_prerequisites(train)
    from .train.publish import publish

    return publish(cfg, fit(task, cfg))  # final/README.md (model card), and run.push_to_hub


# ------------------------------------------------------------------------------------------------ dry run

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def plan(config: str | Path | Mapping | TrainConfig | None = None, overrides: Sequence[str] = (), **extra: Any
         ) -> dict:
    """What :func:`train` would do, without training or writing anything (``mmalign train --dry-run``).

    Runs every check ``train`` makes before it writes (the config, the task's validation, the output-directory
    rule), reads every data file with the modality's reader (skipping and counting bad rows: ``good``/``bad`` per
    file) and returns the plan: modality, task, family, per stage the loss row with its effective kwargs and the
    optimizer steps (``max_steps``, or epochs × rows / (batch_size × grad_accum)), the reference strategy, the
    data counts, the output directory and whether the run would start, resume or be refused, and a rough memory
    estimate from the parameter count (a ``tiny`` model is built; a checkpoint's ``config.json`` is read;
    "unknown" otherwise). Raises ConfigError/DataError like ``train``.
    """
    import math

    from .train.stage import resolve_stages

    cfg = load_train_config(config, overrides, {k.replace("__", "."): v for k, v in extra.items()})
    target = task_target(cfg)
    cls = resolve(target)
    uses = cls.validate(cfg)
    check_paths(cfg)
    family = getattr(cls, "family_cls", None)
    stages = resolve_stages(cfg)
    task, model_note = None, "unknown"
    if cfg.model.name_or_path == "tiny":
        import tempfile

        # Tiny models build in seconds; some recipes write while they build (PRIOR saves its reference's initial
        # weights), so the throwaway task builds into a temporary output directory, never the run's.
        with tempfile.TemporaryDirectory(prefix="mmalign-dry-run-") as tmp:
            try:
                task = cls(load_train_config(cfg, [f"run.output_dir={tmp}"]))
            except ConfigError:  # a bad model.tiny (or LoRA target) is the user's to fix, as in train()
                raise
            except Exception as e:  # noqa: BLE001 - the estimate is optional; the plan reports why it is missing
                model_note = f"unknown (building the tiny model failed: {type(e).__name__}: {e})"
    data = _count_data(cfg, family, task, stages)
    batch = cfg.run.batch_size * cfg.run.grad_accum
    stage_rows = []
    for i, stage in enumerate(stages):
        use = uses[i + 1] if isinstance(uses, list) and cfg.stages and len(uses) > i + 1 else (
            uses[0] if isinstance(uses, list) and uses else None)
        files = [str(f) for f in (stage.train or cfg.data.train)]
        rows = sum(data.get(f, {}).get("good", 0) for f in files)
        if stage.max_steps:
            steps, how = stage.max_steps, "max_steps"
        else:
            epochs = stage.epochs if stage.epochs is not None else cfg.run.epochs
            steps, how = max(1, math.ceil(epochs * rows / batch)), f"{epochs} epochs × {rows} rows / {batch}"
        row = {"name": stage.name, "steps": steps, "steps_from": how, "train": files}
        if use is not None:
            row.update(loss=use.method.name, kwargs={**use.method.defaults, **use.kwargs},
                       needs_reference=bool(use.method.needs_reference))
            if use.sft_weight:
                row["sft_weight"] = use.sft_weight
        stage_rows.append(row)
    needs_ref = any(r.get("needs_reference") for r in stage_rows)
    strategy = cfg.reference.strategy
    if strategy == "auto":
        strategy = "adapter" if cfg.lora.enabled else "copy"
    from .train.output_guard import plan_resume

    out = Path(cfg.run.output_dir)
    try:
        resume = plan_resume(cfg)
        output = {"dir": str(out), "exists": out.exists(),
                  "action": f"resume from {resume}" if resume else "start a new run"}
    except ConfigError as e:
        output = {"dir": str(out), "exists": out.exists(), "action": "refused", "why": "; ".join(e.errors)}
    params = _count_params(task) if task is not None else _params_from_checkpoint(cfg.model.name_or_path)
    memory = _memory(cfg, params, strategy if needs_ref else "none") if params else model_note
    return {"modality": cfg.modality, "task": target, "family": getattr(family, "name", None) or "n/a",
            "model": cfg.model.name_or_path, "lora": cfg.lora.enabled, "stages": stage_rows,
            "total_steps": sum(r["steps"] for r in stage_rows),
            "reference": strategy if needs_ref else f"none (no stage's loss needs one; configured: "
                                                    f"{cfg.reference.strategy})",
            "batch": {"batch_size": cfg.run.batch_size, "grad_accum": cfg.run.grad_accum}, "data": data,
            "output": output, "parameters": params or "unknown", "memory": memory}


def _count_data(cfg: TrainConfig, family, task, stages) -> dict[str, dict]:
    """``{file: {"good", "bad", "skipped"?, "split"}}`` for every train, eval and retain file."""
    from collections import Counter

    from .data.row_files import load_rows

    fam = getattr(family, "name", "")
    tok = getattr(getattr(task, "family", None), "tokenizer", None)
    files: dict[str, str] = {}
    for stage in stages:
        files.update({str(f): "train" for f in (stage.train or cfg.data.train)})
    files.update({str(f): "eval" for f in cfg.data.eval if str(f) not in files})
    if cfg.retain is not None:
        files.update({str(f): "retain" for f in cfg.retain.train if str(f) not in files})
    out = {}
    for f, split in files.items():
        if cfg.modality == "clip":
            from dataclasses import replace

            from .data.image_text import ImageTextOptions, load_image_text

            opts = replace(ImageTextOptions.from_config(cfg), skip_bad_rows=True)
            stats = load_image_text(f, opts)[2]
        elif fam == "causal_lm" and tok is not None:
            from .data.text import build_text_dataset

            dc = cfg.data
            fmt = dc.format if dc.format != "auto" or task.method is None else task.method.data_format
            stats = build_text_dataset(f, tok, format=fmt, limit=dc.limit, max_length=dc.max_length,
                                       max_prompt_length=dc.max_prompt_length, truncation=dc.truncation,
                                       skip_bad_rows=True)[1]
        else:
            skipped: Counter = Counter()
            rows = load_rows(f, limit=cfg.data.limit, skip_bad_rows=True, skipped=skipped)
            stats = {"rows_used": len(rows), "rows_skipped": sum(skipped.values()),
                     **{f"skipped/{k}": v for k, v in skipped.items()}}
        entry = {"split": split, "good": int(stats.get("rows_used", 0)), "bad": int(stats.get("rows_skipped", 0))}
        reasons = {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith("skipped/") and v}
        if reasons:
            entry["skipped"] = reasons
        out[f] = entry
    return out


def _count_params(task) -> int | None:
    model = getattr(task, "model", None)
    return sum(p.numel() for p in model.parameters()) if model is not None else None


def _params_from_checkpoint(path: str) -> int | None:
    """A causal-LM-shaped estimate from ``config.json`` (embeddings + attention + MLP per layer); None if absent."""
    import json

    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        c = json.loads(cfg_file.read_text())
        c = c.get("text_config", c) if "hidden_size" not in c else c
        h, n, v = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["vocab_size"])
        inter = int(c.get("intermediate_size", 4 * h))
        heads = int(c.get("num_attention_heads", 1))
        kv = int(c.get("num_key_value_heads", heads))
        attn = h * h * 2 + 2 * h * (h // heads) * kv
        embed = v * h * (1 if c.get("tie_word_embeddings", False) else 2)
        return embed + n * (attn + 3 * h * inter)
    except (KeyError, ValueError, TypeError, ZeroDivisionError):
        return None


def _memory(cfg: TrainConfig, params: int, strategy: str) -> str:
    """Weights + (full fine-tuning) grads and AdamW's two fp32 moments + a reference copy; no activations."""
    w = params * _BYTES.get(cfg.model.dtype, 4)
    parts = {"weights": w}
    if not cfg.lora.enabled:
        parts["grads"], parts["adamw"] = w, params * 8
    if strategy in ("copy", "sync", "ema"):
        parts["reference"] = w
    detail = " + ".join(f"{k} {_size(v)}" for k, v in parts.items())
    return f"≈{_size(sum(parts.values()))} ({detail}; activations and LoRA adapters not included)"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} GiB"
