"""Load the checkpoints that an earlier ``main`` wrote (tests/fixtures/main_checkpoints) through today's loaders,
as a user would, and reduce each to a few numbers: parameter count, parameter sum (float64) and the sum of one
forward pass on fixed inputs. ``expected.json`` holds those numbers as the writing commit computed them."""

from __future__ import annotations

from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "main_checkpoints"


def _params(model: torch.nn.Module) -> tuple[int, float]:
    ps = list(model.state_dict().values())
    return sum(p.numel() for p in ps), float(sum(p.double().sum() for p in ps if p.is_floating_point()))


def _text(path: Path) -> dict:
    from mmalign.models.text import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(path)).eval()
    tok = load_tokenizer(str(path))
    ids = torch.tensor([tok("red orange yellow").input_ids])
    with torch.no_grad():
        out = model(input_ids=ids).logits.double().sum().item()
    n, s = _params(model)
    return {"n_params": n, "param_sum": s, "output_sum": out}


def _diffusion(path: Path) -> dict:
    from mmalign.sample.diffusion import load_components, load_denoiser

    comps = load_components(path)
    net = load_denoiser(path, comps)
    g = torch.Generator().manual_seed(0)
    cfg = net.config
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    hid = torch.randn(1, 4, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        out = net(x, torch.tensor([10]), encoder_hidden_states=hid).sample.double().sum().item()
    n, s = _params(net)
    return {"n_params": n, "param_sum": s, "output_sum": out}


def _clip(path: Path) -> dict:
    from mmalign.models.clip import load_clip

    bundle = load_clip(str(path))
    model = bundle.model.eval()
    g = torch.Generator().manual_seed(0)
    size = bundle.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    img = torch.randn(1, 3, size, size, generator=g)
    with torch.no_grad():
        out = model.encode_image(img).double().sum().item()
    n, s = _params(model)
    return {"n_params": n, "param_sum": s, "output_sum": out}


def _prior(path: Path) -> dict:
    from mmalign.models.lvlm import load_lvlm

    model, _ = load_lvlm(str(path))
    n, s = _params(model.eval())
    return {"n_params": n, "param_sum": s}


LOADERS = {"text_full": _text, "text_lora": _text, "diffusion_lora": _diffusion, "clip_open_clip": _clip,
           "prior_patch": _prior}


def measure(name: str) -> dict:
    return LOADERS[name](FIXTURES / name)
