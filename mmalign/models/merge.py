"""LoRA → full weights: a saved adapter directory merged into its base and written as a checkpoint that loads
without ``peft`` (``mmalign merge`` and ``run.merge_lora_at_end``'s ``final_merged/``).

One function per family, each reading the directory the way a user would (the same loaders as ``mmalign
sample``) and writing the layout its plain class reads:

- **text** (causal LMs, reward models with a value head, SparsePO runs): ``load_causal_lm`` (base from
  ``adapter_config.json``, or the ``base/`` saved beside a tiny run's adapter) → PEFT ``merge_and_unload`` →
  ``save_pretrained`` + the tokenizer; ``AutoModelForCausalLM.from_pretrained(out)`` reads it. Files of the
  adapter directory that are not part of the adapter (``value_head.safetensors``, ``sparsepo_mask_heads.pt``,
  a chat template) are carried over.
- **LVLM** (LLaVA, PatchLVLM): ``load_lvlm`` → ``merge_and_unload`` (PatchLVLM: on its language model) →
  ``save_lvlm``; ``LlavaForConditionalGeneration.from_pretrained(out)`` / ``PatchLVLM.from_pretrained(out)``.
- **diffusion**: the base pipeline's ``load_lora_weights`` → ``fuse_lora`` → ``unload_lora_weights`` (diffusers'
  own fusing path, so the merged weights are what diffusers users get) → the denoiser as ``unet/`` or
  ``transformer/``, i.e. the layout of a full fine-tuning run's ``final/`` (``mmalign_diffusion.json`` with
  ``format: full``, the trained ``scheduler/``, a tiny base's ``base_pipeline/``).
  ``UNet2DConditionModel.from_pretrained(out, subfolder="unet")`` reads it; the frozen VAE and text encoders stay
  in the base pipeline (not copied: for SDXL they are ~5 GB).

Merging is exact up to float rounding: W' = W + (α/r)·B·A, so the merged model's outputs equal the adapter
model's to ~1e-6 in float32 (tests/eval/test_merge.py). Merging in bfloat16 rounds W' to bfloat16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..config import ModelLoadError, ModelNotFound

__all__ = ["NothingToMerge", "lora_keys", "merge_adapter", "merge_kind"]

DIFFUSION_INFO = "mmalign_diffusion.json"  # = mmalign.sample.diffusion.INFO_FILE (written by save_denoiser_run)
PATCH_CONFIG = "patch_lvlm.json"  # = mmalign.models.lvlm.PATCH_CONFIG_FILE
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"
# Files of a PEFT adapter directory that the merged checkpoint replaces (everything else is carried over).
_LORA_MARKS = ("lora_", ".lora.", ".base_layer.")
_ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"}


class NothingToMerge(ModelLoadError):
    """The directory holds full weights already (no LoRA adapter)."""


def merge_kind(path: str | Path) -> str:
    """``"text"``, ``"lvlm"`` or ``"diffusion"``: which family's adapter ``path`` holds. Raises
    :class:`NothingToMerge` for full weights and ``ModelNotFound`` for a directory that is no model."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelNotFound(f"merge: no directory at {str(path)!r}; pass a run's final/ directory (a LoRA run) or a "
                            "PEFT / diffusers LoRA adapter directory")
    if (path / DIFFUSION_INFO).is_file():
        fmt = json.loads((path / DIFFUSION_INFO).read_text()).get("format")
        if fmt != "lora":
            raise NothingToMerge(f"merge: {path} holds a full fine-tuned denoiser ({DIFFUSION_INFO}: format "
                                 f"{fmt!r}), not a LoRA adapter: it needs no merge; load it as it is")
        return "diffusion"
    if (path / DIFFUSERS_LORA).is_file():
        return "diffusion"  # diffusers' training scripts' layout (base pipeline given with --base)
    adapter = path / "adapter_config.json"
    if (path / PATCH_CONFIG).is_file():
        if not adapter.is_file():
            raise NothingToMerge(f"merge: {path} is a PatchLVLM with full weights (no adapter_config.json): it "
                                 "needs no merge")
        return "lvlm"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path") or ""
        for cand in (Path(base).expanduser(), path / "base"):
            cfg = cand / "config.json"
            if cfg.is_file():
                return "lvlm" if json.loads(cfg.read_text()).get("model_type") == "llava" else "text"
        return "text"  # a hub id as base: load_causal_lm reports what is missing
    present = sorted(p.name for p in path.iterdir())
    if (path / "config.json").is_file() or (path / "model_index.json").is_file():
        raise NothingToMerge(f"merge: {path} holds full weights (config.json / model_index.json, no "
                             "adapter_config.json): it needs no merge; load it as it is")
    raise ModelNotFound(f"merge: {path} holds no LoRA adapter (no adapter_config.json, {DIFFUSION_INFO} or "
                        f"{DIFFUSERS_LORA}; it holds {present or 'nothing'}); pass the final/ directory of a run "
                        "trained with lora.enabled=true")


def merge_adapter(path: str | Path, out: str | Path, *, dtype: str = "float32", base: str | Path | None = None,
                  kind: str | None = None) -> dict:
    """Merge the LoRA adapter in ``path`` into its base and write full weights to ``out`` (created; the caller
    writes to a temporary directory and renames it, see :func:`mmalign.train.final_save.write_atomically`).
    ``base``: diffusion only, the base pipeline directory when ``path`` does not record a local one.
    Returns what was merged (``kind``, ``source``, ``dtype``, ``class``)."""
    path, out = Path(path).expanduser(), Path(out)
    kind = kind or merge_kind(path)
    if base is not None and kind != "diffusion":
        raise ModelLoadError(f"merge: --base is for diffusion LoRA directories; {path} is a {kind} adapter, whose "
                             "adapter_config.json names its base")
    out.mkdir(parents=True, exist_ok=True)
    fn = {"text": _merge_text, "lvlm": _merge_lvlm, "diffusion": _merge_diffusion}[kind]
    cls = fn(path, out, dtype, base) if kind == "diffusion" else fn(path, out, dtype)
    return {"kind": kind, "source": str(path), "dtype": dtype, "class": cls}


def _merge_text(path: Path, out: Path, dtype: str) -> str:
    from transformers import AutoTokenizer

    from .text import VALUE_HEAD_FILE, load_causal_lm

    value_head = (path / VALUE_HEAD_FILE).is_file()
    model = load_causal_lm(path, dtype=dtype, value_head=value_head)
    peft_model = model.base if value_head else model  # reward models: the LM is in .base
    if not hasattr(peft_model, "merge_and_unload"):
        raise NothingToMerge(f"merge: {path} loads as a model without a LoRA adapter: it needs no merge")
    merged = peft_model.merge_and_unload()
    if value_head:
        model.base = merged
    else:
        model = merged
    model.save_pretrained(str(out))  # a ValueHeadModel also writes value_head.safetensors
    # the tokenizer as saved (not load_tokenizer's, which would add a pad token and padding side to its files)
    AutoTokenizer.from_pretrained(str(path)).save_pretrained(str(out))
    _carry_over(path, out)
    return type(merged).__name__


def _carry_over(src: Path, out: Path) -> None:
    """Top-level files of the adapter directory that the merge did not write (mask heads, extra metadata)."""
    for p in src.iterdir():
        if p.is_file() and p.name not in _ADAPTER_FILES and not (out / p.name).exists():
            shutil.copy2(p, out / p.name)


def _merge_lvlm(path: Path, out: Path, dtype: str) -> str:
    from .lvlm import PatchLVLM, load_lvlm, save_lvlm

    model, inputs = load_lvlm(path, dtype=dtype)
    if isinstance(model, PatchLVLM) and hasattr(model.lm, "merge_and_unload"):
        model.lm = model.lm.merge_and_unload()
    elif hasattr(model, "merge_and_unload") and not isinstance(model, PatchLVLM):
        model = model.merge_and_unload()
    else:
        raise NothingToMerge(f"merge: {path} loads as an LVLM without a LoRA adapter: it needs no merge")
    save_lvlm(model, inputs, out)
    return type(model).__name__


def _merge_diffusion(path: Path, out: Path, dtype: str, base: str | Path | None) -> str:
    from ..sample import diffusion as SD

    info_file = path / DIFFUSION_INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if base is None and not info:
        raise ModelLoadError(f"merge: {path} holds a diffusers LoRA ({DIFFUSERS_LORA}) without {DIFFUSION_INFO}, so "
                             "its base is unknown; pass the base pipeline directory with --base")
    comps = SD.load_components(base if base is not None else path, dtype=dtype)
    if base is not None and (path / "scheduler" / "scheduler_config.json").is_file():
        comps.scheduler = type(comps.scheduler).from_pretrained(str(path / "scheduler"))  # the trained schedule
    if info.get("kind") not in (None, comps.kind):
        raise ModelLoadError(f"merge: {info_file} records a {info['kind']!r} model but the base pipeline is "
                             f"{comps.kind!r}; pass the base it was trained on with --base")
    pipe = comps.pipeline()  # comps was loaded here: fusing into its denoiser changes no one else's model
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # drops the PEFT layers; the fused weights stay
    sub = SD.denoiser_name(pipe)
    net = getattr(pipe, sub)
    net.save_pretrained(str(out / sub))
    comps.scheduler.save_pretrained(str(out / "scheduler"))
    if (path / "base_pipeline").is_dir():  # a tiny base, which cannot be found again from a path
        shutil.copytree(path / "base_pipeline", out / "base_pipeline")
    recorded = str(base) if base is not None else info.get("base", "")
    meta = {"kind": comps.kind, "prediction_type": comps.prediction_type, **info, "format": "full",
            "base": recorded, "merged_from": str(path)}
    (out / DIFFUSION_INFO).write_text(json.dumps(meta, indent=2, default=str))
    return type(net).__name__


def lora_keys(path: str | Path) -> list[str]:
    """Tensor names of LoRA layers in the safetensors files under ``path`` (headers only): PEFT's ``lora_A`` /
    ``lora_B`` / ``.base_layer.``, diffusers' ``.lora.down`` / ``.lora.up``, kohya's ``lora_down``. A merged
    checkpoint has none, so its plain class loads every weight."""
    from safetensors import safe_open

    found = []
    for f in sorted(Path(path).rglob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            found += [f"{f.relative_to(path)}:{k}" for k in st.keys() if any(m in k for m in _LORA_MARKS)]
    return found
