"""Diffusion-DPO / NPO / SFT / Self-NPO: arithmetic invariants on literal and random per-sample errors.

No peer package ships these losses as importable code (the diffusers DPO scripts live in its examples
folder, not in the wheel), so the reference formulas of research/diffusion.md §1.2 are written out
literally in the tests instead.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.losses.diffusion import (
    BETA_CONVENTIONS,
    convert_beta,
    diffusion_dpo,
    diffusion_npo,
    diffusion_sft,
    self_npo_regression,
)
from mmalign.losses.pairwise import DPO_LOSS_TYPES, dpo

LN2 = math.log(2)


def _errs(b=5, seed=0, dtype=torch.float64):
    """Per-sample MSEs of a unit-variance ε-target are around 1; small spread as in practice."""
    g = torch.Generator().manual_seed(seed)
    return tuple(1.0 + 0.01 * torch.randn(b, generator=g, dtype=dtype) for _ in range(4))


def _kw(loss_type):
    return {"label_smoothing": 1e-3} if loss_type == "exo_pair" else {}


# ------------------------------------------------------------------------------------------------------------
# Values at initialisation and literal formulas


def test_ln2_when_model_equals_reference():
    """m == r on both sides ⇒ s = −(β/2)·(0 − 0) = 0 ⇒ −log σ(0) = ln 2, margin 0, a tie counts as wrong."""
    mw, ml, _, _ = _errs()
    out = diffusion_dpo(mw, ml, mw.clone(), ml.clone(), beta=5000.0)
    assert torch.allclose(out.per_example, torch.full_like(mw, LN2), atol=1e-12)
    assert abs(out.loss.item() - LN2) < 1e-6
    assert out.metrics["rewards/margins"].item() == 0.0
    assert out.metrics["rewards/accuracies"].item() == 0.0


@pytest.mark.parametrize("loss_type,expected", [("hinge", 1.0), ("ipo", 1 / (4 * 5000.0**2))])
def test_other_links_at_initialisation(loss_type, expected):
    """hinge: relu(1 − 0) = 1; ipo: (0 − 1/(2β))² = 1/(4β²) (lengths are ones, so no normalisation)."""
    mw, ml, _, _ = _errs()
    out = diffusion_dpo(mw, ml, mw.clone(), ml.clone(), beta=5000.0, loss_type=loss_type)
    assert torch.allclose(out.per_example, torch.full_like(mw, expected), rtol=1e-12)


def test_same_image_on_both_sides_is_ln2_for_any_policy():
    """x_w == x_l with shared noise and t ⇒ m_w = m_l and r_w = r_l ⇒ s = 0 whatever the policy."""
    m, _, r, _ = _errs(seed=1)
    out = diffusion_dpo(m, m.clone(), r, r.clone(), beta=2000.0)
    assert torch.allclose(out.per_example, torch.full_like(m, LN2), atol=1e-12)


def test_literal_original_convention_formula():
    """Salesforce train.py: loss = −logσ(−0.5·β·((m_w − r_w) − (m_l − r_l))), mean over the batch."""
    mw, ml, rw, rl = _errs(seed=2)
    beta = 5000.0
    expected = -F.logsigmoid(-0.5 * beta * ((mw - rw) - (ml - rl)))
    out = diffusion_dpo(mw, ml, rw, rl, beta=beta)
    assert torch.allclose(out.per_example, expected, atol=1e-12)
    assert torch.allclose(out.loss, expected.mean(), atol=1e-12)


def test_literal_diffusers_convention_formula():
    """diffusers SD1.5 script: logits = ref_diff − model_diff; loss = −logσ(β_d·logits), β_d = 2500.
    The same numbers with beta_convention='original' need β = 2·2500 = 5000."""
    mw, ml, rw, rl = _errs(seed=3)
    logits = (rw - rl) - (mw - ml)
    expected = -F.logsigmoid(2500.0 * logits)
    out_d = diffusion_dpo(mw, ml, rw, rl, beta=2500.0, beta_convention="diffusers")
    out_o = diffusion_dpo(mw, ml, rw, rl, beta=5000.0)
    assert torch.allclose(out_d.per_example, expected, atol=1e-12)
    assert torch.allclose(out_o.per_example, expected, atol=1e-12)
    assert torch.allclose(out_d.metrics["rewards/margins"], out_o.metrics["rewards/margins"])


def test_hinge_equals_diffusers_hinge():
    """diffusers hinge: relu(1 − β_d·logits); ours with β = 2β_d: relu(1 − β·½·logits) — identical."""
    mw, ml, rw, rl = _errs(seed=4)
    logits = (rw - rl) - (mw - ml)
    out = diffusion_dpo(mw, ml, rw, rl, beta=2500.0, beta_convention="diffusers", loss_type="hinge")
    assert torch.allclose(out.per_example, torch.relu(1 - 2500.0 * logits), atol=1e-12)


def test_ipo_closed_form():
    """Half-error log-ratios: s_w − s_l = ½·logits ⇒ (½·logits − 1/(2β))² = ¼·(logits − 1/β)²."""
    mw, ml, rw, rl = _errs(seed=5)
    beta = 3000.0
    logits = (rw - rl) - (mw - ml)
    out = diffusion_dpo(mw, ml, rw, rl, beta=beta, loss_type="ipo")
    assert torch.allclose(out.per_example, 0.25 * (logits - 1 / beta) ** 2, rtol=1e-10, atol=1e-16)


# ------------------------------------------------------------------------------------------------------------
# Reduction to the DPO kernel


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_reduces_to_dpo_with_beta_scaled_errors(loss_type):
    """Links that depend on β·Δ only: dpo(logps = −(β/2)·err, beta = 1) gives the same values."""
    mw, ml, rw, rl = _errs(seed=6)
    beta = 4000.0
    out = diffusion_dpo(mw, ml, rw, rl, beta=beta, loss_type=loss_type)
    ref = dpo(-beta / 2 * mw, -beta / 2 * ml, -beta / 2 * rw, -beta / 2 * rl, beta=1.0, loss_type=loss_type)
    assert torch.allclose(out.per_example, ref.per_example, atol=1e-12)
    assert torch.allclose(out.metrics["rewards/margins"], ref.metrics["rewards/margins"], atol=1e-9)


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSS_TYPES))
def test_every_dpo_loss_type_runs_on_half_error_logps(loss_type):
    """Every TRL link: dpo on logps = −err/2 with the same β and unit lengths."""
    mw, ml, rw, rl = _errs(seed=7)
    ones = torch.ones_like(mw)
    out = diffusion_dpo(mw, ml, rw, rl, beta=1000.0, loss_type=loss_type, **_kw(loss_type))
    ref = dpo(-mw / 2, -ml / 2, -rw / 2, -rl / 2, beta=1000.0, loss_type=loss_type,
              chosen_lengths=ones, rejected_lengths=ones, **_kw(loss_type))
    assert torch.allclose(out.per_example, ref.per_example, atol=1e-12)
    assert torch.isfinite(out.loss)


# ------------------------------------------------------------------------------------------------------------
# Gradients, symmetry, NPO


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_gradient_signs(loss_type):
    """Lower error on the chosen image is better: ∂L/∂m_w > 0 and ∂L/∂m_l < 0 (checked at init, where
    every link is active)."""
    mw, ml, _, _ = _errs(seed=8)
    mw, ml = mw.clone().requires_grad_(), ml.clone().requires_grad_()
    out = diffusion_dpo(mw, ml, mw.detach().clone(), ml.detach().clone(), beta=500.0, loss_type=loss_type,
                        **({"label_smoothing": 0.1} if loss_type == "robust" else {}))
    gw, gl = torch.autograd.grad(out.loss, (mw, ml))
    assert (gw > 0).all() and (gl < 0).all()


def test_gradient_closed_form_at_init():
    """∂(−logσ(s))/∂s = −σ(−s) = −½ at s = 0 and ∂s/∂m_w = −β/2, so ∂L/∂m_w = β/4 per pair, /B for the mean."""
    mw, ml, _, _ = _errs(b=4, seed=9)
    mw = mw.clone().requires_grad_()
    beta = 5000.0
    out = diffusion_dpo(mw, ml, mw.detach().clone(), ml.clone(), beta=beta)
    (g,) = torch.autograd.grad(out.loss, mw)
    assert torch.allclose(g, torch.full_like(g, beta / 4 / 4), rtol=1e-12)


def test_swap_symmetry():
    """Swapping w and l negates s; for the logistic link L(−s) = L(s) + s."""
    mw, ml, rw, rl = _errs(seed=10)
    beta = 5000.0
    s = -0.5 * beta * ((mw - rw) - (ml - rl))
    a = diffusion_dpo(mw, ml, rw, rl, beta=beta)
    b = diffusion_dpo(ml, mw, rl, rw, beta=beta)
    assert torch.allclose(b.per_example, a.per_example + s, atol=1e-9)
    assert torch.allclose(b.metrics["rewards/margins"], -a.metrics["rewards/margins"])


def test_npo_is_swapped_dpo():
    """Diffusion-NPO trains on the reversed preference: npo(w, l) == dpo(l, w), values and metrics."""
    mw, ml, rw, rl = _errs(seed=11)
    kw = {"beta": 500.0, "beta_convention": "diffusers"}
    npo = diffusion_npo(mw, ml, rw, rl, **kw)
    swapped = diffusion_dpo(ml, mw, rl, rw, **kw)
    assert torch.equal(npo.per_example, swapped.per_example)
    assert npo.metrics.keys() == swapped.metrics.keys()
    assert all(torch.equal(npo.metrics[k], swapped.metrics[k]) for k in npo.metrics)
    # and it is not the DPO loss: the gradient on the human-chosen error flips sign
    mw_ = mw.clone().requires_grad_()
    (g,) = torch.autograd.grad(diffusion_npo(mw_, ml, mw.clone(), ml.clone(), **kw).loss, mw_)
    assert (g < 0).all()


def test_one_sgd_step_moves_toward_chosen():
    """Toy denoiser ε̂ = θ·x_t with shared noise and t: a step on the DPO loss lowers
    (m_w − r_w) − (m_l − r_l), i.e. raises the implicit reward margin (research note invariant 5)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)  # [winner, loser]
    eps = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64).expand(2, -1, -1, -1)
    a, s = 0.8, 0.6
    xt = a * x0 + s * eps
    theta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def errs(t):
        err = ((t * xt - eps) ** 2).mean(dim=(1, 2, 3))
        return err[:1], err[1:]

    with torch.no_grad():
        rw, rl = errs(theta.detach().clone())
    mw, ml = errs(theta)
    loss = diffusion_dpo(mw, ml, rw, rl, beta=10.0).loss
    (grad,) = torch.autograd.grad(loss, theta)
    with torch.no_grad():
        mw2, ml2 = errs(theta - 0.01 * grad)
    assert ((mw2 - rw) - (ml2 - rl)).item() < 0.0


# ------------------------------------------------------------------------------------------------------------
# Conventions, metrics, SFT term


def test_convert_beta_round_trip_and_values():
    assert convert_beta(2500.0, "diffusers", "original") == 5000.0
    assert convert_beta(5000.0, "original", "diffusers") == 2500.0
    for src in BETA_CONVENTIONS:
        for dst in BETA_CONVENTIONS:
            assert math.isclose(convert_beta(convert_beta(123.0, src, dst), dst, src), 123.0)
    with pytest.raises(ValueError, match="paper"):
        convert_beta(1.0, "paper", "original")
    with pytest.raises(ValueError, match="beta=0"):
        convert_beta(0.0, "original", "diffusers")


def test_metrics_names_and_values():
    mw, ml, rw, rl = _errs(seed=12)
    beta = 5000.0
    out = diffusion_dpo(mw, ml, rw, rl, beta=beta)
    m = out.metrics
    assert not any(k.startswith("logps/") for k in m)
    assert torch.allclose(m["diffusion/model_mse_chosen"], mw.mean().float())
    assert torch.allclose(m["diffusion/ref_mse_rejected"], rl.mean().float())
    assert torch.allclose(m["diffusion/model_diff"], (mw - ml).mean().float())
    assert torch.allclose(m["diffusion/ref_diff"], (rw - rl).mean().float())
    assert torch.allclose(m["diffusion/model_mse"], 0.5 * (mw.mean() + ml.mean()).float())
    s = -0.5 * beta * ((mw - rw) - (ml - rl))
    assert torch.allclose(m["rewards/margins"], s.mean().float(), rtol=1e-5)
    assert torch.allclose(m["rewards/chosen"], (-0.5 * beta * (mw - rw)).mean().float(), rtol=1e-5)
    assert torch.allclose(m["rewards/accuracies"], (s > 0).double().mean().float())
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_sft_weight_adds_chosen_mse():
    mw, ml, rw, rl = _errs(seed=13)
    base = diffusion_dpo(mw, ml, rw, rl, beta=5000.0)
    out = diffusion_dpo(mw, ml, rw, rl, beta=5000.0, sft_weight=0.5)
    assert torch.allclose(out.per_example, base.per_example + 0.5 * mw, atol=1e-12)
    assert torch.allclose(out.metrics["loss/sft"], mw.mean().float())
    assert torch.allclose(out.metrics["loss/dpo"], base.loss.float())


def test_reference_free_and_sample_weight():
    mw, ml, _, _ = _errs(seed=14)
    out = diffusion_dpo(mw, ml, None, None, beta=100.0)
    zero = diffusion_dpo(mw, ml, torch.zeros_like(mw), torch.zeros_like(ml), beta=100.0)
    assert torch.allclose(out.per_example, zero.per_example)
    assert "diffusion/ref_mse" not in out.metrics
    w = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    weighted = diffusion_dpo(mw, ml, None, None, beta=100.0, sample_weight=w)
    assert torch.allclose(weighted.loss, (w * out.per_example).sum() / w.sum())


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_finite_at_extremes(loss_type):
    """β = 5000 and error gaps of ±4 give |s| = 1e4."""
    mw = torch.tensor([1.0, 5.0], requires_grad=True)
    ml = torch.tensor([5.0, 1.0], requires_grad=True)
    ref = torch.ones(2)
    out = diffusion_dpo(mw, ml, ref, ref, beta=5000.0, loss_type=loss_type)
    out.loss.backward()
    assert torch.isfinite(out.per_example).all()
    assert torch.isfinite(mw.grad).all() and torch.isfinite(ml.grad).all()
    if loss_type == "sigmoid":  # s = +1e4 → loss ≈ 0; s = −1e4 → loss ≈ 1e4
        assert torch.allclose(out.per_example, torch.tensor([0.0, 1e4]), atol=1e-3)


def test_bf16_inputs_compute_in_fp32():
    mw, ml, rw, rl = (e.to(torch.bfloat16) for e in _errs(seed=15))
    out = diffusion_dpo(mw, ml, rw, rl, beta=5000.0)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_bad_arguments_raise_value_errors():
    mw, ml, rw, rl = _errs()
    with pytest.raises(ValueError, match="beta_convention='paper'"):
        diffusion_dpo(mw, ml, rw, rl, beta=1.0, beta_convention="paper")
    with pytest.raises(ValueError, match="chosen_lengths"):
        diffusion_dpo(mw, ml, rw, rl, beta=1.0, chosen_lengths=torch.ones(5))
    with pytest.raises(ValueError, match="both"):
        diffusion_dpo(mw, ml, rw, None, beta=1.0)
    with pytest.raises(ValueError, match="per-sample"):
        diffusion_dpo(mw[:, None], ml[:, None], rw[:, None], rl[:, None], beta=1.0)
    with pytest.raises(ValueError, match="sft_weight"):
        diffusion_dpo(mw, ml, rw, rl, beta=1.0, sft_weight=-1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        diffusion_dpo(mw, ml[:3], rw, rl, beta=1.0)
    with pytest.raises(ValueError, match="not one of"):
        diffusion_dpo(mw, ml, rw, rl, beta=1.0, loss_type="cpo")


# ------------------------------------------------------------------------------------------------------------
# SFT baseline and Self-NPO regression


def test_diffusion_sft_is_plain_mse():
    """Per-sample means of equal-size samples, averaged, equal F.mse_loss over the whole batch."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 4, 4, generator=g, dtype=torch.float64).unbind(0)
    err = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    out = diffusion_sft(err)
    assert torch.allclose(out.loss, F.mse_loss(pred, target))
    assert torch.equal(out.per_example, err)


def test_self_npo_zero_at_equality_and_reference_formula():
    """Reference code: torch.mean(sqrt((pred − target)² + c²) − c) over every element, c = 1e-3."""
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    target = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    assert self_npo_regression(pred, pred.clone()).loss.item() == 0.0
    c = 1e-3
    expected = torch.mean(torch.sqrt((pred - target) ** 2 + c**2) - c)
    assert torch.allclose(self_npo_regression(pred, target).loss, expected, rtol=1e-12)
    assert torch.allclose(self_npo_regression(pred, target, loss="l2").loss, F.mse_loss(pred, target))


def test_pseudo_huber_limits():
    """sqrt(d² + c²) − c = c·(sqrt(1 + (d/c)²) − 1) ≈ d²/(2c) for |d| ≪ c and ≈ |d| − c for |d| ≫ c."""
    c = 1e-3
    small = torch.full((1, 4), 1e-6, dtype=torch.float64)
    large = torch.full((1, 4), 2.0, dtype=torch.float64)
    zero = torch.zeros(1, 4, dtype=torch.float64)
    v_small = self_npo_regression(small, zero, huber_c=c).loss.item()
    v_large = self_npo_regression(large, zero, huber_c=c).loss.item()
    assert math.isclose(v_small, 1e-12 / (2 * c), rel_tol=1e-6)
    assert math.isclose(v_large, 2.0 - c, rel_tol=1e-6)


def test_self_npo_gradient_direction_and_detached_target():
    """∂ℓ/∂pred = d/sqrt(d² + c²): the sign of pred − target; no gradient reaches the teacher target."""
    pred = torch.tensor([[0.5, -0.5, 1e-4, -3.0]], dtype=torch.float64, requires_grad=True)
    target = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    out = self_npo_regression(pred, target)
    out.loss.backward()
    assert torch.equal(torch.sign(pred.grad), torch.sign(pred.detach()))
    assert target.grad is None


def test_self_npo_weights_and_errors():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(2, 2, 3, 2, 2, generator=g).unbind(0)
    w = torch.tensor([1.0, 0.0])[:, None, None, None]
    out = self_npo_regression(pred, target, weights=w)
    assert out.per_example[1].item() == 0.0 and out.per_example[0].item() > 0
    with pytest.raises(ValueError, match="huber_c"):
        self_npo_regression(pred, target, huber_c=0.0)
    with pytest.raises(ValueError, match="'l1'"):
        self_npo_regression(pred, target, loss="l1")
    with pytest.raises(ValueError, match="broadcast"):
        self_npo_regression(pred, target, weights=torch.ones(5))
    bf = self_npo_regression(pred.bfloat16(), target.bfloat16())
    assert bf.loss.dtype == torch.float32
