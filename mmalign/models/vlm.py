"""Vision-language models for images and video: the real ``transformers`` classes of four families.

=====================  ==============================================  =========================================
``arch``               class                                            real checkpoint of the same architecture
=====================  ==============================================  =========================================
``qwen2_vl``           ``Qwen2VLForConditionalGeneration``              ``Qwen/Qwen2-VL-7B-Instruct``
``qwen2_5_vl``         ``Qwen2_5_VLForConditionalGeneration``           ``Qwen/Qwen2.5-VL-7B-Instruct`` (TEMPLE)
``llava_onevision``    ``LlavaOnevisionForConditionalGeneration``       ``llava-hf/llava-onevision-qwen2-7b-ov-hf``
``llava_next_video``   ``LlavaNextVideoForConditionalGeneration``       ``llava-hf/LLaVA-NeXT-Video-7B-hf``
=====================  ==============================================  =========================================

:func:`build_tiny_vlm` makes a random tiny model of the real class and its real processor (``Qwen2VLProcessor``
with ``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor``, ``LlavaOnevisionProcessor``, ``LlavaNextVideoProcessor``)
entirely offline: the tokenizer is a small BPE trained on the run's text (:func:`build_vlm_tokenizer`) that carries
the family's real special tokens (``<|im_start|>``, ``<|vision_start|>``, ``<|image_pad|>``, ``<video>``, ...) and
a chat template of the family's format. The templates here are written from the released checkpoints' templates
(Qwen2-VL's ``<|vision_start|><|image_pad|><|vision_end|>`` parts; LLaVA-OneVision's ``<|im_start|>role`` then
images, videos, text; LLaVA-NeXT-Video's ``USER: <video>\\n... ASSISTANT:``) without the tags used only for
assistant masks; byte-for-byte equality with the hub files is UNVERIFIED (no hub here), which does not matter
for a loaded checkpoint: its own template is read from its directory.

:func:`load_vlm` loads a saved directory (full weights, or a PEFT adapter directory whose base is on disk) with
``from_pretrained``, the path users take for ``Qwen/Qwen2.5-VL-7B-Instruct``; :func:`save_vlm` writes one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .lvlm import unwrap_lvlm as unwrap_vlm
from .text import _DTYPE_KWARG, DTYPES

__all__ = ["ARCHS", "VLMInputs", "arch_of", "build_tiny_vlm", "build_vlm_tokenizer", "fold_lora", "load_vlm",
           "save_vlm", "unwrap_vlm"]

ARCHS = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava_next_video")
_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
            "llava_onevision": "LlavaOnevisionForConditionalGeneration",
            "llava_next_video": "LlavaNextVideoForConditionalGeneration"}
QWEN = ("qwen2_vl", "qwen2_5_vl")

_QWEN_TOKENS = ("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_LLAVA_TOKENS = ("<image>", "<video>")
# (pad, bos, eos, unk) of the tiny tokenizers: Qwen's end-of-turn is its EOS; the Llama of LLaVA-NeXT-Video uses </s>.
_SPECIAL = {"qwen": ("<|endoftext|>", "<bos>", "<|im_end|>", "<unk>"), "llama": ("<pad>", "<s>", "</s>", "<unk>")}

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NEXT_VIDEO_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CHAT_TEMPLATES = {"qwen2_vl": QWEN_CHAT_TEMPLATE, "qwen2_5_vl": QWEN_CHAT_TEMPLATE,
                  "llava_onevision": ONEVISION_CHAT_TEMPLATE, "llava_next_video": NEXT_VIDEO_CHAT_TEMPLATE}

# model.tiny defaults: a 2-layer LM of width 32 and a 2-layer vision tower of width 32 on 16-px images in 4-px patches.
TINY_DEFAULTS = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
                 "vocab_size": 400, "vision_hidden_size": 32, "vision_layers": 2, "vision_heads": 2,
                 "image_size": 16, "patch_size": 4}


@dataclass
class VLMInputs:
    """How rows become model inputs: the arch, its processor (tokenizer, chat template, image/video processors)
    and the placeholder ids the processor expands to one token per visual feature."""

    arch: str
    processor: Any

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_token_id(self) -> int:
        return int(self.processor.image_token_id) if hasattr(self.processor, "image_token_id") else \
            self.tokenizer.convert_tokens_to_ids(self.processor.image_token)

    @property
    def video_token_id(self) -> int:
        return int(self.processor.video_token_id) if hasattr(self.processor, "video_token_id") else \
            self.tokenizer.convert_tokens_to_ids(self.processor.video_token)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.processor.save_pretrained(str(path))


def build_vlm_tokenizer(arch: str, texts: Iterable[str], *, vocab_size: int = 400):
    """A byte-level BPE trained on ``texts`` with ``arch``'s real special tokens and chat template.

    Qwen-style tokenizers add nothing to plain text (Qwen's tokenizer has no BOS); the Llama one of
    LLaVA-NeXT-Video prepends ``<s>``, as the real one does. Left padding (prompts share one end position)."""
    from tokenizers import processors

    from .tokenizer import train_bpe_tokenizer

    _check_arch(arch)
    qwen_like = arch != "llava_next_video"
    extra = list(_QWEN_TOKENS if arch in QWEN else _LLAVA_TOKENS) + (["<|im_start|>"] if arch == "llava_onevision"
                                                                     else [])
    corpus = [t for t in texts if t] or ["a"]
    tok = train_bpe_tokenizer(corpus, vocab_size=vocab_size, special_tokens=_SPECIAL["qwen" if qwen_like else "llama"],
                              chat_template=None)
    # registered as additional special tokens (never split, skipped when decoding), as in the real tokenizers
    tok.add_special_tokens({"extra_special_tokens": [*tok.extra_special_tokens,
                                                     *(t for t in extra if t not in tok.get_vocab())]})
    if qwen_like:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tok.chat_template = CHAT_TEMPLATES[arch]
    tok.padding_side = "left"
    return tok


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"vlm.arch={arch!r} is not one of {list(ARCHS)}")


def _rope(head_dim: int) -> dict:
    """M-RoPE sections (temporal, height, width) summing to head_dim / 2, in Qwen2-VL's 16:24:24 proportions."""
    half = head_dim // 2
    t = max(half // 4, 1)
    h = (half - t) // 2
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [t, h, half - t - h]}


def _tiny_settings(tiny: dict) -> dict:
    unknown = sorted(set(tiny) - set(TINY_DEFAULTS) - {"max_position_embeddings", "min_pixels", "max_pixels"})
    if unknown:
        raise ValueError(f"model.tiny: unknown keys {unknown} for a tiny VLM; allowed: {sorted(TINY_DEFAULTS)}")
    s = {**TINY_DEFAULTS, **tiny}
    if s["hidden_size"] % s["num_heads"] or s["num_heads"] % s["num_kv_heads"] or \
            s["vision_hidden_size"] % s["vision_heads"] or s["image_size"] % (2 * s["patch_size"]):
        raise ValueError(f"model.tiny {s}: hidden_size must divide by num_heads, num_heads by num_kv_heads, "
                         "vision_hidden_size by vision_heads, image_size by 2*patch_size")
    return s


def _text_config(arch: str, tok, s: dict):
    from transformers import LlamaConfig, Qwen2Config, Qwen2VLTextConfig
    from transformers.models.qwen2_5_vl import Qwen2_5_VLTextConfig

    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    common = dict(vocab_size=len(tok), hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                  num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
                  num_key_value_heads=s["num_kv_heads"], max_position_embeddings=s.get("max_position_embeddings", 2048),
                  **ids)
    if arch in QWEN:
        cls = Qwen2VLTextConfig if arch == "qwen2_vl" else Qwen2_5_VLTextConfig
        return cls(**common, rope_parameters=_rope(s["hidden_size"] // s["num_heads"]))
    cls = Qwen2Config if arch == "llava_onevision" else LlamaConfig
    return cls(**common)


def _tiny_config(arch: str, tok, s: dict):
    import transformers as tf

    text = _text_config(arch, tok, s)
    size, patch, vw = s["image_size"], s["patch_size"], s["vision_hidden_size"]
    vision = dict(hidden_size=vw, intermediate_size=2 * vw, num_hidden_layers=s["vision_layers"],
                  num_attention_heads=s["vision_heads"], image_size=size, patch_size=patch)
    ids = tok.convert_tokens_to_ids
    if arch in QWEN:
        qwen = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                    vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
        if arch == "qwen2_vl":
            vis = tf.Qwen2VLVisionConfig(depth=s["vision_layers"], embed_dim=vw, hidden_size=s["hidden_size"],
                                         num_heads=s["vision_heads"], mlp_ratio=2, patch_size=patch,
                                         spatial_merge_size=2, temporal_patch_size=2)
            return tf.Qwen2VLConfig(text_config=text.to_dict(), vision_config=vis.to_dict(), **qwen)
        from transformers.models.qwen2_5_vl import Qwen2_5_VLVisionConfig

        # window_size in pixels: 2 merged patches per window side, so window attention is exercised on 16-px images
        vis = Qwen2_5_VLVisionConfig(depth=s["vision_layers"], hidden_size=vw, intermediate_size=2 * vw,
                                     num_heads=s["vision_heads"], out_hidden_size=s["hidden_size"], patch_size=patch,
                                     spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
                                     window_size=4 * patch, fullatt_block_indexes=[s["vision_layers"] - 1])
        return tf.Qwen2_5_VLConfig(text_config=text.to_dict(), vision_config=vis.to_dict(), **qwen)
    pinpoints = [[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
    if arch == "llava_onevision":
        return tf.LlavaOnevisionConfig(vision_config=tf.SiglipVisionConfig(**vision), text_config=text,
                                       image_token_index=ids("<image>"), video_token_index=ids("<video>"),
                                       vision_feature_select_strategy="full", vision_feature_layer=-1,
                                       image_grid_pinpoints=pinpoints)
    per_frame = (size // patch // 2) ** 2  # spatial_pool_stride 2
    return tf.LlavaNextVideoConfig(vision_config=tf.CLIPVisionConfig(**vision, projection_dim=vw), text_config=text,
                                   image_token_index=ids("<image>"), video_token_index=ids("<video>"),
                                   vision_feature_select_strategy="default", vision_feature_layer=-2,
                                   image_grid_pinpoints=pinpoints, spatial_pool_stride=2,
                                   image_seq_length=(size // patch) ** 2, video_seq_length=per_frame)


def build_processor(arch: str, tok, *, image_size: int = 16, patch_size: int = 4, min_pixels: int | None = None,
                    max_pixels: int | None = None):
    """The real processor class of ``arch`` around ``tok`` (built offline, sized for the tiny vision tower)."""
    import transformers as tf

    _check_arch(arch)
    if arch in QWEN:
        px = {"min_pixels": min_pixels or (2 * patch_size) ** 2, "max_pixels": max_pixels or (2 * image_size) ** 2}
        kw = dict(patch_size=patch_size, merge_size=2, temporal_patch_size=2, **px)
        cls = tf.Qwen2VLProcessor if arch == "qwen2_vl" else tf.Qwen2_5_VLProcessor
        return cls(image_processor=tf.Qwen2VLImageProcessor(**kw),
                   video_processor=tf.Qwen2VLVideoProcessor(**kw, cap_pixels_per_frame=True),
                   tokenizer=tok, chat_template=CHAT_TEMPLATES[arch])
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size],
                 [2 * image_size, 2 * image_size]]
    square = {"height": image_size, "width": image_size}
    if arch == "llava_onevision":
        return tf.LlavaOnevisionProcessor(
            image_processor=tf.LlavaOnevisionImageProcessor(size=square, image_grid_pinpoints=pinpoints),
            video_processor=tf.LlavaOnevisionVideoProcessor(size=square), tokenizer=tok,
            num_image_tokens=(image_size // patch_size) ** 2, vision_feature_select_strategy="full",
            chat_template=CHAT_TEMPLATES[arch])
    edge = {"shortest_edge": image_size}
    return tf.LlavaNextVideoProcessor(
        image_processor=tf.LlavaNextImageProcessor(size=edge, crop_size=square, image_grid_pinpoints=pinpoints),
        video_processor=tf.LlavaNextVideoVideoProcessor(size=edge, crop_size=square), tokenizer=tok,
        patch_size=patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATES[arch])


def build_tiny_vlm(arch: str, tokenizer, *, seed: int = 0, **tiny: Any) -> tuple[nn.Module, VLMInputs]:
    """A random tiny model of ``arch``'s real class and its processor; the same seed gives the same weights.

    ``tiny``: :data:`TINY_DEFAULTS` keys (LM width/depth/heads, vision width/depth/heads, image and patch size)
    plus ``min_pixels`` / ``max_pixels`` for the Qwen processors (default: 8x8 .. 32x32 px)."""
    import transformers as tf

    _check_arch(arch)
    s = _tiny_settings(tiny)
    config = _tiny_config(arch, tokenizer, s)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(tf, _CLASSES[arch])(config)
    processor = build_processor(arch, tokenizer, image_size=s["image_size"], patch_size=s["patch_size"],
                                min_pixels=s.get("min_pixels"), max_pixels=s.get("max_pixels"))
    return model.eval(), VLMInputs(arch, processor)


def arch_of(config) -> str:
    """The arch of a transformers config (``config.model_type``), or a clear error naming the supported ones."""
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise ValueError(f"model_type {mt!r} is not a supported vision-language arch; supported: {list(ARCHS)} "
                         "(LLaVA-1.5 checkpoints run on modality: prior)")
    return mt


def load_vlm(path: str | os.PathLike, *, dtype: str = "float32", attn_implementation: str | None = None,
             gradient_checkpointing: bool = False, trust_remote_code: bool = False,
             processor_kwargs: dict | None = None) -> tuple[nn.Module, VLMInputs]:
    """Load a VLM directory written by ``save_pretrained`` (or a hub id where a hub is reachable) with its processor.

    The arch comes from ``config.json``'s ``model_type``. A directory holding only a PEFT adapter
    (``adapter_config.json``) loads its base (``base_model_name_or_path``) and attaches the adapter, trainable.
    ``processor_kwargs`` go to ``AutoProcessor.from_pretrained`` (e.g. ``min_pixels`` / ``max_pixels``)."""
    from transformers import AutoConfig, AutoProcessor

    if dtype not in DTYPES:
        raise ValueError(f"load_vlm: dtype={dtype!r} is not one of {sorted(DTYPES)}")
    text = os.fspath(path)
    local = Path(text).expanduser()
    if not local.exists() and (text.startswith((".", "/", "~")) or text.count("/") > 1):
        raise FileNotFoundError(f"load_vlm: no checkpoint directory at {text!r}; expected a directory written by "
                                "save_pretrained (mmalign.models.vlm.save_vlm) or a downloaded hub checkpoint")
    if local.is_dir() and not (local / "config.json").is_file() and (local / "adapter_config.json").is_file():
        base = json.loads((local / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{local / 'adapter_config.json'}: 'base_model_name_or_path' is empty; set it to the "
                             "base checkpoint the adapter was trained on")
        from peft import PeftModel

        model, inputs = load_vlm(base, dtype=dtype, attn_implementation=attn_implementation,
                                 gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code,
                                 processor_kwargs=processor_kwargs)
        return PeftModel.from_pretrained(model, str(local), is_trainable=True), inputs
    where = str(local) if local.exists() else text
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except OSError as err:
        if local.exists():
            raise
        raise OSError(f"load_vlm: could not load {text!r} as a hub id ({err}). Without internet (or with "
                      "HF_HUB_OFFLINE=1) pass a local directory, e.g. one made by "
                      f"`huggingface-cli download {text} --local-dir DIR` on a connected machine") from err
    arch = arch_of(config)
    import transformers as tf

    kwargs: dict[str, Any] = {_DTYPE_KWARG: DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = getattr(tf, _CLASSES[arch]).from_pretrained(where, **kwargs)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    processor = AutoProcessor.from_pretrained(where, trust_remote_code=trust_remote_code, **(processor_kwargs or {}))
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if getattr(processor, "chat_template", None) is None and getattr(tok, "chat_template", None) is None:
        raise ValueError(f"load_vlm: {where} has no chat template (processor or tokenizer); the VLM family renders "
                         "prompts with it; save one with the processor (processor.chat_template = ...)")
    return model.eval(), VLMInputs(arch, processor)


def _base_is_loadable(model: nn.Module) -> bool:
    name = getattr(getattr(unwrap_vlm(model), "config", None), "_name_or_path", "") or ""
    return bool(name) and Path(name).is_dir()


_PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel (.base_model) -> the transformers model (.model)


def fold_lora(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The full weights of a PEFT LoRA model with its active adapters folded in, W' = W + (alpha/r) B A (LoRA,
    arXiv 2106.09685 sec. 4.1), keyed as the plain transformers model's ``state_dict`` (what ``merge_and_unload``
    then ``state_dict`` gives), without copying the model.

    ``state_dict`` (keys relative to ``model``): the gathered weights of a sharded run, folded instead of the
    model's own; the module structure (which layers carry LoRA, their scaling) is read from ``model``. Folded
    tensors are computed in float32 and stored on the CPU in the base weight's dtype (so saving a large model does
    not double its device memory); the others are the model's own tensors (no copy). Linear LoRA layers fold from
    the tensors alone; other kinds (embedding, conv) need the live weights (``state_dict=None``)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    gathered = state_dict is not None
    state = dict(model.state_dict() if state_dict is None else state_dict)
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or module.merged:  # a merged layer's base weight holds the delta already
            continue
        key = f"{name}.base_layer.weight"
        for adapter in module.active_adapters:
            if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                continue
            if module.lora_variant.get(adapter) is not None or module.lora_bias.get(adapter):
                raise ValueError(f"save_vlm: {name} carries a LoRA variant (DoRA, ...) or a LoRA bias; folding those "
                                 "is not implemented; train plain LoRA, or save the adapter and merge it with peft")
            if isinstance(module, LoraLinear):
                a = state[f"{name}.lora_A.{adapter}.weight"].to(torch.float32)
                b = state[f"{name}.lora_B.{adapter}.weight"].to(device=a.device, dtype=torch.float32)
                delta = b @ a * module.scaling[adapter]
                delta = delta.T if module.fan_in_fan_out else delta
            elif not gathered:
                delta = module.get_delta_weight(adapter).to(torch.float32)
            else:
                raise ValueError(f"save_vlm: {name} is a {type(module).__name__} LoRA layer; from a sharded run only "
                                 "Linear LoRA layers can be folded (lora.target_modules: all-linear or Linear names)")
            weight = state[key]
            state[key] = (weight.to(device=delta.device, dtype=torch.float32) + delta).to("cpu", weight.dtype)
    out = {}
    for k, v in state.items():
        if "lora_" in k or ".original_module." in k:  # the factors, and a modules_to_save layer's frozen original
            continue
        for adapter in model.active_adapters:
            k = k.replace(f".modules_to_save.{adapter}.", ".")
        out[k.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")] = v
    return out


def save_vlm(model: nn.Module, inputs: VLMInputs, path: str | os.PathLike, *, state_dict: dict | None = None,
             merged: bool = False) -> Path:
    """``save_pretrained`` the model and its processor so that :func:`load_vlm` reads them back.

    A LoRA model whose base is on disk saves only the adapter. Full weights with the adapter folded in
    (:func:`fold_lora`; the layout of a full fine-tune) are saved instead when the base cannot be found again: one
    built in process (tiny), or, with ``merged``, one that earlier adapters were merged into (``stage.merge_lora``:
    the base on disk no longer is the base of the last adapter, whose ``adapter_config.json`` would point at it).
    ``state_dict`` (keys relative to ``model``): the gathered weights of a sharded run."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config") and (merged or not _base_is_loadable(model)):
        unwrap_vlm(model).save_pretrained(str(path), state_dict=fold_lora(model, state_dict))
    else:
        model.save_pretrained(str(path), state_dict=state_dict)
    inputs.save_pretrained(path)
    return path
