"""The run schema: every key a YAML config or a ``key=value`` override may set.

Precedence (lowest first): these dataclass defaults ← the YAML file ← ``key=value`` overrides on the command
line ← keyword overrides from Python. Unknown keys and bad values are reported all at once by
:func:`mmalign.config.load_config`. ``mmalign train --help-config`` prints this schema with help texts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import extras
from .registry import MODALITIES, resolve

# The values of ``modality:``, one per row of the registry (Literal of a tuple = Literal of its items).
ModalityName = Literal[tuple(MODALITIES)]


MAX_LR = 10.0  # above this every optimizer here diverges at once (lr=1e30 gave a NaN loss at step 2)


def in_range(name: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False, example: str = "", allow_none: bool = False) -> list[str]:
    """``[message]`` when ``value`` is not a finite number within [low, high] (ends open where asked), else ``[]``.

    The message names the field, the value, the allowed range and an example of a valid setting; a section's
    ``validate()`` returns it, so the key path is put in front (``optim.lr=inf must be ...``)."""
    if value is None and allow_none:
        return []
    lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
    hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
    allowed = (f"a finite number in {lo or '(-inf'}, {hi or 'inf)'}" + (" or null" if allow_none else ""))
    hint = f"; e.g. {name}={example}" if example else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return [f"{name}={value!r} must be {allowed}{hint}"]
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    return [f"{name}={value!r} is out of range: must be {allowed}{hint}"] if bad_low or bad_high else []


def _tiny_problems(tiny: dict[str, Any]) -> list[str]:
    """Model-independent checks of ``model.tiny``: sizes, ids and counts are never negative or non-finite (each
    family's builder checks its own keys and minimums: see mmalign.models)."""
    errs = []
    for key, value in tiny.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if isinstance(v, bool):
                continue
            if isinstance(v, int) and v < 0:
                errs.append(f"model.tiny.{key}={value!r} holds a negative number; sizes and counts of a tiny model "
                            f"must be >= 1 (e.g. {abs(v)})")
                break
            if isinstance(v, float) and not math.isfinite(v):
                errs.append(f"model.tiny.{key}={value!r} must be a finite number")
                break
    return errs


def _h(text: str, default: Any = None, factory: Any = None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    name_or_path: str = _h("a local checkpoint directory (or hub id where a hub is reachable); "
                           "'tiny' builds a random tiny Llama for CPU runs", "tiny")
    tokenizer: str | None = _h("tokenizer directory; default: name_or_path ('tiny' trains a BPE on the data)")
    dtype: Literal["float32", "bfloat16", "float16"] = _h("weights dtype on load", "float32")
    attn_implementation: str | None = _h("eager | sdpa | flash_attention_2 (default: transformers' choice)")
    gradient_checkpointing: bool = _h("recompute activations in backward to save memory", False)
    load_in_4bit: bool = _h("QLoRA: load the base in 4 bits (needs bitsandbytes + CUDA)", False)
    load_in_8bit: bool = _h("load the base in 8 bits (needs bitsandbytes + CUDA)", False)
    trust_remote_code: bool = _h("allow model code shipped with the checkpoint", False)
    tiny: dict[str, Any] = _h("overrides for the tiny model (hidden_size, num_layers, ...)", factory=dict)

    def validate(self) -> list[str]:
        errs = []
        if self.load_in_4bit and self.load_in_8bit:
            errs.append("load_in_4bit and load_in_8bit are exclusive: pick one")
        if self.name_or_path.strip() == "":
            errs.append("name_or_path='' is empty; allowed: 'tiny' or a checkpoint directory (or hub id)")
        quant = [k for k in ("load_in_4bit", "load_in_8bit") if getattr(self, k)]
        if quant and self.name_or_path in ("tiny", "tiny-hf"):
            errs.append(f"{quant[0]}=true quantises a pretrained checkpoint, but name_or_path={self.name_or_path!r} "
                        f"builds a random tiny model in float32; fix: {quant[0]}=false, or name_or_path=<checkpoint "
                        "directory> on a CUDA machine with bitsandbytes")
        return errs


@dataclass
class LoraConfig:
    enabled: bool = _h("train a LoRA adapter instead of all weights", False)
    r: int = _h("LoRA rank", 8)
    alpha: int = _h("LoRA alpha (scale = alpha / r)", 16)
    dropout: float = _h("LoRA dropout", 0.0)
    target_modules: list[str] | str = _h("module names, or 'all-linear'", "all-linear")

    def validate(self) -> list[str]:
        errs = [f"r={self.r} must be >= 1 (typical: 8, 16, 64)"] if self.r < 1 else []
        errs += in_range("alpha", self.alpha, 0, low_open=True, example="16")
        errs += in_range("dropout", self.dropout, 0, 1, high_open=True, example="0.05")
        if not self.target_modules:
            errs.append("target_modules is empty; list module names (e.g. [q_proj, v_proj]) or all-linear")
        return errs


@dataclass
class DataConfig:
    train: list[str] = _h("training files: .jsonl/.json/.parquet, a saved HF datasets directory, or a hub dataset id",
                          factory=list)
    eval: list[str] = _h("evaluation files (same formats)", factory=list)
    format: Literal["auto", "pairs", "unpaired", "ranked", "sft"] = _h("row format; auto detects from keys", "auto")
    max_length: int = _h("max tokens of prompt + completion", 512)
    max_prompt_length: int | None = _h("keep_end_of_prompt: the fewest prompt tokens kept when a row is over budget "
                                       "(default max_length // 2)", None)
    truncation: Literal["keep_end_of_prompt", "keep_start"] = _h(
        "over-long rows: keep the prompt's end and cut its oldest tokens (default), or keep the start and cut "
        "completions from the right (TRL); with keep_start a prompt that fills max_length is a bad row",
        "keep_end_of_prompt")
    skip_bad_rows: bool = _h("skip and count malformed rows instead of stopping with an error", False)
    limit: int | None = _h("read at most this many rows per file (debugging)", None)
    hub_split: str = _h("split of a hub dataset id in train/eval (e.g. data.train=[trl-lib/ultrafeedback_binarized])",
                        "train")
    hub_subset: str | None = _h("configuration (subset) name of hub datasets", None)
    hub_streaming: bool = _h("stream hub datasets instead of downloading them whole (use with data.limit)", False)
    chat_template: str | None = _h("Jinja chat template for conversational rows, replacing the tokenizer's own: the "
                                   "template text, or a path to a file holding it; used by training, generation "
                                   "and saved with the model", None)

    def validate(self) -> list[str]:
        errs = []
        if self.max_length < 2:
            errs.append(f"max_length={self.max_length} must be >= 2")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            errs.append(f"max_prompt_length={self.max_prompt_length} must be < max_length={self.max_length}")
        if self.chat_template is not None and "{%" not in self.chat_template and "{{" not in self.chat_template \
                and not Path(self.chat_template).expanduser().is_file():
            errs.append(f"chat_template={self.chat_template!r} is neither a Jinja template (no '{{%' or '{{{{' "
                        "tag) nor an existing file; fix: give the template text or the path of a .jinja file")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            errs.append(f"max_prompt_length={self.max_prompt_length} must be >= 1 or null")
        if self.limit is not None and self.limit < 1:
            errs.append(f"limit={self.limit} must be >= 1 or null (null: read every row)")
        return errs


@dataclass
class ReferenceConfig:
    strategy: Literal["auto", "copy", "adapter", "precomputed", "sync", "ema", "none"] = _h(
        "auto: adapter-disable with LoRA, else a frozen copy; none for reference-free losses", "auto")
    cache_dir: str | None = _h("precomputed reference scores live here (default: <output_dir>/ref_cache)")
    sync_every: int = _h("TR-DPO: mix the policy into the reference every N steps", 64)
    sync_alpha: float = _h("TR-DPO mixing weight α: ref ← α·policy + (1−α)·ref", 0.6)
    ema_decay: float = _h("EMA reference: ref ← decay·ref + (1−decay)·policy every step", 0.99)

    def validate(self) -> list[str]:
        errs = []
        errs += in_range("sync_alpha", self.sync_alpha, 0, 1, example="0.6")
        errs += in_range("ema_decay", self.ema_decay, 0, 1, high_open=True, example="0.99")
        if self.sync_every < 1:
            errs.append(f"sync_every={self.sync_every} must be >= 1")
        return errs


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw_8bit", "adafactor", "sgd"] = _h("optimizer", "adamw")
    lr: float = _h("peak learning rate", 1e-6)
    weight_decay: float = _h("decoupled weight decay", 0.0)
    betas: list[float] = _h("Adam betas", factory=lambda: [0.9, 0.999])
    eps: float = _h("Adam epsilon", 1e-8)
    scheduler: Literal["constant", "linear", "cosine"] = _h("decay after warmup", "linear")
    warmup_steps: int = _h("linear warmup steps (overrides warmup_ratio when > 0)", 0)
    warmup_ratio: float = _h("warmup as a fraction of the stage's steps", 0.0)
    max_grad_norm: float | None = _h("clip the global gradient norm (null: no clipping)", 1.0)

    def validate(self) -> list[str]:
        errs = []
        errs += in_range("lr", self.lr, 0, MAX_LR, low_open=True, example="1e-5")
        errs += in_range("weight_decay", self.weight_decay, 0, example="0.01")
        errs += in_range("eps", self.eps, 0, 1, low_open=True, example="1e-8")
        if len(self.betas) != 2:
            errs.append(f"betas={self.betas} must have two entries")
        for i, b in enumerate(self.betas):
            errs += in_range(f"betas.{i}", b, 0, 1, high_open=True, example="0.9")
        if self.warmup_steps < 0:
            errs.append(f"warmup_steps={self.warmup_steps} must be >= 0 (0: use warmup_ratio)")
        errs += in_range("warmup_ratio", self.warmup_ratio, 0, 1, high_open=True, example="0.1")
        errs += in_range("max_grad_norm", self.max_grad_norm, 0, low_open=True, example="1.0", allow_none=True)
        return errs


# Names shown in --help-config; each is a METHODS row (tests/methods/test_table.py checks it, schema cannot import
# the table: it sits below it).
LOSS_NAME_EXAMPLES = ("dpo", "simpo", "cpo", "orpo", "kto", "plackett_luce", "rm", "sft", "online_dpo", "xpo",
                      "seq_contrastive", "token_guidance", "self_npo", "clip_refine", "zscl", "prior")


@dataclass
class LossConfig:
    """The method's loss: ``name`` picks a row of :data:`mmalign.methods.table.METHODS` (and, for recipes such as
    online_dpo or self_npo, the task that runs it); ``kwargs`` go to its loss."""

    name: str = _h("a row of mmalign.methods.table.METHODS (a wrong name lists the modality's valid ones), e.g. "
                   + ", ".join(LOSS_NAME_EXAMPLES), "dpo")
    kwargs: dict[str, Any] = _h("keyword arguments of the loss (beta, loss_type, label_smoothing, ...)", factory=dict)
    sft_weight: float = _h("add weight × NLL of the chosen completion (RPO/MPO-style)", 0.0)
    retain_weight: float = _h("unlearning: weight of the retain-set NLL", 1.0)

    def validate(self) -> list[str]:
        return (in_range("sft_weight", self.sft_weight, 0, example="0.2")
                + in_range("retain_weight", self.retain_weight, 0, example="1.0"))


@dataclass
class StageConfig:
    """One stage of a run; unset fields inherit the run's values."""

    name: str = _h("stage name (logs, checkpoints)", "main")
    max_steps: int | None = _h("optimizer steps in this stage (null: use epochs)", None)
    epochs: float | None = _h("passes over this stage's data when max_steps is null", None)
    train: list[str] | None = _h("this stage's training files (default: data.train)", None)
    loss: dict[str, Any] | None = _h("overrides of the loss section for this stage", None)
    lr: float | None = _h("this stage's learning rate", None)
    reanchor_reference: bool = _h("at the start of this stage, the reference becomes the current policy", False)
    merge_lora: bool = _h("at the start of this stage, merge the LoRA adapter into the base and start a new one",
                          False)

    def validate(self) -> list[str]:
        errs = []
        if self.max_steps is not None and self.max_steps < 1:
            errs.append(f"max_steps={self.max_steps} must be >= 1 or null")
        errs += in_range("epochs", self.epochs, 0, low_open=True, example="1", allow_none=True)
        errs += in_range("lr", self.lr, 0, MAX_LR, low_open=True, example="1e-5", allow_none=True)
        return errs


@dataclass
class RunConfig:
    output_dir: str = _h("checkpoints, logs, final model", "outputs/run")
    seed: int = _h("seed for weights, data order and sampling", 0)
    max_steps: int | None = _h("optimizer steps (null: use epochs)", 100)
    epochs: float = _h("passes over the data when max_steps is null", 1.0)
    batch_size: int = _h("examples per device per micro-batch", 4)
    grad_accum: int = _h("micro-batches per optimizer step", 1)
    mixed_precision: Literal["no", "bf16", "fp16"] = _h("autocast precision; loss math stays fp32", "no")
    log_every: int = _h("log metrics every N optimizer steps", 1)
    eval_every: int = _h("evaluate every N steps (0: only at the end)", 0)
    eval_batches: int | None = _h("cap the number of eval batches", None)
    eval_prompts: list[str] | str = _h("generate from these prompts at every evaluation (eval_every, each stage's "
                                       "end): text → reward / win-rate / KL vs the reference; diffusion → "
                                       "<output_dir>/validation/step_<n>.png; a string names a .txt (one per line) "
                                       "or .jsonl ('prompt' / 'caption') file", factory=list)
    eval_seeds: list[int] = _h("one sample per eval prompt and seed; the same seeds for policy and reference",
                               factory=lambda: [0])
    eval_reward: str | None = _h("reward of eval samples: text → warm_colors | addition | 'module:function' | a "
                                 "reward-model directory; diffusion → shapes | 'module:function'", None)
    eval_generation: dict[str, Any] = _h("sampling settings of eval_prompts: max_new_tokens (32), temperature (1), "
                                         "chat (false); diffusion: steps (25), guidance_scale (5), sampler (ddim)",
                                         factory=dict)
    merge_lora_at_end: bool = _h("LoRA runs: also write <output_dir>/final_merged, the adapter merged into its "
                                 "base (full weights that load without peft)", False)
    save_every: int = _h("checkpoint every N steps (0: only the final model)", 0)
    keep_last: int = _h("checkpoints kept on disk", 2)
    resume: str = _h("'auto': the newest complete checkpoint, refused when it was written under a different "
                     "training config (the differing keys are listed); 'force': the newest one even so; 'never'; "
                     "or a checkpoint directory (differences only warned about)", "auto")
    overwrite: bool = _h("start over in an output_dir that holds a run: its checkpoints are removed and final/ "
                         "replaced (without it a finished final/ is never overwritten)", False)
    report_to: list[str] = _h("jsonl, tensorboard, wandb", factory=lambda: ["jsonl", "tensorboard"])
    progress: bool = _h("show a progress bar", True)
    save_final: bool = _h("save_pretrained the final model to <output_dir>/final", True)
    deterministic: bool = _h("torch deterministic algorithms (exact resume on CPU)", False)
    check_disk_space: bool = _h("refuse to start when output_dir's disk has less free space than the estimated "
                                "checkpoints + final model (from the parameter count)", True)
    push_to_hub: str | None = _h("hub repo id (owner/name) the final model and its model card are uploaded to at "
                                 "the end (token: HF_TOKEN in the environment)", None)
    hub_private: bool = _h("create the push_to_hub repo as private", True)

    def validate(self) -> list[str]:
        errs = []
        if self.push_to_hub is not None:
            if not re.fullmatch(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*", self.push_to_hub):
                errs.append(f"push_to_hub={self.push_to_hub!r} is not a hub repo id; fix: owner/name, e.g. "
                            "push_to_hub=me/tiny-dpo")
            if not self.save_final:
                errs.append("push_to_hub uploads final/, which save_final=false does not write; fix: drop one")
        for name in ("batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                errs.append(f"{name}={getattr(self, name)} must be >= 1")
        bad = sorted(set(self.report_to) - {"jsonl", "tensorboard", "wandb"})
        if bad:
            errs.append(f"report_to has {bad}; allowed: ['jsonl', 'tensorboard', 'wandb']")
        elif "wandb" in self.report_to and extras.missing_modules("wandb"):
            errs.append("report_to includes wandb, which is not installed; fix: pip install 'mmalign[wandb]' (and "
                        "wandb login), or drop it from report_to")
        if self.overwrite and self.resume not in ("auto", "force", "never"):
            errs.append(f"overwrite=true starts over, resume={self.resume!r} resumes a checkpoint: set one of them")
        if self.max_steps is not None and self.max_steps < 1:
            errs.append(f"max_steps={self.max_steps} must be >= 1 or null")
        errs += in_range("epochs", self.epochs, 0, low_open=True, example="1")
        for name in ("save_every", "eval_every", "seed"):
            if getattr(self, name) < 0:
                errs.append(f"{name}={getattr(self, name)} must be >= 0 (0: {_ZERO[name]})")
        if self.eval_batches is not None and self.eval_batches < 1:
            errs.append(f"eval_batches={self.eval_batches} must be >= 1 or null (null: the whole eval set)")
        return errs


_ZERO = {"save_every": "only the final model", "eval_every": "evaluate only at the end", "seed": "a valid seed"}


def _modality_help() -> str:
    rows = "; ".join(f"{row.name}: {row.summary}" for row in MODALITIES.values())
    return f"which model family builds the task (a row of mmalign.registry.MODALITIES) — {rows}"


def _with_modality_sections(cls: type) -> type:
    """Add one always-present section per registry row that declares one (``diffusion:``, ``clip:``, ...), in
    table order before ``options``, so that a new family's section needs no edit here."""
    notes = dict(cls.__annotations__)
    options = notes.pop("options")
    for row in MODALITIES.values():
        if row.section:
            schema = resolve(row.section_schema)
            notes[row.section] = schema
            setattr(cls, row.section, field(default_factory=schema))
    notes["options"] = options
    cls.__annotations__ = notes
    return cls


@dataclass
@_with_modality_sections
class TrainConfig:
    """A whole run: model, data, loss, reference, optimiser, loop settings and optional stages; plus one section
    per model family that has one (:data:`mmalign.registry.MODALITIES`: ``diffusion``, ``clip``, ``prior``)."""

    modality: ModalityName = _h(_modality_help(), "text")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retain: DataConfig | None = _h("unlearning: retain-set data (NLL/KL terms keep utility)", None)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    stages: list[StageConfig] = _h("a list of stages (curricula, pre-SFT alignment); empty: one stage", factory=list)
    # (the families' sections go here: see _with_modality_sections)
    options: dict[str, Any] = _h("recipe-specific options (negatives, online generation, guidance, ...): each "
                                 "recipe checks them against its own typed schema and reports every error",
                                 factory=dict)

    def validate(self) -> list[str]:
        # An empty data.train is refused by mmalign.api.build_task, which knows the loss's row (data-free recipes
        # such as Self-NPO make their own inputs); this layer sits below the methods table.
        errs = []
        if self.reference.strategy == "adapter" and not self.lora.enabled:
            errs.append("reference.strategy=adapter needs lora.enabled=true (the reference is the base without it)")
        names = [s.name for s in self.stages]
        if len(names) != len(set(names)):
            errs.append(f"stage names must be unique; got {names}")
        row = MODALITIES[self.modality]
        check = getattr(getattr(self, row.section), "tiny_problems", None) if row.section else None
        if self.model.name_or_path == "tiny":  # the family's own model.tiny rules, else the generic ones
            errs += check(self.model.tiny) if check is not None else _tiny_problems(self.model.tiny)
        return errs


def __getattr__(name: str):
    """The families' section classes (``from mmalign.schema import PriorConfig``), named by the registry."""
    for row in MODALITIES.values():
        if row.section_schema and row.section_schema.rpartition(":")[2] == name:
            return resolve(row.section_schema)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
