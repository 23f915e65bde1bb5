"""Reference-free losses: closed forms, invariants, and parity with TRL 1.16's own CPO/ORPO loss methods."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmalign.losses.pairwise import dpo
from mmalign.losses.reference_free import CPO_LOSS_TYPES, alphapo, cpo, orpo, simpo, slic

LN2 = math.log(2)
F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")


def _inputs(b=6, seed=0, scale=3.0, center=-20.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    lw = scale * torch.randn(b, generator=g, dtype=dtype) + center
    ll = scale * torch.randn(b, generator=g, dtype=dtype) + center
    nw = torch.randint(1, 9, (b,), generator=g).to(dtype)
    nl = torch.randint(1, 9, (b,), generator=g).to(dtype)
    return lw, ll, nw, nl


def _t(*xs):
    return torch.tensor(xs, dtype=F64)


# ------------------------------------------------------------------------------------------------------------
# TRL parity: TRL's loss methods only read a few attributes of `self`, so they are called unbound on a
# stand-in object; TRL receives the length-averaged log-probs itself computes for ipo/simpo/ORPO.


def _trl_cpo(lw, ll, *, beta, loss_type, label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    fake = SimpleNamespace(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                           simpo_gamma=simpo_gamma, alpha=alpha, accelerator=SimpleNamespace(device="cpu"))
    return CPOTrainer.cpo_loss(fake, lw, ll)


_CPO_CASES = [(lt, a, eps) for lt in ("sigmoid", "hinge", "ipo", "simpo") for a in (0.0, 0.3, -0.2)
              for eps in ((0.0, 0.15) if lt in ("sigmoid", "simpo") else (0.0,))]


@pytest.mark.parametrize(("loss_type", "alpha", "eps"), _CPO_CASES)
def test_cpo_trl_parity_per_example(loss_type, alpha, eps):
    lw, ll, nw, nl = _inputs(scale=3.0 if loss_type in ("ipo", "simpo") else 1.0, center=-4.0)
    beta = 0.7
    out = cpo(lw, ll, beta=beta, loss_type=loss_type, label_smoothing=eps, chosen_lengths=nw,
              rejected_lengths=nl, cpo_alpha=0.0, simpo_gamma=0.4, alpha=alpha)
    avg = loss_type in ("ipo", "simpo")
    tw, tl = (lw / nw, ll / nl) if avg else (lw, ll)
    losses, rw, rl = _trl_cpo(tw, tl, beta=beta, loss_type=loss_type, label_smoothing=eps, simpo_gamma=0.4,
                              alpha=alpha)
    torch.testing.assert_close(out.per_example, losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.metrics["rewards/chosen"], rw.mean().float())
    torch.testing.assert_close(out.metrics["rewards/rejected"], rl.mean().float())
    torch.testing.assert_close(out.metrics["rewards/accuracies"], (rw > rl).double().mean().float())


def test_cpo_total_matches_trl_mean_plus_nll():
    """TRL: loss = mean(cpo_loss) + cpo_alpha·nll, with nll one batch scalar."""
    lw, ll, nw, nl = _inputs(seed=1, center=-5.0, scale=1.0)
    nll = torch.tensor(1.7, dtype=F64)
    out = cpo(lw, ll, beta=0.3, nll_loss=nll, cpo_alpha=0.6)
    losses, _, _ = _trl_cpo(lw, ll, beta=0.3, loss_type="sigmoid")
    torch.testing.assert_close(out.loss, losses.mean() + 0.6 * nll)
    torch.testing.assert_close(out.metrics["nll_loss"], nll.float())


def test_alphapo_matches_trl_config_sugar(tmp_path):
    """TRL's CPOConfig(loss_type="alphapo") becomes simpo with cpo_alpha = 0; run TRL with that config."""
    from trl.experimental.cpo.cpo_config import CPOConfig

    cfg = CPOConfig(output_dir=str(tmp_path), loss_type="alphapo", alpha=0.25, beta=2.0, simpo_gamma=1.0,
                    report_to=[], bf16=False, use_cpu=True)
    assert (cfg.loss_type, cfg.cpo_alpha) == ("simpo", 0.0)
    lw, ll, nw, nl = _inputs(seed=2, center=-8.0)
    theirs, _, _ = _trl_cpo(lw / nw, ll / nl, beta=cfg.beta, loss_type=cfg.loss_type, simpo_gamma=cfg.simpo_gamma,
                            alpha=cfg.alpha)
    ours = alphapo(lw, ll, chosen_lengths=nw, rejected_lengths=nl, alpha=0.25, beta=2.0, gamma=1.0)
    torch.testing.assert_close(ours.per_example, theirs, rtol=1e-6, atol=1e-6)
    via_cpo = cpo(lw, ll, loss_type="alphapo", alpha=0.25, beta=2.0, simpo_gamma=1.0, chosen_lengths=nw,
                  rejected_lengths=nl)  # cpo_alpha=1.0 default is overridden, as in TRL
    torch.testing.assert_close(via_cpo.per_example, theirs, rtol=1e-6, atol=1e-6)


def test_orpo_trl_parity():
    """TRL returns β·logσ(z) per example and total nll − mean(·). TRL casts to float32 internally, so
    agreement is at float32 resolution (values here are O(1): absolute error < 1e-6)."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    lw, ll, nw, nl = _inputs(seed=3, center=-4.0, scale=1.5)
    lw, ll = -lw.abs(), -ll.abs()
    beta, nll = 0.25, torch.tensor(0.9, dtype=F64)
    fake = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    losses, rw, rl, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(fake, lw / nw, ll / nl)
    out = orpo(lw, ll, chosen_lengths=nw, rejected_lengths=nl, beta=beta, nll_loss=0.0)
    torch.testing.assert_close(out.per_example, -losses.double(), rtol=1e-6, atol=1e-6)
    total = orpo(lw, ll, chosen_lengths=nw, rejected_lengths=nl, beta=beta, nll_loss=nll).loss
    torch.testing.assert_close(total, nll - losses.double().mean(), rtol=1e-6, atol=1e-6)
    for key, ref in (("log_odds_ratio", log_odds_ratio), ("log_odds_chosen", log_odds_chosen),
                     ("rewards/chosen", rw.mean()), ("rewards/rejected", rl.mean())):
        torch.testing.assert_close(out.metrics[key], ref.float(), rtol=1e-6, atol=1e-6)


def test_log1mexp_matches_trl_in_float64():
    from trl.experimental.orpo.orpo_trainer import log1mexp

    from mmalign.losses.reference_free import _log1mexp

    x = -torch.logspace(-8, 3, 40, dtype=F64)
    torch.testing.assert_close(_log1mexp(x), log1mexp(x), rtol=1e-12, atol=0.0)


# ------------------------------------------------------------------------------------------------------------
# Closed forms on literal tensors.


def test_values_at_equal_scores():
    """Δ = 0: sigmoid ln 2, hinge 1, IPO 1/(4β²), SimPO softplus(γ) = −logσ(−γ)."""
    x, n = _t(-6.0, -6.0), _t(3.0, 3.0)
    beta, gamma = 0.25, 0.8
    expected = {"sigmoid": LN2, "hinge": 1.0, "ipo": 1 / (4 * beta**2), "simpo": math.log1p(math.exp(gamma)),
                "alphapo": math.log1p(math.exp(gamma))}
    assert set(expected) == set(CPO_LOSS_TYPES)
    for lt, val in expected.items():
        out = cpo(x, x, beta=beta, loss_type=lt, simpo_gamma=gamma, chosen_lengths=n, rejected_lengths=n,
                  cpo_alpha=0.0)
        torch.testing.assert_close(out.loss, torch.tensor(val, dtype=F64), msg=lt)


def test_cpo_sigmoid_literal():
    """L_w = −10, L_l = −14, β = 0.5: βΔ = 2, loss = −logσ(2) = log(1 + e^−2)."""
    out = cpo(_t(-10.0), _t(-14.0), beta=0.5, cpo_alpha=0.0)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(-5.0)
    assert out.metrics["rewards/margins"].item() == pytest.approx(2.0)


def test_simpo_literal():
    """a_w = −6/3 = −2, a_l = −12/4 = −3, β = 2, γ = 1: z = 2·1 − 1 = 1, loss = softplus(−1)."""
    out = simpo(_t(-6.0), _t(-12.0), chosen_lengths=_t(3.0), rejected_lengths=_t(4.0), beta=2.0, gamma=1.0)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-12)
    assert out.metrics["logps/chosen"].item() == pytest.approx(-2.0)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-6.0)


def test_alphapo_literal():
    """α = 1: r(a) = 1 − e^(−a). a_w = −ln 2 → r = 1 − 2 = −1; a_l = −ln 4 → r = −3. β = 2, γ = 1:
    z = 2·2 − 1 = 3, loss = softplus(−3)."""
    out = alphapo(_t(-2 * LN2), _t(-3 * math.log(4)), chosen_lengths=_t(2.0), rejected_lengths=_t(3.0),
                  alpha=1.0, beta=2.0, gamma=1.0)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-3.0)), abs=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(-2.0)  # β·r_w


def test_alphapo_small_alpha_is_simpo():
    lw, ll, nw, nl = _inputs(seed=4, center=-6.0)
    a = alphapo(lw, ll, chosen_lengths=nw, rejected_lengths=nl, alpha=1e-7).per_example
    b = simpo(lw, ll, chosen_lengths=nw, rejected_lengths=nl).per_example
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_orpo_literal():
    """a_w = −ln 2 (p = ½, odds 1, log-odds 0); a_l = −ln 4 (p = ¼, odds ⅓, log-odds −ln 3). z = ln 3,
    logσ(ln 3) = ln ¾. Default nll = −a_w = ln 2. Loss = ln 2 − β·ln ¾."""
    beta = 0.1
    out = orpo(_t(-2 * LN2), _t(-3 * math.log(4)), chosen_lengths=_t(2.0), rejected_lengths=_t(3.0), beta=beta)
    assert out.loss.item() == pytest.approx(LN2 - beta * math.log(0.75), abs=1e-12)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(math.log(3), rel=1e-6)
    assert out.metrics["nll_loss"].item() == pytest.approx(LN2, rel=1e-6)


def test_slic_literal():
    """δ = 1, L_w = −5, L_l = −5.5: hinge 1 − 0.5 = 0.5; λ = 0.2 times the sequence NLL 5 → 1.5.
    Once L_w − L_l ≥ δ the hinge is 0 and only the NLL remains."""
    out = slic(_t(-5.0, -5.0), _t(-5.5, -7.0), delta=1.0, nll_weight=0.2)
    torch.testing.assert_close(out.per_example, _t(1.5, 1.0))
    assert out.metrics["loss/slic"].item() == pytest.approx(0.25)
    no_reg = slic(_t(-5.0), _t(-5.5), nll_weight=0.0)
    assert no_reg.loss.item() == pytest.approx(0.5) and "nll_loss" not in no_reg.metrics


# ------------------------------------------------------------------------------------------------------------
# Invariants.


def test_reductions_to_reference_free_dpo():
    """With a zero reference, DPO's sigmoid/hinge/ipo links are CPO's (cpo_alpha = 0)."""
    lw, ll, nw, nl = _inputs(seed=5, center=-3.0, scale=1.0)
    for lt in ("sigmoid", "hinge", "ipo"):
        a = cpo(lw, ll, beta=0.4, loss_type=lt, cpo_alpha=0.0, chosen_lengths=nw, rejected_lengths=nl)
        b = dpo(lw, ll, None, None, beta=0.4, loss_type=lt, chosen_lengths=nw, rejected_lengths=nl)
        torch.testing.assert_close(a.per_example, b.per_example, msg=lt)
    s = simpo(lw, ll, chosen_lengths=nw, rejected_lengths=nl, beta=2.0, gamma=0.3).per_example
    c = cpo(lw, ll, loss_type="simpo", beta=2.0, simpo_gamma=0.3, cpo_alpha=0.0, chosen_lengths=nw,
            rejected_lengths=nl).per_example
    torch.testing.assert_close(s, c)


def test_swap_symmetry():
    """Swapping maps z → −z and −logσ(−z) = −logσ(z) + z: CPO sigmoid z = βΔ, ORPO z = log-odds ratio."""
    lw, ll, nw, nl = _inputs(seed=6, center=-4.0, scale=1.0)
    lw, ll = -lw.abs(), -ll.abs()
    a = cpo(lw, ll, beta=0.3, cpo_alpha=0.0).per_example
    b = cpo(ll, lw, beta=0.3, cpo_alpha=0.0).per_example
    torch.testing.assert_close(b, a + 0.3 * (lw - ll))
    o = orpo(lw, ll, chosen_lengths=nw, rejected_lengths=nl, beta=1.0, nll_loss=0.0)
    o_swap = orpo(ll, lw, chosen_lengths=nl, rejected_lengths=nw, beta=1.0, nll_loss=0.0)
    z = o.metrics["log_odds_chosen"].double()  # batch mean of z: compare means
    torch.testing.assert_close(o_swap.loss, o.loss + z, rtol=1e-6, atol=1e-6)


_GRAD_CASES = [
    ("cpo-sigmoid", lambda w, r, nw, nl: cpo(w, r, cpo_alpha=0.0)),
    ("cpo-hinge", lambda w, r, nw, nl: cpo(w, r, loss_type="hinge", cpo_alpha=0.0)),
    ("cpo-ipo", lambda w, r, nw, nl: cpo(w, r, loss_type="ipo", cpo_alpha=0.0, chosen_lengths=nw,
                                         rejected_lengths=nl)),
    ("cpo-alpha", lambda w, r, nw, nl: cpo(w, r, alpha=0.3, cpo_alpha=0.0)),
    ("cpo-nll", lambda w, r, nw, nl: cpo(w, r, chosen_lengths=nw)),
    ("simpo", lambda w, r, nw, nl: simpo(w, r, chosen_lengths=nw, rejected_lengths=nl)),
    ("alphapo", lambda w, r, nw, nl: alphapo(w, r, chosen_lengths=nw, rejected_lengths=nl, alpha=-0.5)),
    ("orpo", lambda w, r, nw, nl: orpo(w, r, chosen_lengths=nw, rejected_lengths=nl, nll_loss=0.0)),
    ("slic", lambda w, r, nw, nl: slic(w, r, nll_weight=0.0)),
]


@pytest.mark.parametrize(("name", "fn"), _GRAD_CASES, ids=[c[0] for c in _GRAD_CASES])
def test_gradient_signs(name, fn):
    """Near Δ = 0 descending the loss raises the chosen log-prob and lowers the rejected one."""
    lw, ll, nw, nl = _inputs(b=4, seed=7, scale=0.01, center=-3.0)
    lw.requires_grad_(True)
    ll.requires_grad_(True)
    fn(lw, ll, nw, nl).loss.backward()
    assert (lw.grad < 0).all(), name
    assert (ll.grad > 0).all(), name


def test_nll_term_handling():
    lw, ll, nw, nl = _inputs(seed=8, center=-5.0)
    pref = cpo(lw, ll, cpo_alpha=0.0).per_example
    derived = cpo(lw, ll, cpo_alpha=0.5, chosen_lengths=nw)
    torch.testing.assert_close(derived.per_example, pref + 0.5 * (-lw / nw))
    per_ex_nll = torch.rand(6, dtype=F64)
    given = cpo(lw, ll, cpo_alpha=2.0, nll_loss=per_ex_nll)
    torch.testing.assert_close(given.per_example, pref + 2.0 * per_ex_nll)
    with pytest.raises(ValueError, match="nll_loss"):
        cpo(lw, ll)  # cpo_alpha = 1 needs an NLL source
    orpo_zero = orpo(lw, ll, chosen_lengths=nw, rejected_lengths=nl, nll_loss=0.0).per_example
    orpo_default = orpo(lw, ll, chosen_lengths=nw, rejected_lengths=nl).per_example
    torch.testing.assert_close(orpo_default - orpo_zero, -lw / nw)


def test_sample_weight_and_sum_reduction():
    lw, ll, nw, nl = _inputs(seed=9, center=-5.0)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 3.0], dtype=F64)
    out = cpo(lw, ll, cpo_alpha=0.0, sample_weight=w)
    torch.testing.assert_close(out.loss, (w * out.per_example).sum() / w.sum())
    out_sum = slic(lw, ll, reduction="sum")
    torch.testing.assert_close(out_sum.loss, out_sum.per_example.sum())


def test_empty_completion_and_certain_completion_are_finite():
    """A zero-length completion (L = 0, n = 0) averages to 0, not NaN. ORPO at a_w = 0 (p = 1 for every
    token) has log(1 − e^a) = −inf in exact arithmetic; the clamp keeps value and gradient finite."""
    lw = _t(0.0, -3.0).requires_grad_(True)
    ll = _t(-2.0, 0.0).requires_grad_(True)
    n0 = _t(0.0, 2.0)
    n1 = _t(2.0, 0.0)
    for out in (simpo(lw, ll, chosen_lengths=n0, rejected_lengths=n1),
                cpo(lw, ll, loss_type="ipo", chosen_lengths=n0, rejected_lengths=n1),
                orpo(lw, ll, chosen_lengths=n0, rejected_lengths=n1)):
        lw.grad = ll.grad = None
        out.loss.backward()
        assert torch.isfinite(out.per_example).all()
        assert torch.isfinite(lw.grad).all() and torch.isfinite(ll.grad).all()


_EXTREME = [
    ("cpo-" + lt, lambda w, r, n, lt=lt: cpo(w, r, loss_type=lt, chosen_lengths=n, rejected_lengths=n))
    for lt in CPO_LOSS_TYPES
] + [
    ("cpo-alpha-ipo", lambda w, r, n: cpo(w, r, loss_type="ipo", alpha=0.5, cpo_alpha=0.0, chosen_lengths=n,
                                          rejected_lengths=n)),
    ("alphapo-neg", lambda w, r, n: alphapo(w, r, chosen_lengths=n, rejected_lengths=n, alpha=-1.0)),
    ("alphapo-pos", lambda w, r, n: alphapo(w, r, chosen_lengths=n, rejected_lengths=n, alpha=1.0)),
    ("orpo", lambda w, r, n: orpo(w, r, chosen_lengths=n, rejected_lengths=n)),
    ("slic", lambda w, r, n: slic(w, r)),
]


@pytest.mark.parametrize(("name", "fn"), _EXTREME, ids=[c[0] for c in _EXTREME])
def test_finite_at_extremes(name, fn):
    lw = torch.tensor([-1e4, 0.0, -1e4, -1.0]).requires_grad_(True)
    ll = torch.tensor([0.0, -1e4, -1e4, -1e4]).requires_grad_(True)
    n = torch.ones(4)
    out = fn(lw, ll, n)
    out.loss.backward()
    assert torch.isfinite(out.per_example).all(), name
    assert torch.isfinite(lw.grad).all() and torch.isfinite(ll.grad).all(), name


def test_bf16_inputs_compute_in_fp32():
    lw, ll, nw, nl = (t.to(torch.bfloat16) for t in _inputs(seed=10, center=-5.0))
    for out in (cpo(lw, ll, chosen_lengths=nw), simpo(lw, ll, chosen_lengths=nw, rejected_lengths=nl),
                orpo(lw, ll, chosen_lengths=nw, rejected_lengths=nl), slic(lw, ll)):
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        assert all(v.dtype == torch.float32 and not v.requires_grad and v.dim() == 0
                   for v in out.metrics.values())
    ref = cpo(lw.float(), ll.float(), chosen_lengths=nw.float()).loss
    torch.testing.assert_close(cpo(lw, ll, chosen_lengths=nw).loss, ref)


def test_metrics_contract():
    lw, ll, nw, nl = _inputs(seed=11, center=-5.0)
    out = cpo(lw, ll, beta=0.2, chosen_lengths=nw)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "nll_loss", "loss/cpo"} <= set(out.metrics)
    torch.testing.assert_close(out.metrics["rewards/chosen"], (0.2 * lw).mean().float())
    assert 0.0 <= out.metrics["rewards/accuracies"].item() <= 1.0
    o = orpo(lw, ll, chosen_lengths=nw, rejected_lengths=nl)
    assert {"log_odds_ratio", "log_odds_chosen", "nll_loss", "logps/chosen"} <= set(o.metrics)
    torch.testing.assert_close(o.metrics["logps/chosen"], (lw / nw).mean().float())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"loss_type": "dpo"}, "loss_type='dpo'"),
    ({"beta": 0.0}, "beta=0.0"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing"),
    ({"label_smoothing": 0.7}, r"\[0, 0.5\]"),
    ({"loss_type": "simpo", "cpo_alpha": 0.0}, "rejected_lengths|chosen_lengths"),
    ({"cpo_alpha": -1.0}, ">= 0"),
])
def test_bad_arguments_raise(kwargs, match):
    lw, ll, nw, _ = _inputs(b=3, seed=12)
    kwargs = {"chosen_lengths": nw, **kwargs} if kwargs.get("loss_type") != "simpo" else kwargs
    with pytest.raises(ValueError, match=match):
        cpo(lw, ll, **kwargs)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        slic(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        orpo(torch.zeros(3), torch.zeros(3), chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(3))
    with pytest.raises(ValueError, match=r"\[B\]"):
        cpo(torch.zeros(2, 3), torch.zeros(2, 3), cpo_alpha=0.0)


def test_smoothing_reduces_to_cdpo_form():
    """label_smoothing ε: −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ) (cDPO), for sigmoid and simpo."""
    lw, ll, nw, nl = _inputs(seed=13, center=-4.0, scale=1.0)
    z = 0.5 * (lw - ll)
    out = cpo(lw, ll, beta=0.5, label_smoothing=0.2, cpo_alpha=0.0).per_example
    torch.testing.assert_close(out, -0.8 * F.logsigmoid(z) - 0.2 * F.logsigmoid(-z))
