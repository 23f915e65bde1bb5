"""NPO weight-offset arithmetic (mmalign.models.npo_weights): θ_neg = θ_base + α·(θ_pos − θ_base) + β·δ."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from mmalign.models import npo_weights as npo

from . import perturbed


def _unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=3, out_channels=3,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2,
    )


def _forward(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([10, 500]), encoder_hidden_states=c).sample


def test_alpha_one_beta_zero_is_the_positive_model_bit_for_bit():
    """α = 1 starts from θ_pos itself and β = 0 adds nothing: no rounding from θ_base + (θ_pos − θ_base)."""
    base = _unet(0)
    pos, npo_model = perturbed(base, 1, scale=0.01), perturbed(base, 2, scale=0.01)
    delta = npo.weight_offset(npo_model, base)
    merged = npo.merge_weights(base, positive=pos, alpha=1.0, npo_offset=delta, beta=0.0)
    for k, v in pos.state_dict().items():
        assert torch.equal(merged[k], v), k
    neg = npo.negative_model(base, positive=pos, alpha=1.0, npo_offset=delta, beta=0.0)
    assert torch.equal(_forward(neg), _forward(pos))
    assert not any(p.requires_grad for p in neg.parameters())


def test_merge_formula_and_endpoints():
    """θ_neg = θ_base + α·η + β·δ per tensor; α = 0, β = 1 gives θ_npo (up to one fp32 rounding)."""
    base = _unet(0)
    pos, npo_model = perturbed(base, 1, scale=0.01), perturbed(base, 2, scale=0.01)
    delta = npo.weight_offset(npo_model, base)
    a, b = 0.3, 0.7
    merged = npo.merge_weights(base, positive=pos, alpha=a, npo_offset=delta, beta=b)
    sb, sp = base.state_dict(), pos.state_dict()
    for k in sb:
        expected = sb[k].double() + a * (sp[k].double() - sb[k].double()) + b * delta[k].double()
        torch.testing.assert_close(merged[k].double(), expected, atol=1e-6, rtol=0)
    only_npo = npo.merge_weights(base, alpha=0.0, npo_offset=delta, beta=1.0)
    for k, v in npo_model.state_dict().items():
        torch.testing.assert_close(only_npo[k], v, atol=1e-6, rtol=0)
    # no positive model: θ_pos = θ_base, α irrelevant
    assert all(torch.equal(v, sb[k]) for k, v in npo.merge_weights(base, alpha=0.5).items())


def test_offset_save_load_roundtrip(tmp_path):
    base = _unet(0)
    delta = npo.weight_offset(perturbed(base, 3, scale=0.01), base)
    npo.save_offset(delta, tmp_path / "off", metadata={"method": "self_npo"})
    loaded = npo.load_offset(tmp_path / "off")
    assert set(loaded) == set(delta) and all(torch.equal(loaded[k], delta[k]) for k in delta)
    assert (tmp_path / "off" / npo.OFFSET_META).is_file()
    with pytest.raises(FileNotFoundError, match="npo_offset.safetensors"):
        npo.load_offset(tmp_path / "missing")


def test_lora_offset_is_the_dense_adapter_update():
    """An offset taken from a LoRA model equals B·A·scale folded in: the merged model computes what the adapter did."""
    from peft import LoraConfig

    base = _unet(0)
    lora = _unet(0)
    lora.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    with torch.no_grad():  # B = 0 at init; make the adapter do something
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    delta = npo.weight_offset(lora, base)
    assert set(delta) == {k for k, v in base.state_dict().items() if v.is_floating_point()}
    assert max(v.abs().max() for v in delta.values()) > 0
    neg = npo.negative_model(base, npo_offset=delta, beta=1.0)
    torch.testing.assert_close(_forward(neg), _forward(lora), atol=1e-5, rtol=1e-5)
    # and a LoRA model can be the positive model directly
    neg2 = npo.negative_model(base, positive=lora, alpha=1.0)
    torch.testing.assert_close(_forward(neg2), _forward(lora), atol=1e-5, rtol=1e-5)
    half = npo.merge_weights(base, npo_offset=delta, beta=0.5)
    k = next(k for k in delta if delta[k].abs().max() > 0)
    torch.testing.assert_close(half[k] - base.state_dict()[k], 0.5 * delta[k], atol=1e-6, rtol=0)


def test_mismatched_architectures_are_named():
    base = _unet(0)
    other = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2,
    )
    with pytest.raises(ValueError, match="conv_in.weight.*shape"):
        npo.weight_offset(other, base)
    with pytest.raises(ValueError, match="weights the base model lacks"):
        npo.merge_weights(base, npo_offset={"nope.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="alpha"):
        npo.merge_weights(base, alpha=float("nan"))
