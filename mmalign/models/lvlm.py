"""Vision-language models for PRIOR (arXiv 2505.08971): one with a visual encoder, one without.

Both read the same inputs, ``input_ids`` with ``num_image_tokens`` copies of an ``<image>`` placeholder right
after BOS, plus ``pixel_values`` ``[B, C, H, W]``; the placeholders' embeddings are replaced by image features
(LLaVA's ``masked_scatter`` rule), so one scorer serves both (the LVLM family's adapter,
:mod:`mmalign.adapters.lvlm`, which also encodes each image once and shares it across candidates):

- ``"llava"`` (with a visual encoder, PRIOR's H-LVLM setting): ``transformers``' ``LlavaForConditionalGeneration``
  (CLIP vision tower → MLP projector → Llama/Qwen LM). :func:`build_tiny_lvlm` makes a random one in-process
  with a tiny ``CLIPVisionConfig`` and a tiny Llama, plus a ``LlavaProcessor`` built offline.
- ``"patch"`` (no visual encoder, PRIOR's U-LVLM / encoder-free setting, Fuyu-style): :class:`PatchLVLM`,
  image patches → one ``Linear`` → placed at the placeholder positions of a plain causal LM.

Checkpoints round-trip through :func:`save_lvlm` / :func:`load_lvlm` (``save_pretrained`` /
``from_pretrained`` underneath, the path users take for real checkpoints such as ``llava-hf/llava-1.5-7b-hf``).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ConfigError, ModelLoadError, ModelNotADirectory, ModelNotFound
from .load_checks import check_finite, check_weight_files, incomplete_hint, loading
from .text import _DTYPE_KWARG, DTYPES, build_tiny_causal_lm, load_causal_lm, tiny_llama_config

IMAGE_TOKEN = "<image>"
PATCH_CONFIG_FILE = "patch_lvlm.json"
PATCH_WEIGHTS_FILE = "patch_embed.safetensors"
KINDS = ("llava", "patch")
# Keys of ``model.tiny`` that configure the image side; the rest go to the tiny Llama.
VISION_KEYS = ("image_size", "patch_size", "vision_hidden_size", "vision_layers", "vision_heads",
               "vision_intermediate_size")


@dataclass
class LVLMInputs:
    """How captions and images become model inputs: tokenizer, placeholder token, image preprocessing.

    ``processor`` is the ``LlavaProcessor`` of a LLaVA model (saved with its checkpoints); a :class:`PatchLVLM`
    carries its preprocessing settings in its own config (``patch_image``).
    """

    kind: str
    tokenizer: Any
    image_token_id: int
    num_image_tokens: int
    processor: Any = None
    patch_image: dict | None = None  # image_size, image_mean, image_std of a PatchLVLM

    def pixel_values(self, images: Sequence) -> Tensor:
        """``[B, C, H, W]`` float pixels for a list of PIL images (RGB)."""
        if self.kind == "llava":
            return torch.as_tensor(self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"])
        p = self.patch_image or {}
        size = int(p["image_size"])
        mean = torch.tensor(p["image_mean"]).view(-1, 1, 1)
        std = torch.tensor(p["image_std"]).view(-1, 1, 1)
        out = []
        for im in images:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), resample=3)  # bicubic, as CLIP's processor
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
            out.append((x - mean) / std)
        return torch.stack(out)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        if self.processor is not None:
            self.processor.save_pretrained(str(path))
        else:
            self.tokenizer.save_pretrained(str(path))


# -- encoder-free LVLM -------------------------------------------------------------------------------------


class PatchLVLM(nn.Module):
    """A causal LM reading raw image patches: patchify → ``Linear(C·p·p, hidden)`` → placeholder positions.

    No visual encoder and no projector MLP: the LM itself learns vision (PRIOR's "without a visual encoder"
    setting; the patch embedding follows Fuyu, arXiv-less Adept release, which also adds no position
    embedding since the LM's RoPE positions the patches). Patches are raster-ordered.
    """

    def __init__(self, lm: nn.Module, *, image_size: int, patch_size: int, image_token_id: int,
                 num_channels: int = 3, image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 image_std: Sequence[float] = (0.5, 0.5, 0.5)):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"PatchLVLM: image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.lm = lm
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        self.image_token_id = image_token_id
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        hidden = _base_lm(lm).config.get_text_config().hidden_size
        self.patch_embed = nn.Linear(num_channels * patch_size * patch_size, hidden)

    @property
    def config(self):
        return self.language_model.config

    @property
    def language_model(self) -> nn.Module:
        """The transformers causal LM under a PEFT wrapper (LoRA layers, if any, stay injected in it)."""
        return _base_lm(self.lm)

    @property
    def peft_config(self):
        """The LM's PEFT config when it carries an adapter (so the loop's adapter reference sees one)."""
        if not hasattr(self.lm, "peft_config"):
            raise AttributeError("PatchLVLM.peft_config: the language model has no PEFT adapter")
        return self.lm.peft_config

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The LM's LoRA off (the patch embedding is outside the adapter: freeze it for an adapter reference)."""
        with self.lm.disable_adapter():
            yield

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def settings(self) -> dict:
        return {"image_size": self.image_size, "patch_size": self.patch_size, "num_channels": self.num_channels,
                "image_token_id": self.image_token_id, "image_mean": self.image_mean, "image_std": self.image_std}

    def patchify(self, pixel_values: Tensor) -> Tensor:
        """``[B, C, H, W]`` → ``[B, N, C·p·p]``."""
        B, C, H, W = pixel_values.shape
        if (C, H, W) != (self.num_channels, self.image_size, self.image_size):
            raise ValueError(f"PatchLVLM: pixel_values {tuple(pixel_values.shape)} must be "
                             f"[B, {self.num_channels}, {self.image_size}, {self.image_size}]")
        p = self.patch_size
        x = pixel_values.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """``[B, C, H, W]`` → ``[B, N, hidden]``: one LM embedding per patch, for the placeholder positions."""
        w = self.patch_embed.weight
        return self.patch_embed(self.patchify(pixel_values.to(w.device, w.dtype)))

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        embeds = self.language_model.get_input_embeddings()(input_ids)
        slots = input_ids == self.image_token_id
        if pixel_values is None:
            if slots.any():
                raise ValueError("PatchLVLM: input_ids hold <image> placeholders but pixel_values is None")
            return embeds
        counts = slots.sum(-1)
        if bool((counts != self.num_image_tokens).any()):
            raise ValueError(f"PatchLVLM: every row needs {self.num_image_tokens} <image> placeholders (one per "
                             f"patch); got {counts.tolist()}")
        feats = self.image_features(pixel_values)
        return embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))

    def hidden_states(self, input_ids: Tensor, pixel_values: Tensor | None, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None) -> Tensor:
        decoder = _decoder(self.language_model)
        out = decoder(inputs_embeds=self.embed(input_ids, pixel_values), attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, labels: Tensor | None = None, **kwargs: Any):
        """Like ``LlavaForConditionalGeneration.forward``: logits, and HF's mean next-token loss with labels."""
        return self.lm(inputs_embeds=self.embed(input_ids, pixel_values), attention_mask=attention_mask,
                       position_ids=position_ids, labels=labels, **kwargs)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.language_model.gradient_checkpointing_enable(**kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None,
                        **kwargs: Any) -> None:
        """The LM (or its PEFT adapter) as a normal causal-LM checkpoint, the patch embedding beside it;
        ``state_dict`` (keys ``lm.*`` / ``patch_embed.*``) replaces the modules' own weights."""
        from safetensors.torch import save_file

        from . import sub_state_dict

        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(str(path), state_dict=sub_state_dict(state_dict, "lm."), **kwargs)
        embed = self.patch_embed.state_dict() if state_dict is None else sub_state_dict(state_dict, "patch_embed.")
        state = {k: v.detach().cpu().contiguous() for k, v in embed.items()}
        save_file(state, str(path / PATCH_WEIGHTS_FILE))
        (path / PATCH_CONFIG_FILE).write_text(json.dumps(self.settings(), indent=1))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **load_kwargs: Any) -> PatchLVLM:
        """Loads what :meth:`save_pretrained` wrote; ``load_kwargs`` go to ``mmalign.models.text.load_causal_lm``."""
        from safetensors.torch import load_file

        path = Path(path)
        for name in (PATCH_CONFIG_FILE, PATCH_WEIGHTS_FILE):
            if not (path / name).is_file():
                raise ModelNotFound(f"PatchLVLM.from_pretrained: {path / name} is missing; write the directory "
                                    "with PatchLVLM.save_pretrained (or mmalign.models.lvlm.save_lvlm)"
                                    f"{incomplete_hint(path)}")
        with loading(path / PATCH_CONFIG_FILE, "PatchLVLM config"):
            settings = json.loads((path / PATCH_CONFIG_FILE).read_text())
        model = cls(load_causal_lm(path, **load_kwargs), **settings)
        check_weight_files(path, [path / PATCH_WEIGHTS_FILE])
        with loading(path / PATCH_WEIGHTS_FILE, "patch embedding"):
            model.patch_embed.load_state_dict(load_file(str(path / PATCH_WEIGHTS_FILE)))
        check_finite(model.patch_embed, path / PATCH_WEIGHTS_FILE)
        return model.to(dtype=next(model.lm.parameters()).dtype)


def _base_lm(lm: nn.Module) -> nn.Module:
    """A causal LM under an optional PEFT wrapper."""
    return lm.get_base_model() if hasattr(lm, "peft_config") and hasattr(lm, "get_base_model") else lm


def _decoder(lm: nn.Module) -> nn.Module:
    return lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model


# -- builders -----------------------------------------------------------------------------------------------


def add_image_token(tokenizer) -> int:
    """Add ``<image>`` as a special token when missing; returns its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _tiny_vision_problems(tiny: dict, kind: str) -> list[str]:
    """``model.tiny``'s image-side keys: sizes >= 1, patches tiling the image, heads dividing the width; an unknown
    key starting with vision/image/patch is named with the valid ones (the rest go to the tiny Llama, which checks
    its own)."""
    errs = []
    for k in tiny:
        if k not in VISION_KEYS and k.startswith(("vision", "image", "patch")):
            errs.append(f"model.tiny.{k}: unknown key for a tiny LVLM's image side; valid: {list(VISION_KEYS)}")
    vis = _split_tiny(tiny)[1]
    bad = [k for k, v in vis.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    errs += [f"model.tiny.{k}={vis[k]!r} must be an integer >= 1" for k in bad]
    if not bad and vis["image_size"] % vis["patch_size"]:
        errs.append(f"model.tiny.image_size={vis['image_size']} must be a multiple of patch_size={vis['patch_size']}")
    if not bad and kind == "llava" and vis["vision_hidden_size"] % vis["vision_heads"]:
        errs.append(f"model.tiny.vision_hidden_size={vis['vision_hidden_size']} must be divisible by "
                    f"vision_heads={vis['vision_heads']}")
    return errs


def _split_tiny(tiny: dict) -> tuple[dict, dict]:
    text = {k: v for k, v in tiny.items() if k not in VISION_KEYS and k != "vocab_size"}
    vision = {"image_size": 16, "patch_size": 4, "vision_hidden_size": 32, "vision_layers": 2, "vision_heads": 2,
              "vision_intermediate_size": 64}
    vision.update({k: v for k, v in tiny.items() if k in VISION_KEYS})
    return text, vision


def tiny_text_settings(tiny: dict) -> dict:
    """The tiny Llama part of ``model.tiny`` (what a same-sized text-only reference LM is built from)."""
    return _split_tiny(tiny)[0]


def build_tiny_lvlm(kind: str, tokenizer, *, seed: int = 0, **tiny: Any) -> tuple[nn.Module, LVLMInputs]:
    """A random tiny LVLM of ``kind`` (``llava`` | ``patch``) for ``tokenizer`` (``<image>`` is added to it).

    ``tiny``: Llama settings of :func:`~mmalign.models.text.tiny_llama_config` plus ``image_size`` (16),
    ``patch_size`` (4) and, for LLaVA, ``vision_hidden_size`` (32), ``vision_layers`` (2), ``vision_heads`` (2),
    ``vision_intermediate_size`` (64). The same seed gives the same weights.
    """
    if kind not in KINDS:
        raise ValueError(f"build_tiny_lvlm: kind={kind!r} is not one of {list(KINDS)}")
    problems = _tiny_vision_problems(tiny, kind)
    if problems:
        raise ConfigError(problems)
    image_token_id = add_image_token(tokenizer)
    text, vis = _split_tiny(tiny)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    if kind == "patch":
        lm = build_tiny_causal_lm(len(tokenizer), seed=seed, **ids, **text)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            model = PatchLVLM(lm, image_size=vis["image_size"], patch_size=vis["patch_size"],
                              image_token_id=image_token_id)
        inputs = LVLMInputs("patch", tokenizer, image_token_id, model.num_image_tokens,
                            patch_image=_patch_image(model))
        return model.eval(), inputs
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    size, patch = vis["image_size"], vis["patch_size"]
    vision = CLIPVisionConfig(hidden_size=vis["vision_hidden_size"], intermediate_size=vis["vision_intermediate_size"],
                              num_hidden_layers=vis["vision_layers"], num_attention_heads=vis["vision_heads"],
                              image_size=size, patch_size=patch, projection_dim=vis["vision_hidden_size"])
    n_tokens = (size // patch) ** 2  # "default" feature selection drops CLIP's CLS token
    config = LlavaConfig(vision_config=vision, text_config=tiny_llama_config(len(tokenizer), **ids, **text),
                         image_token_index=image_token_id, image_seq_length=n_tokens,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model.eval(), LVLMInputs("llava", tokenizer, image_token_id, n_tokens, processor=processor)


def _patch_image(model: PatchLVLM) -> dict:
    return {"image_size": model.image_size, "image_mean": model.image_mean, "image_std": model.image_std}


def llava_num_image_tokens(processor, config) -> int:
    """Placeholders per image: LlavaProcessor's rule ((H/p)·(W/p) + extra − CLS), else ``image_seq_length``."""
    patch = getattr(processor, "patch_size", None)
    crop = getattr(processor.image_processor, "crop_size", None) or {}
    if patch and crop.get("height"):
        n = (crop["height"] // patch) * (crop["width"] // patch) + int(processor.num_additional_image_tokens or 0)
        strategy = processor.vision_feature_select_strategy or config.vision_feature_select_strategy
        return n - 1 if strategy == "default" else n
    return int(config.image_seq_length)


def load_lvlm(path: str | os.PathLike, *, dtype: str = "float32", attn_implementation: str | None = None,
              gradient_checkpointing: bool = False, trust_remote_code: bool = False) -> tuple[nn.Module, LVLMInputs]:
    """Load an LVLM checkpoint directory (or a hub id where there is internet) with its tokenizer/processor.

    A directory with ``patch_lvlm.json`` is a :class:`PatchLVLM`; a ``config.json`` with ``model_type: llava``
    is a ``LlavaForConditionalGeneration`` (its ``LlavaProcessor`` read from the same directory); a directory
    holding only a PEFT adapter loads its base (``base_model_name_or_path``) and attaches the adapter
    (trainable). Other multimodal families (LLaVA-OneVision, Qwen2-VL, ...) are not supported yet.
    """
    from .text import _check_checkpoint_dir, _from_hub, load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"load_lvlm: dtype={dtype!r} is not one of {sorted(DTYPES)}")
    text = os.fspath(path)
    local = Path(text).expanduser()
    if not local.exists() and (text.startswith((".", "/", "~")) or text.count("/") > 1):
        raise ModelNotFound(f"load_lvlm: no checkpoint directory at {text!r}; expected a directory written by "
                            "save_pretrained (mmalign.models.lvlm.save_lvlm) or a LLaVA-hf checkpoint"
                            f"{incomplete_hint(local)}")
    if local.exists() and not local.is_dir():
        raise ModelNotADirectory(f"load_lvlm: {text!r} is a file; pass the checkpoint directory that holds it")
    if local.is_dir() and (local / PATCH_CONFIG_FILE).is_file():
        model = PatchLVLM.from_pretrained(local, dtype=dtype, attn_implementation=attn_implementation,
                                          gradient_checkpointing=gradient_checkpointing)
        tok = load_tokenizer(local)
        return model, LVLMInputs("patch", tok, model.image_token_id, model.num_image_tokens,
                                 patch_image=_patch_image(model))
    if local.is_dir() and not (local / "config.json").is_file() and (local / "adapter_config.json").is_file():
        with loading(local / "adapter_config.json", "adapter config"):
            base = json.loads((local / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ModelLoadError(f"{local / 'adapter_config.json'}: 'base_model_name_or_path' is empty; set it to the "
                             "base LLaVA checkpoint the adapter was trained on")
        model, _ = load_lvlm(base, dtype=dtype, attn_implementation=attn_implementation,
                             gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code)
        from peft import PeftModel

        check_weight_files(local)
        with loading(local, "LoRA adapter"):
            model = PeftModel.from_pretrained(model, str(local), is_trainable=True)
        return model, _llava_inputs(local, unwrap_lvlm(model).config, trust_remote_code)
    from transformers import AutoConfig, LlavaForConditionalGeneration

    where = str(local) if local.exists() else text
    if local.exists():
        _check_checkpoint_dir(local, "load_lvlm")
        with loading(local):
            config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    else:
        config = _from_hub(AutoConfig, text, trust_remote_code=trust_remote_code)
    if config.model_type != "llava":
        raise ModelLoadError(f"load_lvlm: {where} is a {config.model_type!r} model; supported: 'llava' "
                         "(LlavaForConditionalGeneration, e.g. llava-hf/llava-1.5-7b-hf or "
                         "llava-hf/llava-interleave-qwen-0.5b-hf) "
                         "and mmalign PatchLVLM directories")
    kwargs: dict[str, Any] = {_DTYPE_KWARG: DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with loading(where):
        model = LlavaForConditionalGeneration.from_pretrained(where, **kwargs)
    check_finite(model, where)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, _llava_inputs(where, model.config, trust_remote_code)


def _llava_inputs(where, config, trust_remote_code: bool) -> LVLMInputs:
    from transformers import AutoProcessor

    with loading(where, "processor (tokenizer + image processor)"):
        processor = AutoProcessor.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LVLMInputs("llava", tok, int(config.image_token_index), llava_num_image_tokens(processor, config),
                      processor=processor)


def unwrap_lvlm(model: nn.Module) -> nn.Module:
    """The LLaVA / PatchLVLM under DDP, ``torch.compile`` and PEFT wrappers (LoRA layers stay injected)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def _base_is_loadable(model: nn.Module) -> bool:
    """True when a PEFT adapter's base model can be found again on disk (not a tiny in-process model)."""
    base = unwrap_lvlm(model)
    inner = base.lm if isinstance(base, PatchLVLM) else base
    inner = base.language_model if isinstance(base, PatchLVLM) else inner
    name = getattr(getattr(inner, "config", None), "_name_or_path", "") or ""
    return bool(name) and Path(name).is_dir()


def save_lvlm(model: nn.Module, inputs: LVLMInputs, path: str | os.PathLike, *,
              state_dict: dict | None = None, merged: bool = False) -> Path:
    """``save_pretrained`` the model and its tokenizer/processor so that :func:`load_lvlm` reads them back.

    A LoRA model whose base is on disk saves only the adapter (as TRL does); one whose base was built in
    process (tiny), or whose earlier adapters were merged into it during the run (``merged``: stages with
    ``merge_lora``, so the base on disk no longer describes it), is saved merged. ``state_dict`` (keys relative
    to ``model``): the gathered weights of a sharded run, written instead of the model's own.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    is_peft = hasattr(model, "peft_config") or (isinstance(model, PatchLVLM) and hasattr(model.lm, "peft_config"))
    if is_peft and (merged or not _base_is_loadable(model)):
        model = copy.deepcopy(model)
        if state_dict is not None:
            # The copy is of the sharded module (size-0 or wrapped parameters): it cannot take the gathered weights.
            raise ValueError("save_lvlm: a LoRA model over an in-process (tiny) base cannot be saved from a sharded "
                             "run; train tiny models without FSDP / ZeRO-3, or from a base saved to disk")
        if isinstance(model, PatchLVLM):
            model.lm = model.lm.merge_and_unload()
        else:
            model = model.merge_and_unload()
    model.save_pretrained(str(path), state_dict=state_dict)
    inputs.save_pretrained(path)
    return path


def extract_language_model(model: nn.Module) -> nn.Module:
    """The LVLM's text-only causal LM (shares the weights, no copy): the natural start of a PRIOR reference."""
    base = unwrap_lvlm(model)
    if isinstance(base, PatchLVLM):
        return base.language_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(base.config.text_config)
    lm.model = base.model.language_model
    lm.lm_head = base.lm_head
    return lm
