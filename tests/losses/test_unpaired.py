"""Unpaired and unlearning losses: closed forms, invariants, and parity with TRL 1.16's KTOTrainer."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmalign.losses._base import LossOutput
from mmalign.losses.pairwise import dpo
from mmalign.losses.unpaired import (
    bco,
    bco_running_mean,
    gradient_ascent,
    kto,
    kto_reference_point,
    npo,
    simnpo,
    unlearning_objective,
)

LN2 = math.log(2)
F64 = torch.float64


def _inputs(b=6, seed=0, scale=2.0, center=-20.0):
    g = torch.Generator().manual_seed(seed)
    lp = scale * torch.randn(b, generator=g, dtype=F64) + center
    ref = scale * torch.randn(b, generator=g, dtype=F64) + center
    n = torch.randint(1, 9, (b,), generator=g).to(F64)
    return lp, ref, n


def _t(*xs):
    return torch.tensor(xs, dtype=F64)


LABELS = torch.tensor([True, False, True, True, False, False])

# ------------------------------------------------------------------------------------------------------------
# TRL parity: KTOTrainer has no standalone loss function, so its real `_compute_loss` runs on a stand-in
# model whose single completion token carries the whole sequence log-prob (precomputed reference log-probs).


def _trl_kto(lp, ref, labels, kl_policy, kl_ref, *, loss_type, beta, dw, uw):
    from trl.trainer.kto_trainer import KTOTrainer

    b = lp.shape[0]
    tok = lp.reshape(b, 1)

    def model(**kw):
        return SimpleNamespace(log_probs=tok, entropy=torch.zeros_like(tok), mean_logits=torch.zeros_like(tok))

    model.training = True
    calculate_kl = loss_type == "kto"
    fake = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        _compute_kl_logps=lambda m, batch: kl_policy if calculate_kl else None, aux_loss_enabled=False,
        precompute_ref_logps=True, calculate_KL=calculate_kl, loss_type=loss_type, beta=beta,
        desirable_weight=dw, undesirable_weight=uw, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros(b, 2, dtype=torch.long), "attention_mask": torch.ones(b, 2),
              "completion_mask": torch.ones(b, 2, dtype=torch.long), "label": labels, "ref_logps": ref,
              "ref_KL_logps": kl_ref}
    loss = KTOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("kl_shift", [0.5, -3.0])  # a negative mean mismatched log-ratio clamps z0 to 0
def test_kto_trl_parity_value_gradient_metrics(loss_type, kl_shift):
    """Loss, per-example gradients (∂loss/∂L_i = per-example derivative / B) and metrics agree in float64."""
    lp, ref, _ = _inputs(seed=1, scale=0.5)
    kl_policy, kl_ref, _ = _inputs(seed=2, scale=0.5)
    kl_policy = kl_policy + kl_shift
    beta, dw, uw = 0.7, 1.3, 0.6

    lp_trl = lp.clone().requires_grad_(True)
    theirs, m = _trl_kto(lp_trl, ref, LABELS, kl_policy, kl_ref, loss_type=loss_type, beta=beta, dw=dw, uw=uw)
    theirs.backward()

    lp_ours = lp.clone().requires_grad_(True)
    z0 = kto_reference_point(kl_policy, kl_ref) if loss_type == "kto" else None
    out = kto(lp_ours, ref, LABELS, kl_ref_point=z0, beta=beta, desirable_weight=dw, undesirable_weight=uw,
              loss_type=loss_type)
    out.loss.backward()

    torch.testing.assert_close(out.loss, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lp_ours.grad, lp_trl.grad, rtol=1e-6, atol=1e-9)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"):
        assert out.metrics[key].item() == pytest.approx(m[key], rel=1e-5, abs=1e-6), key


# ------------------------------------------------------------------------------------------------------------
# KTO.


def test_kto_reference_point():
    """z0 = max(0, mean(L' − R')), detached; reduce_fn sees the local mean (TRL averages rank means)."""
    lp = _t(-3.0, -5.0).requires_grad_(True)
    z0 = kto_reference_point(lp, _t(-4.0, -5.0))  # mean log-ratio (1 + 0)/2 = 0.5
    assert z0.item() == pytest.approx(0.5) and not z0.requires_grad
    assert kto_reference_point(_t(-6.0), _t(-4.0)).item() == 0.0  # −2 clamps to 0
    other_rank = torch.tensor(1.5, dtype=F64)
    z0_global = kto_reference_point(lp, _t(-4.0, -5.0), reduce_fn=lambda m: torch.stack([m, other_rank]))
    assert z0_global.item() == pytest.approx(1.0)


def test_kto_values_at_reference_point():
    """r = z0: every example gives λ·(1 − σ(0)) = λ/2; apo_zero_unpaired at r = 0 gives λ/2 too."""
    lp = _t(-3.0, -3.0, -3.0)
    ref = _t(-3.4, -3.4, -3.4)  # r = 0.4
    labels = torch.tensor([True, False, True])
    out = kto(lp, ref, labels, kl_ref_point=0.4, desirable_weight=2.0, undesirable_weight=0.5)
    torch.testing.assert_close(out.per_example, _t(1.0, 0.25, 1.0))
    apo = kto(lp, lp, labels, loss_type="apo_zero_unpaired")
    torch.testing.assert_close(apo.per_example, _t(0.5, 0.5, 0.5))


def test_kto_literal():
    """β = 1, z0 = 1: desirable r = 3 → 1 − σ(2) = σ(−2); undesirable r = −1 → 1 − σ(1 − (−1)) = σ(−2).
    apo_zero_unpaired: desirable 1 − σ(3) = σ(−3), undesirable σ(−1)."""
    lp, ref = _t(-2.0, -6.0), _t(-5.0, -5.0)
    labels = torch.tensor([True, False])
    sig = torch.sigmoid
    out = kto(lp, ref, labels, kl_ref_point=torch.tensor(1.0), beta=1.0)
    torch.testing.assert_close(out.per_example, sig(_t(-2.0, -2.0)))
    apo = kto(lp, ref, labels, beta=1.0, loss_type="apo_zero_unpaired")
    torch.testing.assert_close(apo.per_example, sig(_t(-3.0, -1.0)))


def test_kto_gradient_signs_and_detached_z0():
    lp, ref, _ = _inputs(seed=3, scale=0.3)
    lp.requires_grad_(True)
    z0 = torch.tensor(0.2, dtype=F64, requires_grad=True)
    kto(lp, ref, LABELS, kl_ref_point=z0).loss.backward()
    assert (lp.grad[LABELS] < 0).all() and (lp.grad[~LABELS] > 0).all()
    assert z0.grad is None  # z0 is a detached baseline


@pytest.mark.parametrize("fn", ["kto", "bco"])
def test_single_sided_batches_have_no_nan(fn):
    lp, ref, _ = _inputs(b=3, seed=4)
    for labels, present, absent in ((torch.ones(3, dtype=torch.bool), "chosen", "rejected"),
                                    (torch.zeros(3, dtype=torch.bool), "rejected", "chosen")):
        out = kto(lp, ref, labels, kl_ref_point=0.0) if fn == "kto" else bco(lp, ref, labels)
        assert torch.isfinite(out.loss)
        assert all(torch.isfinite(v) for v in out.metrics.values())
        assert f"rewards/{present}" in out.metrics and f"rewards/{absent}" not in out.metrics
        assert "rewards/margins" not in out.metrics
        assert out.metrics[f"count/{present}"].item() == 3 and out.metrics[f"count/{absent}"].item() == 0


def test_kto_bad_arguments():
    lp, ref, _ = _inputs(b=6, seed=5)
    with pytest.raises(ValueError, match="kl_ref_point"):
        kto(lp, ref, LABELS)
    with pytest.raises(ValueError, match="loss_type='bco'"):
        kto(lp, ref, LABELS, kl_ref_point=0.0, loss_type="bco")
    with pytest.raises(ValueError, match="undesirable_weight"):
        kto(lp, ref, LABELS, kl_ref_point=0.0, undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="scalar"):
        kto(lp, ref, LABELS, kl_ref_point=torch.zeros(2))
    with pytest.raises(ValueError, match="labels"):
        kto(lp, ref, torch.tensor([0, 1, 2, 0, 1, 0]), kl_ref_point=0.0)
    with pytest.raises(ValueError, match="shape"):
        kto(lp, ref[:4], LABELS, kl_ref_point=0.0)


# ------------------------------------------------------------------------------------------------------------
# BCO.


def test_bco_literal_and_value_at_shift():
    """β = 0.5, δ = 1: desirable r = 4 → βr − δ = 1 → −logσ(1); undesirable r = 6 → −logσ(−2).
    At βr = δ both sides give ln 2."""
    labels = torch.tensor([True, False])
    out = bco(_t(-1.0, -2.0), _t(-5.0, -8.0), labels, beta=0.5, delta=1.0)
    torch.testing.assert_close(out.per_example, -F.logsigmoid(_t(1.0, -2.0)))
    at_shift = bco(_t(-1.0, -1.0), _t(-3.0, -3.0), labels, beta=0.5, delta=1.0)
    torch.testing.assert_close(at_shift.per_example, _t(LN2, LN2))
    assert out.metrics["delta"].item() == 1.0


def test_bco_zero_shift_pair_is_dpo_bco_pair():
    """δ = 0 with one desirable and one undesirable per prompt: the sum is TRL's DPO bco_pair."""
    lw, rw, _ = _inputs(b=4, seed=6, scale=1.0)
    ll, rl, _ = _inputs(b=4, seed=7, scale=1.0)
    labels = torch.cat([torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)])
    out = bco(torch.cat([lw, ll]), torch.cat([rw, rl]), labels, beta=0.3)
    pair = dpo(lw, ll, rw, rl, beta=0.3, loss_type="bco_pair").per_example
    torch.testing.assert_close(out.per_example[:4] + out.per_example[4:], pair)


def test_bco_gradient_signs_and_udm_weight():
    lp, ref, _ = _inputs(seed=8, scale=0.3)
    lp.requires_grad_(True)
    bco(lp, ref, LABELS, delta=0.1).loss.backward()
    assert (lp.grad[LABELS] < 0).all() and (lp.grad[~LABELS] > 0).all()
    w = _t(5.0, 2.0, 5.0, 5.0, 0.5, 1.0)
    plain = bco(lp, ref, LABELS).per_example
    weighted = bco(lp, ref, LABELS, udm_weight=w).per_example
    torch.testing.assert_close(weighted, torch.where(LABELS, plain, w * plain))


def test_bco_running_mean_is_cumulative_mean():
    """Count-weighted merging equals the mean of everything seen; the first batch gives its own mean."""
    a, b = _t(1.0, 2.0, 3.0), _t(10.0)
    m, n = bco_running_mean(a)
    assert (m.item(), n) == (2.0, 3.0)
    m, n = bco_running_mean(b, mean=m, count=n)
    assert m.item() == pytest.approx(16.0 / 4) and n == 4.0
    m2, n2 = bco_running_mean(torch.empty(0, dtype=F64), mean=m, count=n)
    assert m2.item() == m.item() and n2 == n


# ------------------------------------------------------------------------------------------------------------
# NPO, SimNPO, gradient ascent.


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_value_and_gradient_at_init(beta):
    """π = π_ref: value (2/β)·ln 2 (13.86 at β = 0.1); gradient = GA's (∂/∂L_i = 1/B)."""
    lp, _, _ = _inputs(seed=9)
    a = lp.clone().requires_grad_(True)
    out = npo(a, lp, beta=beta)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(2 / beta * LN2, rel=1e-12)
    g = lp.clone().requires_grad_(True)
    gradient_ascent(g).loss.backward()
    torch.testing.assert_close(a.grad, g.grad, rtol=1e-12, atol=0.0)


def test_npo_literal_limits_and_sign():
    """β = 0.5, r = 2: (2/0.5)·softplus(1) = 4·ln(1 + e). ∂L/∂L_θ = 2σ(βr) > 0; as β → 0 it tends to the GA
    gradient 1 even away from init; L → 0 as r → −∞ (and stays finite at r = −1e4)."""
    out = npo(_t(-3.0), _t(-5.0), beta=0.5)
    assert out.loss.item() == pytest.approx(4 * math.log1p(math.e), rel=1e-12)
    lp = _t(-3.0, -30.0, -1e4).requires_grad_(True)
    ref = _t(-5.0, -10.0, 0.0)
    npo(lp, ref, beta=0.5, reduction="sum").loss.backward()
    torch.testing.assert_close(lp.grad, 2 * torch.sigmoid(0.5 * (lp - ref)).detach())
    assert (lp.grad[:2] > 0).all() and lp.grad[2] >= 0  # σ(−5000) underflows to 0: no NaN, no sign flip
    small = lp.detach().clone().requires_grad_(True)
    npo(small, ref, beta=1e-9, reduction="sum").loss.backward()
    torch.testing.assert_close(small.grad[:2], _t(1.0, 1.0), rtol=1e-6, atol=1e-6)
    tail = npo(_t(-1e4), _t(0.0), beta=0.1)
    assert torch.isfinite(tail.loss) and tail.loss.item() < 1e-30


def test_simnpo_closed_form_and_gamma_convention():
    """L = −6, n = 3 (a = −2), β = 2.5, γ = 0.4: code form (2/β)·softplus(β(a + γ)) = 0.8·softplus(−4);
    paper form −(2/β)·logσ(−β·a − γ_paper) with γ_paper = β·γ = 1 gives the same number."""
    out = simnpo(_t(-6.0), _t(3.0), beta=2.5, gamma=0.4)
    assert out.loss.item() == pytest.approx(0.8 * math.log1p(math.exp(-4.0)), rel=1e-12)
    paper = -(2 / 2.5) * F.logsigmoid(torch.tensor(-2.5 * -2.0 - 2.5 * 0.4, dtype=F64))
    assert out.loss.item() == pytest.approx(paper.item(), rel=1e-12)


def test_simnpo_scale_invariance_and_sign():
    """Doubling both L and n leaves a = L/n, hence the loss, unchanged; ∂/∂L > 0 (lowers likelihood)."""
    lp, _, n = _inputs(seed=10)
    a = simnpo(lp, n, gamma=0.3).per_example
    b = simnpo(2 * lp, 2 * n, gamma=0.3).per_example
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    x = lp.clone().requires_grad_(True)
    simnpo(x, n).loss.backward()
    assert (x.grad > 0).all()


def test_gradient_ascent_values():
    lp, _, n = _inputs(seed=11)
    torch.testing.assert_close(gradient_ascent(lp).loss, lp.mean())
    torch.testing.assert_close(gradient_ascent(lp, lengths=n).per_example, lp / n)


def test_npo_plus_retain_equals_weighted_sum():
    """NPO+RT (+KL): total = w_f·NPO + w_r·NLL_retain + w_kl·KL_retain; gradients reach both batches."""
    lp, ref, _ = _inputs(seed=12)
    lp.requires_grad_(True)
    retain_nll = torch.tensor(1.25, dtype=F64, requires_grad=True)
    retain_kl = _t(0.1, 0.3).requires_grad_(True)  # per-example retain KL is averaged
    forget = npo(lp, ref, beta=0.1)
    out = unlearning_objective(forget, retain_nll=retain_nll, retain_kl=retain_kl, forget_weight=0.1375,
                               retain_weight=1.0, kl_weight=0.5)
    expected = 0.1375 * forget.loss + 1.0 * retain_nll + 0.5 * retain_kl.mean()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.per_example.mean(), out.loss)
    out.loss.backward()
    assert lp.grad is not None and retain_nll.grad.item() == pytest.approx(1.0)
    assert out.metrics["loss/retain_nll"].item() == 1.25
    assert out.metrics["loss/retain_kl"].item() == pytest.approx(0.2)
    assert out.metrics["loss/forget"].item() == pytest.approx(forget.loss.item(), rel=1e-6)
    assert "loss/npo" in out.metrics  # the forget loss's own metrics are kept
    bare = unlearning_objective(forget)
    assert isinstance(bare, LossOutput) and set(bare.metrics) - set(forget.metrics) == {"loss/forget"}


def test_zero_length_rows_are_finite():
    lp = _t(0.0, -4.0).requires_grad_(True)
    n = _t(0.0, 2.0)
    for out in (simnpo(lp, n), gradient_ascent(lp, lengths=n)):
        lp.grad = None
        out.loss.backward()
        assert torch.isfinite(out.per_example).all() and torch.isfinite(lp.grad).all()


_EXTREME = {
    "kto": lambda lp, ref, lab, n: kto(lp, ref, lab, kl_ref_point=0.0),
    "apo_zero_unpaired": lambda lp, ref, lab, n: kto(lp, ref, lab, loss_type="apo_zero_unpaired"),
    "bco": lambda lp, ref, lab, n: bco(lp, ref, lab),
    "npo": lambda lp, ref, lab, n: npo(lp, ref),
    "simnpo": lambda lp, ref, lab, n: simnpo(lp, n),
    "gradient_ascent": lambda lp, ref, lab, n: gradient_ascent(lp, lengths=n),
}


@pytest.mark.parametrize("name", sorted(_EXTREME))
def test_finite_at_extremes(name):
    lp = torch.tensor([1e4, -1e4, 0.0, -1e4]).requires_grad_(True)
    ref = torch.tensor([-1e4, 1e4, -1e4, 0.0])
    labels = torch.tensor([True, False, False, True])
    out = _EXTREME[name](lp, ref, labels, torch.ones(4))
    out.loss.backward()
    assert torch.isfinite(out.per_example).all() and torch.isfinite(lp.grad).all(), name


@pytest.mark.parametrize("name", sorted(_EXTREME))
def test_bf16_inputs_compute_in_fp32(name):
    lp, ref, n = (t.to(torch.bfloat16) for t in _inputs(seed=13, scale=0.5))
    out = _EXTREME[name](lp, ref, LABELS, n)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad for v in out.metrics.values())
    ref_out = _EXTREME[name](lp.float(), ref.float(), LABELS, n.float())
    torch.testing.assert_close(out.loss, ref_out.loss)


def test_sample_weight_and_bad_betas():
    lp, ref, n = _inputs(seed=14)
    w = _t(1.0, 0.0, 2.0, 1.0, 0.5, 3.0)
    out = npo(lp, ref, sample_weight=w)
    torch.testing.assert_close(out.loss, (w * out.per_example).sum() / w.sum())
    for call in (lambda: npo(lp, ref, beta=0.0), lambda: simnpo(lp, n, beta=-1.0),
                 lambda: bco(lp, ref, LABELS, beta=0.0), lambda: kto(lp, ref, LABELS, kl_ref_point=0.0, beta=0)):
        with pytest.raises(ValueError, match="beta"):
            call()
    with pytest.raises(ValueError, match="forget_weight"):
        unlearning_objective(npo(lp, ref), forget_weight=float("nan"))
