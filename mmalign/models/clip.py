"""CLIP-family builders: tiny random models for tests/demos, real checkpoints, and saving them back.

One bundle type out (:class:`ClipBundle`: model + tokenizer + image transform), two model families:

- **open_clip** (``open_clip.CLIP`` / ``CustomTextCLIP``): ``tiny`` builds a random ViT from
  :data:`TINY_OPEN_CLIP` in-process; a built-in name (``ViT-B-32``) takes ``pretrained`` (a checkpoint file, or a
  tag where a hub is reachable); a directory holding ``open_clip_config.json`` + weights is loaded with
  ``open_clip.create_model_and_transforms("local-dir:DIR")``, the path users take, and is what
  :func:`save_clip` writes for this family (the ``hf-hub`` layout of ``open_clip.push_to_hf_hub``).
- **transformers** ``CLIPModel`` / ``SiglipModel`` (a directory with ``config.json``): ``from_pretrained``;
  ``tiny-hf`` builds a random tiny ``CLIPModel``.

The tokenizer of the tiny models is open_clip's bundled ``SimpleTokenizer`` (the OpenAI CLIP BPE, shipped inside
the wheel, so nothing downloads); a transformers checkpoint saved with it records that in ``mmalign_clip.json``.
Images go through open_clip's eval transform (resize shortest side, centre crop, normalise) built from the
model's preprocess config, for both families: it is deterministic, which precomputed teacher features need.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError
from .load_checks import check_finite, check_weight_files, hub_error, loading

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
META_FILE = "mmalign_clip.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"

# A ViT-CLIP of ~1.8M parameters, ~1.6M of them the 49408-token embedding of the real CLIP BPE vocabulary.
TINY_OPEN_CLIP: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}
# Flat override keys accepted by ``model.tiny`` (mapped into the nested config).
_TINY_KEYS = {"embed_dim": ("embed_dim",), "image_size": ("vision_cfg", "image_size"),
              "patch_size": ("vision_cfg", "patch_size"), "vision_width": ("vision_cfg", "width"),
              "vision_layers": ("vision_cfg", "layers"), "context_length": ("text_cfg", "context_length"),
              "text_width": ("text_cfg", "width"), "text_layers": ("text_cfg", "layers"),
              "text_heads": ("text_cfg", "heads"), "init_logit_scale": ("init_logit_scale",),
              "init_logit_bias": ("init_logit_bias",)}


class ClipTokenizer:
    """Texts → ``(input_ids [N, L], attention_mask [N, L])`` for either family's tokenizer.

    ``kind="open_clip"``: an open_clip tokenizer (``SimpleTokenizer``/``HFTokenizer``), padded with ``pad_id``;
    ``kind="hf"``: a transformers tokenizer, padded to ``context_length`` (SigLIP needs max-length padding).
    """

    def __init__(self, tokenizer: Any, *, kind: str, context_length: int, pad_id: int = 0):
        if kind not in ("open_clip", "hf"):
            raise ValueError(f"kind={kind!r} is not one of ['hf', 'open_clip']")
        self.tokenizer, self.kind, self.context_length, self.pad_id = tokenizer, kind, context_length, pad_id

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        if self.kind == "open_clip":
            ids = self.tokenizer(list(texts))
            if ids.shape[1] != self.context_length:  # HFTokenizer wrappers may ignore the argument
                ids = ids[:, : self.context_length]
            return ids.long(), (ids != self.pad_id).long()
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                             return_tensors="pt")
        return enc["input_ids"], enc.get("attention_mask", torch.ones_like(enc["input_ids"]))


@dataclass
class ClipBundle:
    """A contrastive model with what it needs to read data.

    Attributes:
        model: ``open_clip.CLIP``/``CustomTextCLIP`` or transformers ``CLIPModel``/``SiglipModel``.
        tokenizer: texts → ids and mask.
        transform: PIL image → ``[3, H, W]`` float tensor (the eval transform).
        family: ``"open_clip"`` or ``"hf"``.
        model_cfg: the open_clip model config (what :func:`save_clip` writes); None for transformers.
        preprocess_cfg: image size, mean, std, interpolation, resize mode.
        source: where it came from (for messages and cache keys).
    """

    model: nn.Module
    tokenizer: ClipTokenizer
    transform: Callable
    family: str
    model_cfg: dict | None = None
    preprocess_cfg: dict = field(default_factory=dict)
    source: str = ""


def family_of(model: nn.Module) -> str:
    """``"open_clip"`` or ``"hf"`` by class (no name sniffing); anything else is an error naming the class."""
    import open_clip

    model = getattr(model, "module", model)
    if isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP)):
        return "open_clip"
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel) and hasattr(model, "get_image_features"):
        return "hf"
    raise TypeError(f"{type(model).__name__} is not a supported contrastive model: use an open_clip CLIP/"
                    "CustomTextCLIP or a transformers CLIPModel/SiglipModel")


def _eval_transform(preprocess_cfg: dict) -> Callable:
    import open_clip

    p = preprocess_cfg
    return open_clip.image_transform(p["size"], is_train=False, mean=tuple(p["mean"]), std=tuple(p["std"]),
                                     resize_mode=p.get("resize_mode"), interpolation=p.get("interpolation"),
                                     fill_color=p.get("fill_color", 0))


def _preprocess_cfg(size: int, mean=None, std=None, **extra) -> dict:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return {"size": size, "mean": list(mean or OPENAI_DATASET_MEAN), "std": list(std or OPENAI_DATASET_STD),
            "interpolation": extra.get("interpolation", "bicubic"), "resize_mode": extra.get("resize_mode", "shortest"),
            "fill_color": 0}


def tiny_open_clip_config(**overrides: Any) -> dict:
    """:data:`TINY_OPEN_CLIP` with flat overrides (``embed_dim``, ``image_size``, ``vision_width``, ...)."""
    cfg = copy.deepcopy(TINY_OPEN_CLIP)
    bad = sorted(set(overrides) - set(_TINY_KEYS))
    if bad:
        raise ConfigError(f"model.tiny has unknown keys {bad} for a tiny CLIP; valid: {sorted(_TINY_KEYS)}")
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = _TINY_KEYS[key]
        for p in parents:
            node = node[p]
        node[leaf] = value
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    sizes = {"embed_dim": cfg["embed_dim"], "image_size": v["image_size"], "patch_size": v["patch_size"],
             "vision_width": v["width"], "vision_layers": v["layers"], "context_length": t["context_length"],
             "text_width": t["width"], "text_heads": t["heads"], "text_layers": t["layers"]}
    errors = _size_problems(sizes)
    if not errors:  # open_clip's ViT has width // head_width heads; its text tower width // heads per head
        if v["image_size"] % v["patch_size"]:
            errors.append(f"model.tiny.image_size={v['image_size']} must be a multiple of patch_size={v['patch_size']}")
        if v["width"] % v["head_width"]:
            errors.append(f"model.tiny.vision_width={v['width']} must be a multiple of head width {v['head_width']}")
        if t["width"] % t["heads"]:
            errors.append(f"model.tiny.text_width={t['width']} must be divisible by text_heads={t['heads']}")
    if errors:
        raise ConfigError(errors)
    return cfg


def _size_problems(sizes: dict[str, Any]) -> list[str]:
    return [f"model.tiny.{k}={v!r} must be an integer >= 1" for k, v in sizes.items()
            if isinstance(v, bool) or not isinstance(v, int) or v < 1]


def build_open_clip(model_cfg: dict, *, seed: int = 0, source: str = "tiny") -> ClipBundle:
    """A random open_clip model from a config dict (the ``model_cfg`` of ``open_clip_config.json``)."""
    import open_clip

    cfg = copy.deepcopy(model_cfg)
    custom_text = cfg.pop("custom_text", False)
    torch.manual_seed(seed)
    model = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**cfg)
    if custom_text:
        cfg["custom_text"] = True
    ctx = cfg["text_cfg"].get("context_length", 77)
    prep = _preprocess_cfg(cfg["vision_cfg"].get("image_size", 224))
    tok = ClipTokenizer(open_clip.SimpleTokenizer(context_length=ctx), kind="open_clip", context_length=ctx)
    return ClipBundle(model, tok, _eval_transform(prep), "open_clip", cfg, prep, source)


def build_tiny_hf_clip(*, seed: int = 0, embed_dim: int = 32, image_size: int = 32, patch_size: int = 8,
                       hidden_size: int = 32, layers: int = 2, context_length: int = 16) -> ClipBundle:
    """A random tiny transformers ``CLIPModel`` with open_clip's SimpleTokenizer (same BPE ids as CLIP's)."""
    import open_clip
    from transformers import CLIPConfig, CLIPModel

    sizes = {"embed_dim": embed_dim, "image_size": image_size, "patch_size": patch_size, "hidden_size": hidden_size,
             "layers": layers, "context_length": context_length}
    errors = _size_problems(sizes)
    if not errors and image_size % patch_size:
        errors.append(f"model.tiny.image_size={image_size} must be a multiple of patch_size={patch_size}")
    if not errors and hidden_size % 2:
        errors.append(f"model.tiny.hidden_size={hidden_size} must be even (2 attention heads)")
    if errors:
        raise ConfigError(errors)
    common = {"hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, "num_hidden_layers": layers,
              "num_attention_heads": 2}
    config = CLIPConfig(text_config={**common, "vocab_size": 49408, "max_position_embeddings": context_length},
                        vision_config={**common, "image_size": image_size, "patch_size": patch_size},
                        projection_dim=embed_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    prep = _preprocess_cfg(image_size)
    tok = ClipTokenizer(open_clip.SimpleTokenizer(context_length=context_length), kind="open_clip",
                        context_length=context_length)
    return ClipBundle(model, tok, _eval_transform(prep), "hf", None, prep, "tiny-hf")


def _load_open_clip(name: str, *, pretrained: str | None, source: str, model_kwargs: dict) -> ClipBundle:
    import open_clip
    from open_clip.factory import get_model_config
    from open_clip.transform import PreprocessCfg

    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained, **model_kwargs)
    tok = open_clip.get_tokenizer(name)
    model_cfg = {**(get_model_config(name) or {}), **model_kwargs}
    ctx = int(model_cfg.get("text_cfg", {}).get("context_length", 77))
    pad_id = int(model_cfg.get("text_cfg", {}).get("pad_id", 0))
    prep = {**PreprocessCfg().__dict__, **getattr(model.visual, "preprocess_cfg", {})}
    prep["mean"], prep["std"] = list(prep["mean"]), list(prep["std"])
    tokenizer = ClipTokenizer(tok, kind="open_clip", context_length=ctx, pad_id=pad_id)
    return ClipBundle(model, tokenizer, _eval_transform(prep), "open_clip", model_cfg, prep, source)


def _load_hf(path: str) -> ClipBundle:
    import open_clip
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    local = Path(path).exists()
    try:
        with loading(path) if local else contextlib.nullcontext():
            config = AutoConfig.from_pretrained(path)
            model = AutoModel.from_pretrained(path)
    except OSError as err:
        if local:  # already a ModelFileError naming the directory
            raise
        raise hub_error(path, err) from err
    family_of(model)  # raises for a transformers model that is not a dual encoder
    text_cfg = getattr(config, "text_config", config)
    ctx = int(getattr(text_cfg, "max_position_embeddings", 77))
    meta_path = Path(path) / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("tokenizer") == "open_clip_simple":
        tok = ClipTokenizer(open_clip.SimpleTokenizer(context_length=ctx), kind="open_clip", context_length=ctx)
    else:
        tok = ClipTokenizer(AutoTokenizer.from_pretrained(path), kind="hf", context_length=ctx)
    size, mean, std = int(config.vision_config.image_size), None, None
    proc_path = Path(path) / "preprocessor_config.json"
    if proc_path.is_file():
        proc = json.loads(proc_path.read_text())
        mean, std = proc.get("image_mean"), proc.get("image_std")
    prep = _preprocess_cfg(size, mean, std)
    return ClipBundle(model, tok, _eval_transform(prep), "hf", None, prep, str(path))


def load_clip(name_or_path: str, *, pretrained: str | None = None, dtype: str = "float32", seed: int = 0,
              tiny: dict | None = None, init_logit_bias: float | None = None,
              gradient_checkpointing: bool = False) -> ClipBundle:
    """Build or load a contrastive model (see the module docstring for the accepted forms).

    ``init_logit_bias`` adds a learnable SigLIP bias to an open_clip model that has none (tiny models get it at
    construction). Raises :class:`~mmalign.config.ConfigError` naming ``model.name_or_path`` for unusable sources.
    """
    import open_clip

    tiny = dict(tiny or {})
    if init_logit_bias is not None:
        tiny.setdefault("init_logit_bias", init_logit_bias)
    if name_or_path == "tiny":
        bundle = build_open_clip(tiny_open_clip_config(**tiny), seed=seed)
    elif name_or_path == "tiny-hf":
        tiny.pop("init_logit_bias", None)
        import inspect

        valid = [k for k in inspect.signature(build_tiny_hf_clip).parameters if k != "seed"]
        if set(tiny) - set(valid):
            raise ConfigError(f"model.tiny has unknown keys {sorted(set(tiny) - set(valid))} for a tiny transformers "
                              f"CLIP (tiny-hf); valid: {valid}")
        bundle = build_tiny_hf_clip(seed=seed, **tiny)
    else:
        path = Path(name_or_path)
        kwargs = {"init_logit_bias": init_logit_bias} if init_logit_bias is not None else {}
        if path.is_dir() and (path / OPEN_CLIP_CONFIG).is_file():
            _require_weights(path, [OPEN_CLIP_WEIGHTS, "open_clip_pytorch_model.bin"])
            with loading(path):
                bundle = _load_open_clip(f"local-dir:{path}", pretrained=None, source=str(path), model_kwargs={})
        elif path.is_dir() and (path / "config.json").is_file():
            _require_weights(path, ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"])
            bundle = _load_hf(str(path))
        elif path.is_dir():
            raise ConfigError(f"model.name_or_path: directory {str(path)!r} has neither {OPEN_CLIP_CONFIG} (open_clip) "
                              "nor config.json (transformers); point it at a saved model directory")
        elif path.suffix == ".json" and path.is_file():
            if pretrained and Path(pretrained).suffix == ".safetensors" and Path(pretrained).is_file():
                check_weight_files(Path(pretrained).parent, [Path(pretrained)])
            with loading(path, "open_clip model config / clip.pretrained weights"):
                open_clip.add_model_config(path)  # registers it under the file's stem
                bundle = _load_open_clip(path.stem, pretrained=pretrained, source=str(path), model_kwargs=kwargs)
        elif name_or_path in open_clip.list_models() or name_or_path.startswith("hf-hub:"):
            bundle = _load_open_clip(name_or_path, pretrained=pretrained, source=name_or_path, model_kwargs=kwargs)
        elif "/" in name_or_path and not path.exists():  # a transformers hub id, where a hub is reachable
            bundle = _load_hf(name_or_path)
        else:
            raise ConfigError(f"model.name_or_path={name_or_path!r}: not 'tiny'/'tiny-hf', an existing model "
                              "directory, an open_clip model config .json, or an open_clip model name (e.g. "
                              "ViT-B-32 with clip.pretrained=/path/to/weights.pt)")
    model = bundle.model
    if name_or_path not in ("tiny", "tiny-hf"):
        check_finite(model, name_or_path)
    if init_logit_bias is not None and bundle.family == "open_clip" and getattr(model, "logit_bias", None) is None:
        model.logit_bias = nn.Parameter(torch.full_like(model.logit_scale.data, float(init_logit_bias)))
        if bundle.model_cfg is not None:
            bundle.model_cfg["init_logit_bias"] = float(init_logit_bias)
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    model.to(DTYPES[dtype])
    if gradient_checkpointing:
        if bundle.family == "open_clip":
            model.set_grad_checkpointing(True)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return bundle


def _require_weights(path: Path, names: list[str]) -> None:
    """A model directory must hold one of the weight files ``names``; their safetensors headers must read."""
    from ..config import ModelNotFound
    from .load_checks import incomplete_hint

    if not any((path / n).is_file() for n in names):
        raise ModelNotFound(f"model directory {str(path)!r} holds no weights (none of {names}; it holds "
                            f"{sorted(p.name for p in path.iterdir())}); download the full checkpoint or save it again "
                            f"with save_clip{incomplete_hint(path)}")
    check_weight_files(path)


def save_clip(bundle: ClipBundle, path: str | Path, model: nn.Module | None = None, *,
              state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write ``model`` (default: the bundle's) so that :func:`load_clip` and the family's own loader read it:
    open_clip → ``open_clip_config.json`` + ``open_clip_model.safetensors`` (``local-dir:`` loadable);
    transformers → ``save_pretrained`` + an image-processor config + the tokenizer (or a note naming
    open_clip's SimpleTokenizer). ``state_dict`` replaces the model's weights in the files (weight averages)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = getattr(model or bundle.model, "module", model or bundle.model)
    if bundle.family == "open_clip":
        if bundle.model_cfg is None:
            raise ValueError("this open_clip bundle has no model_cfg to write; build it with load_clip")
        state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
        save_file(state, str(path / OPEN_CLIP_WEIGHTS))
        (path / OPEN_CLIP_CONFIG).write_text(json.dumps(
            {"model_cfg": bundle.model_cfg, "preprocess_cfg": bundle.preprocess_cfg}, indent=1))
        return path
    from transformers import CLIPImageProcessor

    model.save_pretrained(str(path), state_dict=state_dict)
    p = bundle.preprocess_cfg
    CLIPImageProcessor(size={"shortest_edge": p["size"]}, crop_size={"height": p["size"], "width": p["size"]},
                       image_mean=p["mean"], image_std=p["std"]).save_pretrained(str(path))
    if bundle.tokenizer.kind == "hf":
        bundle.tokenizer.tokenizer.save_pretrained(str(path))
    else:
        (path / META_FILE).write_text(json.dumps({"tokenizer": "open_clip_simple",
                                                  "context_length": bundle.tokenizer.context_length}))
    return path


# -- LoRA ------------------------------------------------------------------------------------------------------


def clip_lora_targets(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` of the model except those inside ``nn.MultiheadAttention``: open_clip's attention calls
    ``F.multi_head_attention_forward`` with ``out_proj.weight`` directly, so a LoRA wrapper there would never run
    (peft's "all-linear" would pick it and silently train nothing). HF CLIP has no such module: all its linears."""
    inside_mha = {f"{name}.{child}" if name else child
                  for name, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)
                  for child, _ in mod.named_modules() if child}
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and name not in inside_mha]


def apply_clip_lora(model: nn.Module, *, r: int, alpha: int, dropout: float = 0.0,
                    target_modules: str | list[str] = "all-linear") -> nn.Module:
    """Inject LoRA adapters in place (``peft.inject_adapter_in_model``: the model keeps its class, so open_clip's
    ``encode_image``/``encode_text`` and HF's ``get_*_features`` work unchanged); only the adapters train.
    ``"all-linear"`` means :func:`clip_lora_targets`."""
    from peft import LoraConfig, inject_adapter_in_model

    allowed = clip_lora_targets(model)
    if target_modules == "all-linear":
        targets = allowed
    else:  # names as peft matches them: a full module path or its last component(s)
        targets = list(target_modules)
        unmatched = [t for t in targets if not any(a == t or a.endswith(f".{t}") for a in allowed)]
        if unmatched:
            raise ConfigError(f"lora.target_modules {unmatched} match no linear layer that runs in this CLIP model "
                              "(LoRA supports nn.Linear here, and linears inside nn.MultiheadAttention are never "
                              f"called); e.g. {sorted({a.rsplit('.', 1)[-1] for a in allowed})[:8]} or 'all-linear'")
        targets = [a for a in allowed if any(a == t or a.endswith(f".{t}") for t in targets)]
    if not targets:
        raise ConfigError("lora: no linear layer to adapt in this CLIP model; set lora.target_modules")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def merge_lora_state(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` (keys of a LoRA-injected ``model``; possibly averaged or gathered weights, not the live ones) with
    every adapter folded into its base weight, W + scaling·B·A, and the keys of the plain model: what
    :func:`save_clip` writes and :func:`load_clip` reads back without peft."""
    from peft.tuners.lora import Linear as LoraLinear

    state = dict(state)
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLinear):
            for adapter in mod.active_adapters:
                a = state.pop(f"{name}.lora_A.{adapter}.weight").float()
                b = state.pop(f"{name}.lora_B.{adapter}.weight").float()
                key = f"{name}.base_layer.weight"
                state[key] = (state[key].float() + mod.scaling[adapter] * (b @ a)).to(state[key].dtype)
    left = sorted(k for k in state if ".lora_" in k)
    if left:  # an adapter type this merge does not fold would otherwise be dropped silently
        raise ValueError(f"merge_lora_state: LoRA weights {left[:3]} belong to no peft lora.Linear; only linear "
                         "adapters can be merged into a saved CLIP model")
    return {k.replace(".base_layer.", "."): v for k, v in state.items()}


def has_lora(model: nn.Module) -> bool:
    return any(".lora_" in name for name, _ in model.named_parameters())
