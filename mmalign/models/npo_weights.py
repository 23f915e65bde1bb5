"""Diffusion-NPO weight offsets: save ``δ = θ_npo − θ_base`` and merge the negative model of NPO-guided CFG.

Diffusion-NPO (Wang et al., ICLR 2025, arXiv 2505.11245) and Self-NPO (arXiv 2505.11777) use a *negative*
model in the unconditional branch of classifier-free guidance, built from weight offsets of one base model::

    η = θ_pos − θ_base          the positive PO offset (Diffusion-DPO/SPO model, or any fine-tune, minus base)
    δ = θ_npo − θ_base          the NPO offset (Diffusion-NPO or Self-NPO, trained from the base)
    θ_neg = θ_base + α·η + β·δ  (α, β ∈ [0, 1] in the papers)

Sampling then predicts ``ε = ε_neg(x, ∅) + w·(ε_pos(x, c) − ε_neg(x, ∅))`` (:mod:`mmalign.sample.diffusion`).

Mapping to the reference code (research/diffusion.md §3.2): its ``--merge_weight`` m builds
``m·θ_base + (1 − m)·θ_pos`` and then fuses the NPO LoRA at scale 1, i.e. ``α = 1 − m, β = 1``; its README
calls m "the beta of the paper" and the Self-NPO tables call a value "α = 1.0", so the names disagree across
sources: here ``alpha`` always scales the positive offset and ``beta`` the NPO offset.

Numerics: the merge runs per tensor in float64 and is cast back to each tensor's dtype (the notes ask for
merges in ≥ fp32). ``α = 1`` starts from θ_pos itself and ``α = 0`` from θ_base itself, and a zero β adds
nothing, so ``α = 1, β = 0`` gives θ_pos **bit for bit** (``θ_base + (θ_pos − θ_base)`` would not). LoRA
adapters (PEFT layers, diffusers' ``add_adapter`` or a ``PeftModel``) are folded in with their own scale
before any arithmetic, so an offset from a LoRA run is the dense ``B·A·scale`` it stands for.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]
OFFSET_FILE = "npo_offset.safetensors"
OFFSET_META = "npo_offset.json"


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP/accelerate wrappers


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is optional for full-weight runs
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def merged_state_dict(model: nn.Module | Mapping[str, Tensor]) -> StateDict:
    """The dense weights a model computes with: LoRA layers merged, adapter tensors dropped, keys as the base's.

    A plain model (or a state dict) is returned as is (detached, no copy). A model with PEFT layers is deep-copied
    and each layer's active adapters are merged (``BaseTunerLayer.merge``, which applies the adapter's scale);
    ``.base_layer.`` is removed from the keys and a ``PeftModel``'s ``base_model.model.`` prefix is stripped, so
    the result loads into the plain base model.
    """
    if isinstance(model, Mapping):
        return {k: v.detach() for k, v in model.items()}
    model = _unwrap(model)
    layers = _tuner_layers(model)
    if not layers:
        return {k: v.detach() for k, v in model.state_dict().items()}
    adapter_names = set()
    for layer in layers:
        adapter_names.update(getattr(layer, "adapter_layer_names", ()))
        adapter_names.update(getattr(layer, "other_param_names", ()))
    merged = copy.deepcopy(model)
    for layer in _tuner_layers(merged):
        layer.merge()
    out: StateDict = {}
    for key, value in merged.state_dict().items():
        parts = key.split(".")
        if adapter_names.intersection(parts):
            continue
        key = key.replace(".base_layer.", ".")
        if key.startswith("base_model.model."):
            key = key[len("base_model.model."):]
        out[key] = value.detach()
    return out


def _check_keys(a: Mapping[str, Tensor], b: Mapping[str, Tensor], a_name: str, b_name: str) -> None:
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if missing or extra:
        raise ValueError(
            f"{a_name} and {b_name} do not have the same weights: only in {a_name}: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; only in {b_name}: {extra[:5]}{' ...' if len(extra) > 5 else ''}. "
            "Offsets need checkpoints of the same architecture (fine-tunes of one base model)"
        )
    bad = [k for k in a if a[k].shape != b[k].shape]
    if bad:
        k = bad[0]
        raise ValueError(f"weight {k!r} has shape {tuple(a[k].shape)} in {a_name} but {tuple(b[k].shape)} in "
                         f"{b_name} ({len(bad)} mismatched); offsets need the same architecture")


def weight_offset(model: nn.Module | Mapping[str, Tensor], base: nn.Module | Mapping[str, Tensor]) -> StateDict:
    """``θ − θ_base`` per floating-point tensor, in float32 (integer buffers are skipped: they are not weights)."""
    theta, theta_base = merged_state_dict(model), merged_state_dict(base)
    _check_keys(theta, theta_base, "model", "base")
    return {
        k: (v.double() - theta_base[k].double()).float()
        for k, v in theta.items()
        if v.is_floating_point()
    }


def save_offset(offset: Mapping[str, Tensor], path: str | Path, *, metadata: Mapping | None = None) -> Path:
    """Write an offset as ``<path>/npo_offset.safetensors`` (+ ``npo_offset.json`` with ``metadata``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in offset.items()}, str(path / OFFSET_FILE))
    stats = {"tensors": len(offset), **offset_norms(offset)}
    (path / OFFSET_META).write_text(json.dumps({**stats, **dict(metadata or {})}, indent=1, default=str))
    return path / OFFSET_FILE


def load_offset(path: str | Path) -> StateDict:
    """Read an offset written by :func:`save_offset` (a directory or the ``.safetensors`` file itself)."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / OFFSET_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no NPO offset at {path}: expected {OFFSET_FILE} inside the directory (written by "
            "mmalign.models.npo_weights.save_offset); for a trained model directory, load the model and call "
            "weight_offset"
        )
    return load_file(str(file))


def merge_weights(
    base: nn.Module | Mapping[str, Tensor],
    *,
    positive: nn.Module | Mapping[str, Tensor] | None = None,
    alpha: float = 1.0,
    npo_offset: Mapping[str, Tensor] | None = None,
    beta: float = 1.0,
) -> StateDict:
    """``θ_neg = θ_base + α·(θ_pos − θ_base) + β·δ`` as a state dict in the base's dtypes.

    Args:
        base: the model both offsets were trained from (θ_base).
        positive: θ_pos; ``None`` means no positive model (θ_pos = θ_base, so α has no effect).
        alpha: weight of the positive offset. 1 keeps θ_pos exactly, 0 keeps θ_base exactly.
        npo_offset: δ from :func:`weight_offset` / :func:`load_offset`; ``None`` or ``beta=0`` adds nothing.
        beta: weight of the NPO offset.
    """
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not isinstance(value, int | float) or value != value:
            raise ValueError(f"{name}={value!r} must be a real number (the papers use values in [0, 1])")
    theta_base = merged_state_dict(base)
    theta_pos = merged_state_dict(positive) if positive is not None else theta_base
    if positive is not None:
        _check_keys(theta_pos, theta_base, "positive", "base")
    if npo_offset is not None:
        unknown = sorted(set(npo_offset) - set(theta_base))
        if unknown:
            raise ValueError(f"npo_offset has weights the base model lacks: {unknown[:5]} (offset from another "
                             "architecture, or saved from a model with LoRA layers not merged)")
        bad = [k for k in npo_offset if npo_offset[k].shape != theta_base[k].shape]
        if bad:
            raise ValueError(f"npo_offset[{bad[0]!r}] has shape {tuple(npo_offset[bad[0]].shape)}, the base "
                             f"weight {tuple(theta_base[bad[0]].shape)}")
    out: StateDict = {}
    for key, w_base in theta_base.items():
        w_pos = theta_pos[key]
        if not w_base.is_floating_point():
            out[key] = w_pos.clone()
            continue
        if alpha == 1:
            merged = w_pos.double()
        elif alpha == 0:
            merged = w_base.double()
        else:
            merged = w_base.double() + alpha * (w_pos.double() - w_base.double())
        if npo_offset is not None and beta != 0 and key in npo_offset:
            merged = merged + beta * npo_offset[key].to(device=merged.device, dtype=torch.float64)
        out[key] = merged.to(w_base.dtype)
    return out


def negative_model(
    base: nn.Module,
    *,
    positive: nn.Module | None = None,
    alpha: float = 1.0,
    npo_offset: Mapping[str, Tensor] | None = None,
    beta: float = 1.0,
) -> nn.Module:
    """A frozen copy of the base architecture (LoRA layers merged away) carrying :func:`merge_weights`' result."""
    weights = merge_weights(base, positive=positive, alpha=alpha, npo_offset=npo_offset, beta=beta)
    model = _plain_copy(base)
    model.load_state_dict(weights, strict=True)
    model.eval().requires_grad_(False)
    return model


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without PEFT layers (merged, then unloaded)."""
    model = _unwrap(model)
    if not _tuner_layers(model):
        return copy.deepcopy(model)
    if hasattr(model, "merge_and_unload"):  # peft.PeftModel
        return copy.deepcopy(model).merge_and_unload()
    if hasattr(model, "fuse_lora") and hasattr(model, "unload_lora"):  # diffusers' PEFT integration
        out = copy.deepcopy(model)
        out.fuse_lora()
        out.unload_lora()
        return out
    raise ValueError(f"cannot strip the LoRA layers of a {type(model).__name__}: pass a model without adapters "
                     "(or a PeftModel / diffusers model with add_adapter)")


def offset_norms(offset: Mapping[str, Tensor]) -> dict[str, float]:
    """Global L2 norm and the largest absolute entry of an offset (for logs and reports)."""
    if not offset:
        return {"l2_norm": 0.0, "max_abs": 0.0}
    return {"l2_norm": float(torch.sqrt(sum((v.double() ** 2).sum() for v in offset.values()))),
            "max_abs": float(max(v.abs().max() for v in offset.values()))}
