"""Diffusion model builders: real diffusers checkpoints and LoRA. The tiny random-init components for CPU
tests/demos are built in :mod:`mmalign.models.diffusion_tiny`, which imports this module (never the reverse).

Three model kinds share one :class:`DiffusionComponents` container:

=======  ================================  =====================================  ================================
kind     denoiser                          scheduler (training)                   text conditioning
=======  ================================  =====================================  ================================
unet     UNet2DConditionModel (SD1.5/2.x)  DDPMScheduler: ε, v or x0 prediction   CLIP last hidden state
sdxl     UNet2DConditionModel with         DDPMScheduler                          2 CLIP encoders (penultimate
         ``addition_embed_type=text_time``                                        states, concatenated) + pooled
sd3      SD3Transformer2DModel             FlowMatchEulerDiscreteScheduler        2 CLIP (+ T5, or zeros) + pooled
=======  ================================  =====================================  ================================

Prompt encoding goes through the diffusers pipeline's own ``encode_prompt`` (so the embeddings are exactly
what ``StableDiffusion{,XL,3}Pipeline`` feeds the denoiser at sampling time). Tiny tokenizers are real
``CLIPTokenizer`` s built offline (:mod:`mmalign.models.diffusion_tiny`). A tiny model may be *pixel space*
(``vae=None``): the "latents" are the images in [-1, 1].
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelLoadError, ModelNotFound
from .load_checks import check_finite, check_weight_files, incomplete_hint, loading, lora_targets_error

KINDS = ("unet", "sdxl", "sd3")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# diffusers' default LoRA targets for UNets and SD3 transformers (train_diffusion_dpo*.py, train_dreambooth_lora_sd3)
DEFAULT_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "KINDS",
    "DiffusionComponents",
    "apply_lora",
    "detect_kind",
    "load_diffusion_components",
    "lora_layers_for_diffusers",
    "pipeline_class",
    "save_lora",
]


@dataclass
class DiffusionComponents:
    """Everything a diffusion recipe needs besides data.

    Attributes:
        kind: ``"unet"`` | ``"sdxl"`` | ``"sd3"``.
        denoiser: the trainable network (UNet2DConditionModel or SD3Transformer2DModel), unwrapped.
        scheduler: the *training* noise scheduler (DDPMScheduler, or FlowMatchEulerDiscreteScheduler for sd3);
            never call ``set_timesteps`` on it (the flow tables would change).
        vae: AutoencoderKL, or None for pixel-space models.
        text_encoders / tokenizers: CLIP (and T5) encoders in pipeline order (``text_encoder``,
            ``text_encoder_2``, ``text_encoder_3``); SD3 may have a None third entry (T5 left out: zeros).
        max_sequence_length: SD3's T5 length (``encode_prompt(max_sequence_length=...)``).
        source: the checkpoint directory, or ``"tiny"``.
    """

    kind: str
    denoiser: nn.Module
    scheduler: Any
    vae: nn.Module | None
    text_encoders: list[nn.Module | None]
    tokenizers: list[Any]
    max_sequence_length: int = 256
    source: str = "tiny"
    _pipe: Any = field(default=None, repr=False)

    # -- derived facts ------------------------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        """``"flow"`` for flow-matching models, else the scheduler's ``prediction_type``."""
        if self.kind == "sd3":
            return "flow"
        return str(self.scheduler.config.prediction_type)

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return 3 if self.vae is None else int(self.vae.config.latent_channels)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents of a ``resolution``² image."""
        f = self.vae_scale_factor
        if resolution % f:
            raise ValueError(f"resolution={resolution} must be a multiple of the VAE scale factor {f}")
        return (self.latent_channels, resolution // f, resolution // f)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusionComponents:
        """Move the frozen parts (VAE, text encoders) and the denoiser; returns self."""
        for m in [self.denoiser, self.vae, *self.text_encoders]:
            if m is None:
                continue
            if dtype is None:
                m.to(device)
            else:
                m.to(device=device, dtype=dtype)
        return self

    # -- pipelines ----------------------------------------------------------------------------------------
    def pipeline(self, denoiser: nn.Module | None = None):
        """A diffusers pipeline over these components (``denoiser`` replaces the stored one, e.g. a LoRA'd
        or merged copy). The pipeline shares the modules; nothing is copied."""
        cls = pipeline_class(self.kind)
        net = denoiser if denoiser is not None else self.denoiser
        te, tok = list(self.text_encoders), list(self.tokenizers)
        if self.kind == "unet":
            return cls(vae=self.vae, text_encoder=te[0], tokenizer=tok[0], unet=net, scheduler=self.scheduler,
                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if self.kind == "sdxl":
            return cls(vae=self.vae, text_encoder=te[0], text_encoder_2=te[1], tokenizer=tok[0], tokenizer_2=tok[1],
                       unet=net, scheduler=self.scheduler)
        te += [None] * (3 - len(te))
        tok += [None] * (3 - len(tok))
        return cls(transformer=net, scheduler=self.scheduler, vae=self.vae, text_encoder=te[0], tokenizer=tok[0],
                   text_encoder_2=te[1], tokenizer_2=tok[1], text_encoder_3=te[2], tokenizer_3=tok[2])

    @torch.no_grad()
    def encode_prompt(self, captions: list[str], device: torch.device | str | None = None
                      ) -> tuple[Tensor, Tensor | None]:
        """``(prompt_embeds [B, L, D], pooled [B, P] or None)`` exactly as the pipeline computes them."""
        if self._pipe is None:
            self._pipe = self.pipeline()
        pipe = self._pipe
        device = device or next(m for m in self.text_encoders if m is not None).device
        captions = list(captions)
        if self.kind == "unet":
            embeds, _ = pipe.encode_prompt(captions, device, 1, False)
            return embeds, None
        if self.kind == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            return embeds, pooled
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=self.max_sequence_length)
        return embeds, pooled

    # -- VAE ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Pixels ``[N, 3, H, W]`` in [-1, 1] → the VAE posterior *parameters* ``[N, 2C, h, w]`` (mean ‖ logvar).

        Keeping the parameters (not a sample) lets callers cache them and still draw a fresh posterior sample
        per step, as the reference training scripts do (``latent_dist.sample()``). Pixel space: the pixels."""
        if self.vae is None:
            return pixels
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.encode(pixels.to(vae_dtype)).latent_dist.parameters

    def latents_from_parameters(self, params: Tensor, *, sample: bool = True,
                                generator: torch.Generator | None = None) -> Tensor:
        """Posterior parameters → scaled latents: ``(z − shift) · scaling_factor`` (SD3 has a shift)."""
        if self.vae is None:
            return params
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(params.float())
        z = dist.sample(generator=generator) if sample else dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents → pixels in [-1, 1] (inverse of :meth:`latents_from_parameters`)."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents / self.vae.config.scaling_factor + shift
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(z.to(vae_dtype)).sample.float().clamp(-1, 1)


def pipeline_class(kind: str):
    """The diffusers pipeline class of a model kind."""
    import diffusers

    table = {"unet": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline,
             "sd3": diffusers.StableDiffusion3Pipeline}
    if kind not in table:
        raise ValueError(f"kind={kind!r} is not one of {sorted(table)}")
    return table[kind]


# ------------------------------------------------------------------------------------------------ real checkpoints

_DENOISER_DIRS = {"unet": "unet", "sdxl": "unet", "sd3": "transformer"}


def detect_kind(path: str | os.PathLike) -> str:
    """``unet`` / ``sdxl`` / ``sd3`` from a pipeline directory's ``model_index.json`` (its ``_class_name``)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise ModelNotFound(
            f"{str(path)!r} has no model_index.json: expected a diffusers pipeline directory (subfolders unet or "
            "transformer, vae, text_encoder, tokenizer, scheduler) written by Pipeline.save_pretrained; it holds "
            f"{_listing(Path(path))}; download the full checkpoint or set diffusion.kind explicitly"
            f"{incomplete_hint(Path(path))}")
    with loading(index, "pipeline index"):
        name = json.loads(index.read_text()).get("_class_name", "")
    if "StableDiffusion3" in name:
        return "sd3"
    if "XL" in name:
        return "sdxl"
    if "StableDiffusion" in name:
        return "unet"
    raise ModelLoadError(f"{index}: pipeline class {name!r} is not one of StableDiffusion / StableDiffusionXL / "
                         "StableDiffusion3; set diffusion.kind (unet|sdxl|sd3) explicitly")


def load_diffusion_components(
    name_or_path: str | os.PathLike,
    *,
    kind: str = "auto",
    dtype: torch.dtype | str = torch.float32,
    vae_dtype: torch.dtype | str | None = torch.float32,
    prediction_type: str | None = None,
    load_t5: bool = False,
    max_sequence_length: int | None = None,
) -> DiffusionComponents:
    """Load a diffusers pipeline directory (SD1.5 / SDXL / SD3.5 layouts) with ``from_pretrained``, offline.

    The training scheduler is ``DDPMScheduler`` (or ``FlowMatchEulerDiscreteScheduler`` for sd3) read from the
    ``scheduler`` subfolder, as diffusers' training scripts do, whatever sampler the pipeline ships with.

    Args:
        kind: ``auto`` reads ``model_index.json``.
        dtype: denoiser and text-encoder weights; ``vae_dtype`` the VAE's (fp32 default: the SDXL VAE
            produces NaNs in fp16 unless it is the fp16-fix VAE, pitfall 4 of research/diffusion.md §9).
        prediction_type: override the scheduler's (SD2.x 768 checkpoints are v-prediction).
        load_t5: SD3 only: load ``text_encoder_3`` (T5-XXL, ~9 GB); off by default, zeros then stand in,
            which the SD3 pipeline supports (``text_encoder_3=None``).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelNotFound(
            f"no diffusers pipeline directory at {str(path)!r}; pass a local directory written by "
            f"Pipeline.save_pretrained (e.g. a downloaded stable-diffusion-v1-5 snapshot), or 'tiny'"
            f"{incomplete_hint(path)}")
    kind = detect_kind(path) if kind == "auto" else kind
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {['auto', *KINDS]}")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    vae_dtype = dtype if vae_dtype is None else getattr(torch, vae_dtype) if isinstance(vae_dtype, str) else vae_dtype
    sub = _DENOISER_DIRS[kind]
    if is_pixel_space_dir(path):
        return _load_pixel_space(path, dtype, prediction_type)
    missing = [d for d in (sub, "vae", "scheduler", "text_encoder", "tokenizer") if not (path / d).is_dir()]
    if missing:
        raise ModelNotFound(f"{str(path)!r} lacks the subfolders {missing} of a {kind} pipeline; it holds "
                            f"{_listing(path)}; download the full checkpoint{incomplete_hint(path)}")
    _check_subfolders(path, [sub, "vae", "text_encoder", "text_encoder_2", "text_encoder_3"])
    with loading(path / "scheduler", "scheduler config"):
        if kind == "sd3":
            from diffusers import SD3Transformer2DModel as Net

            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        else:
            from diffusers import UNet2DConditionModel as Net

            extra = {"prediction_type": prediction_type} if prediction_type else {}
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **extra)
    with loading(path / sub):
        denoiser = Net.from_pretrained(path, subfolder=sub, torch_dtype=dtype)
    with loading(path / "vae"):
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype)
    encoders, tokenizers = _load_text_stack(path, kind, dtype, load_t5=load_t5)
    for name, m in [(sub, denoiser), ("vae", vae), *((f"text encoder {i}", e) for i, e in enumerate(encoders))]:
        if m is not None:
            check_finite(m, f"{path} ({name})")
    for m in [vae, *encoders]:
        if m is not None:
            m.requires_grad_(False).eval()
    seq = max_sequence_length
    if seq is None:
        tiny = path / "mmalign_tiny.json"
        seq = json.loads(tiny.read_text())["max_sequence_length"] if tiny.is_file() else 256
    return DiffusionComponents(kind, denoiser, scheduler, vae, encoders, tokenizers, max_sequence_length=seq,
                               source=str(path))


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def _check_subfolders(path: Path, subs: list[str]) -> None:
    """Each component folder that exists must hold weights, and their safetensors headers must read."""
    for sub in subs:
        folder = path / sub
        if not folder.is_dir():
            continue
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise ModelNotFound(f"{folder} holds no weights (no .safetensors or .bin file; it holds {_listing(folder)})"
                                f"; download the full checkpoint or save the pipeline again{incomplete_hint(path)}")
        check_weight_files(folder)


def is_pixel_space_dir(path: Path) -> bool:
    """A tiny pixel-space pipeline written by mmalign: ``vae`` recorded as null in ``model_index.json``, no
    ``vae/`` folder, a UNet."""
    index = path / "model_index.json"
    if (path / "vae").is_dir() or not index.is_file() or not (path / "unet").is_dir():
        return False
    return (json.loads(index.read_text()).get("vae") or [None])[0] is None


def _load_pixel_space(path: Path, dtype: torch.dtype, prediction_type: str | None) -> DiffusionComponents:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    extra = {"prediction_type": prediction_type} if prediction_type else {}
    _check_subfolders(path, ["unet", "text_encoder"])
    with loading(path / "scheduler", "scheduler config"):
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **extra)
    with loading(path / "unet"):
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    encoders, tokenizers = _load_text_stack(path, "unet", dtype, load_t5=False)
    for name, m in [("unet", unet), *((f"text encoder {i}", e) for i, e in enumerate(encoders))]:
        check_finite(m, f"{path} ({name})")
    for m in encoders:
        m.requires_grad_(False).eval()
    return DiffusionComponents("unet", unet, scheduler, None, encoders, tokenizers, source=str(path))


def _load_text_stack(path: Path, kind: str, dtype: torch.dtype, *, load_t5: bool):
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    if kind == "unet":
        specs = [("text_encoder", "tokenizer", CLIPTextModel)]
    elif kind == "sdxl":
        specs = [("text_encoder", "tokenizer", CLIPTextModel),
                 ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection)]
    else:
        specs = [("text_encoder", "tokenizer", CLIPTextModelWithProjection),
                 ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection)]
    encoders: list[nn.Module | None] = []
    tokenizers: list[Any] = []
    for enc_dir, tok_dir, cls in specs:
        if not (path / enc_dir).is_dir() or not (path / tok_dir).is_dir():
            raise ModelNotFound(f"{str(path)!r}: a {kind} pipeline needs {enc_dir}/ and {tok_dir}/; it holds "
                                f"{_listing(path)}; download the full checkpoint{incomplete_hint(path)}")
        with loading(path / enc_dir):
            encoders.append(cls.from_pretrained(path / enc_dir, torch_dtype=dtype))
        with loading(path / tok_dir, "tokenizer"):
            tokenizers.append(AutoTokenizer.from_pretrained(path / tok_dir))
    if kind == "sd3":
        if load_t5 and (path / "text_encoder_3").is_dir():
            from transformers import T5EncoderModel

            with loading(path / "text_encoder_3"):
                encoders.append(T5EncoderModel.from_pretrained(path / "text_encoder_3", torch_dtype=dtype))
            with loading(path / "tokenizer_3", "tokenizer"):
                tokenizers.append(AutoTokenizer.from_pretrained(path / "tokenizer_3"))
        else:
            encoders.append(None)
            tokenizers.append(None)
    return encoders, tokenizers


# ------------------------------------------------------------------------------------------------ LoRA


def apply_lora(denoiser: nn.Module, *, r: int = 8, alpha: int | None = None, dropout: float = 0.0,
               target_modules: str | list[str] | None = None) -> nn.Module:
    """Wrap a denoiser with a PEFT LoRA (``peft.get_peft_model``); only the adapter stays trainable.

    As in diffusers' DPO scripts: targets ``to_k, to_q, to_v, to_out.0`` (the default, and what
    ``"all-linear"`` maps to here: PEFT only expands that for transformers models), ``lora_alpha = r`` by
    default, B initialised to zero so policy == base at step 0. The result has ``disable_adapter()`` and
    ``peft_config``, so :class:`mmalign.train.reference.AdapterReference` runs the base as the reference.
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"LoRA r={r} must be >= 1")
    targets = DEFAULT_LORA_TARGETS if target_modules in (None, "all-linear") else target_modules
    config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else r, lora_dropout=dropout,
                        target_modules=targets, init_lora_weights="gaussian")
    try:
        return get_peft_model(denoiser, config)
    except ValueError as err:
        if "not found in the base model" not in str(err) and "No modules were targeted" not in str(err):
            raise
        raise lora_targets_error(denoiser, targets, err) from None


def lora_layers_for_diffusers(peft_model: nn.Module, state_dict: dict | None = None
                              ) -> tuple[dict[str, Tensor], dict]:
    """``(state_dict, adapter metadata)`` of a PEFT-wrapped denoiser in the layout that
    ``Pipeline.save_lora_weights`` writes and ``load_lora_weights`` reads (module paths without PEFT's
    ``base_model.model.`` prefix, diffusers key names), as diffusers' training scripts produce them.
    ``state_dict``: the model's full weights gathered from a sharded run, read instead of its own."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, state_dict=state_dict)
    prefix = "base_model.model."
    state = {(k[len(prefix):] if k.startswith(prefix) else k): v.detach().float().cpu().contiguous()
             for k, v in state.items()}
    meta = peft_model.peft_config["default"].to_dict()
    meta = {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}
    return convert_state_dict_to_diffusers(state), meta


def save_lora(peft_model: nn.Module, kind: str, path: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` that ``Pipeline.load_lora_weights(path)`` loads."""
    layers, meta = lora_layers_for_diffusers(peft_model, state_dict)
    cls = pipeline_class(kind)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "sd3":
        cls.save_lora_weights(str(out), transformer_lora_layers=layers, transformer_lora_adapter_metadata=meta)
    else:
        cls.save_lora_weights(str(out), unet_lora_layers=layers, unet_lora_adapter_metadata=meta)
    return out


def save_denoiser_run(components, model: nn.Module, path: str | os.PathLike, *, info: dict,
                      tiny_base: nn.Module | None = None, state_dict: dict | None = None) -> Path:
    """The final layout of every diffusion run (Diffusion-DPO/NPO/SFT and Self-NPO), which the sampler and
    :mod:`mmalign.models.npo_weights` read: LoRA → ``pytorch_lora_weights.safetensors`` (``load_lora_weights``);
    full → the denoiser as a diffusers subfolder (``unet/`` or ``transformer/``); a tiny base, which cannot be
    rebuilt from a hub id, → ``base_pipeline/``; the training scheduler → ``scheduler/`` (read back by
    :func:`mmalign.sample.diffusion.load_components`); ``info`` (+ kind, prediction type, format, base) →
    ``mmalign_diffusion.json``. ``state_dict``: gathered weights of a sharded run, written instead of the
    model's own."""
    import json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)
    lora = hasattr(model, "peft_config")
    if lora:
        save_lora(model, components.kind, path, state_dict)
    else:
        folder = str(path / ("transformer" if components.kind == "sd3" else "unet"))
        if state_dict is None:
            model.save_pretrained(folder)
        else:
            # diffusers' ModelMixin.save_pretrained has no state_dict argument (extra kwargs are silently
            # ignored) but reads self.state_dict(): shadow it on the instance for this one call, so the file
            # layout (shards, index, config) stays diffusers' own.
            model.state_dict = lambda *args, **kwargs: state_dict
            try:
                model.save_pretrained(folder)
            finally:
                del model.state_dict
    if tiny_base is not None:
        components.pipeline(tiny_base).save_pretrained(str(path / "base_pipeline"))
    # The training scheduler as trained (zero terminal SNR, a prediction_type override): a base given by path
    # keeps its own scheduler, so without this the sampler would use a schedule the model never saw.
    components.scheduler.save_pretrained(str(path / "scheduler"))
    meta = {"kind": components.kind, "prediction_type": components.prediction_type,
            "format": "lora" if lora else "full", "base": components.source, **info}
    (path / "mmalign_diffusion.json").write_text(json.dumps(meta, indent=2, default=str))
    return path
