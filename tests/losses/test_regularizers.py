"""NLL, KL-to-reference, XPO bonus, entropy bonus and ``combine``: closed forms, masks, gradients, parity
with torch's cross-entropy and TRL 1.16's own ``"sft"`` loss type."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.losses._base import LossOutput
from mmalign.losses.pairwise import dpo
from mmalign.losses.regularizers import combine, entropy_bonus, kl_to_ref, nll, xpo_bonus

LN2 = math.log(2)
D = torch.float64


def _tokens(b=3, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g, dtype=D) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)[:b, :t]
    return lp, mask


# ------------------------------------------------------------------------------------------------------------
# nll


def test_nll_per_sequence_mean_and_sum_closed_form():
    """Row 0: tokens −1, −2 (third padded with −inf) ⇒ mean NLL 1.5, sum 3; row 1: −4 ⇒ 4 and 4."""
    lp = torch.tensor([[-1.0, -2.0, -math.inf], [-4.0, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    mean = nll(lp, mask)
    assert torch.equal(mean.per_example, torch.tensor([1.5, 4.0], dtype=D))
    assert mean.loss.item() == 2.75
    total = nll(lp, mask, reduction_over_tokens="sum")
    assert torch.equal(total.per_example, torch.tensor([3.0, 4.0], dtype=D))
    tok = nll(lp, mask, token_level_mean=True)  # (1 + 2 + 4) / 3 tokens
    assert math.isclose(tok.loss.item(), 7 / 3, rel_tol=1e-12)
    assert math.isclose(tok.metrics["nll/token_mean"].item(), 7 / 3, rel_tol=1e-6)


def test_nll_token_level_mean_matches_cross_entropy():
    """token_level_mean=True is HF-style F.cross_entropy(ignore_index=-100) over the flattened batch."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 7, generator=g, dtype=D)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    _, mask = _tokens()
    lp = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    ce = F.cross_entropy(logits.reshape(-1, 7), labels.masked_fill(~mask, -100).reshape(-1), ignore_index=-100)
    out = nll(lp, mask, token_level_mean=True)
    torch.testing.assert_close(out.loss, ce, rtol=1e-12, atol=1e-12)
    # per-sequence default differs when lengths differ (3, 5, 2 tokens)
    assert not torch.allclose(nll(lp, mask).loss, ce)


def test_nll_token_level_mean_matches_trl_sft():
    """TRL 1.16 DPOTrainer._compute_loss with loss_type='sft' (its own code, via the stand-in model of
    test_pairwise) is the batch token mean of the chosen completions."""
    from tests.losses.test_pairwise import _run_trl

    lp, mask = _tokens(seed=2)
    b, t = lp.shape
    completion_mask = torch.zeros(2 * b, t + 1, dtype=torch.long)
    completion_mask[:b, 1:] = mask.long()
    completion_mask[b:, 1:] = 1
    tok = torch.cat([lp, torch.full_like(lp, -0.3)])  # rejected rows are ignored by 'sft'
    theirs = _run_trl(tok, completion_mask, torch.zeros(b, dtype=D), torch.zeros(b, dtype=D),
                      loss_type="sft", beta=0.1)
    ours = nll(lp, mask, token_level_mean=True).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_nll_token_level_mean_with_sample_weight():
    """Weighted token mean Σ_i w_i·S_i / Σ_i w_i·n_i (S = summed NLL, n = token count)."""
    lp, mask = _tokens(seed=3)
    w = torch.tensor([2.0, 0.5, 1.0], dtype=D)
    s = -(lp * mask).sum(-1)
    n = mask.sum(-1).to(D)
    out = nll(lp, mask, token_level_mean=True, sample_weight=w)
    torch.testing.assert_close(out.loss, (w * s).sum() / (w * n).sum())


def test_nll_masks_gradients_and_fully_masked_rows():
    """∂L/∂lp_it = −1/(n_i·B) on real tokens, exactly 0 on padding (even where padding is NaN);
    a fully masked row gives 0 loss and no NaN."""
    lp = torch.tensor([[-1.0, float("nan"), -2.0], [-3.0, -4.0, -5.0], [float("-inf"), 0.0, 0.0]], dtype=D,
                      requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0]])
    out = nll(lp, mask)
    assert torch.isfinite(out.loss) and out.per_example[2].item() == 0.0
    (g,) = torch.autograd.grad(out.loss, lp)
    expected = torch.tensor([[-1 / 6, 0, -1 / 6], [-1 / 9, -1 / 9, -1 / 9], [0, 0, 0]], dtype=D)
    torch.testing.assert_close(g, expected)


def test_nll_sequence_input_bf16_and_errors():
    seq = torch.tensor([-2.0, -4.0], dtype=torch.bfloat16)
    out = nll(seq)
    assert out.loss.dtype == torch.float32 and out.loss.item() == 3.0
    with pytest.raises(ValueError, match="no mask"):
        nll(seq, torch.ones(2))
    with pytest.raises(ValueError, match="'max'"):
        nll(torch.zeros(2, 3), reduction_over_tokens="max")
    with pytest.raises(ValueError, match="shape mismatch"):
        nll(torch.zeros(2, 3), torch.ones(2, 4))


# ------------------------------------------------------------------------------------------------------------
# kl_to_ref


def test_kl_estimators_closed_form():
    """x = log π − log π_ref ∈ {0, ln 2, −ln 2}: k1 = x; k2 = x²/2; k3 = e^{−x} − 1 + x, i.e.
    0, ln2 − ½, 1 − ln2."""
    x = torch.tensor([[0.0, LN2, -LN2]], dtype=D)
    ref = torch.full_like(x, -1.0)
    pol = ref + x
    for est, per_token in {
        "k1": x, "k2": x**2 / 2, "k3": torch.tensor([[0.0, LN2 - 0.5, 1 - LN2]], dtype=D),
    }.items():
        out = kl_to_ref(pol, ref, estimator=est)
        torch.testing.assert_close(out.per_example, per_token.mean(-1))
        torch.testing.assert_close(out.metrics[f"kl/{est}"], per_token.mean().float())


def _enumerated(seed=0, v=5):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(v, generator=g, dtype=D, requires_grad=True)
    ref_logp = torch.randn(v, generator=g, dtype=D).log_softmax(-1)
    return theta, ref_logp


@pytest.mark.parametrize("est", ["k1", "k3"])
def test_k1_k3_unbiased_by_enumeration(est):
    """E_{y~π}[k(y)] = KL(π‖π_ref): one example per vocabulary item, weighted by π, summed."""
    theta, ref_logp = _enumerated()
    logp = theta.detach().log_softmax(-1)
    out = kl_to_ref(logp[:, None], ref_logp[:, None], estimator=est, sample_weight=logp.exp(), reduction="sum")
    kl = (logp.exp() * (logp - ref_logp)).sum()
    torch.testing.assert_close(out.loss, kl, rtol=1e-12, atol=1e-12)


def test_estimator_gradients_by_enumeration():
    """On-policy expected gradients (the docstring's derivation): k1 → 0, k2 → ∇KL(π‖π_ref),
    k3 → ∇KL(π_ref‖π)."""
    theta, ref_logp = _enumerated(seed=1)
    logp = theta.log_softmax(-1)
    p = logp.exp().detach()

    def expected_grad(est):
        out = kl_to_ref(logp[:, None], ref_logp[:, None], estimator=est, sample_weight=p, reduction="sum")
        return torch.autograd.grad(out.loss, theta, retain_graph=True)[0]

    rev = torch.autograd.grad((logp.exp() * (logp - ref_logp)).sum(), theta, retain_graph=True)[0]
    fwd = torch.autograd.grad((ref_logp.exp() * (ref_logp - logp)).sum(), theta, retain_graph=True)[0]
    torch.testing.assert_close(expected_grad("k1"), torch.zeros_like(theta), atol=1e-12, rtol=0)
    torch.testing.assert_close(expected_grad("k2"), rev, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(expected_grad("k3"), fwd, rtol=1e-10, atol=1e-12)


def test_kl_masks_full_passthrough_and_sum():
    lp, mask = _tokens(seed=4)
    ref = lp - 0.1
    pad = ~mask
    lp_pad = lp.masked_fill(pad, float("-inf"))
    ref_pad = ref.masked_fill(pad, float("nan"))
    out = kl_to_ref(lp_pad, ref_pad, mask, estimator="k2")
    torch.testing.assert_close(out.per_example, torch.full((3,), 0.005, dtype=D))
    token_kl = torch.rand(3, 5, dtype=D).masked_fill(pad, float("inf"))
    full = kl_to_ref(None, None, mask, estimator="full", token_kl=token_kl)
    expected = torch.where(mask, token_kl, 0).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(full.per_example, expected)
    summed = kl_to_ref(None, None, mask, estimator="full", token_kl=token_kl, reduction_over_tokens="sum")
    torch.testing.assert_close(summed.per_example, torch.where(mask, token_kl, 0).sum(-1))


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_fully_masked_rows_and_extremes(est):
    """|x| = 1e4 on real tokens: finite values and gradients (k3's exp is clamped); a fully masked row is 0."""
    lp = torch.tensor([[-1e4, 0.0], [0.0, -1e4], [float("nan"), 1.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -1e4], [-1e4, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 1], [0, 0]])
    out = kl_to_ref(lp, ref, mask, estimator=est)
    (g,) = torch.autograd.grad(out.loss, lp)
    assert torch.isfinite(out.per_example).all() and torch.isfinite(g).all()
    assert out.per_example[2].item() == 0.0 and g[2].abs().sum().item() == 0.0


def test_kl_bf16_and_errors():
    lp, mask = _tokens()
    out = kl_to_ref(lp.bfloat16(), (lp - 0.5).bfloat16(), mask)
    assert out.loss.dtype == torch.float32 and out.loss.item() > 0
    with pytest.raises(ValueError, match="'k4'"):
        kl_to_ref(lp, lp, estimator="k4")
    with pytest.raises(ValueError, match="needs token_kl"):
        kl_to_ref(None, None, estimator="full")
    with pytest.raises(ValueError, match="only used with estimator='full'"):
        kl_to_ref(lp, lp, token_kl=lp)
    with pytest.raises(ValueError, match="needs policy_token_logps"):
        kl_to_ref(lp, None)


# ------------------------------------------------------------------------------------------------------------
# xpo_bonus and entropy_bonus


def test_xpo_gradient_is_plus_alpha():
    lp = torch.tensor([-30.0, -12.5, -7.0], dtype=D, requires_grad=True)
    out = xpo_bonus(lp, alpha=1e-2, reduction="sum")
    (g,) = torch.autograd.grad(out.loss, lp)
    torch.testing.assert_close(g, torch.full_like(lp, 1e-2))
    torch.testing.assert_close(out.per_example, 1e-2 * lp.detach())
    with pytest.raises(ValueError, match="alpha=-1"):
        xpo_bonus(lp, alpha=-1.0)
    with pytest.raises(ValueError, match=r"\[B\]"):
        xpo_bonus(lp[:, None], alpha=1.0)


def test_xpo_value_at_init_and_alpha_zero_is_online_dpo():
    """Policy == ref ⇒ XPO = ln 2 + α·mean L_θ(ỹ); α = 0 ⇒ exactly the DPO term."""
    g = torch.Generator().manual_seed(5)
    lw, ll, ly = (torch.randn(4, generator=g, dtype=D) - 20 for _ in range(3))
    d = dpo(lw, ll, lw.clone(), ll.clone(), beta=0.1)
    total = combine({"dpo": (1.0, d), "xpo": (1.0, xpo_bonus(ly, alpha=1e-3))})
    torch.testing.assert_close(total.loss, LN2 + 1e-3 * ly.mean())
    zero = combine({"dpo": (1.0, d), "xpo": (1.0, xpo_bonus(ly, alpha=0.0))})
    assert torch.equal(zero.loss, d.loss) and torch.equal(zero.per_example, d.per_example)


def test_entropy_bonus_closed_form_and_gradient():
    """Row entropies (1, 3 | pad) and (2): per_example = −coef·mean_t H = (−0.2, −0.1·2) with coef 0.1;
    ∂L/∂H_it = −coef/(n_i·B)."""
    h = torch.tensor([[1.0, 3.0, 99.0], [2.0, 0.0, 0.0], [5.0, 5.0, 5.0]], dtype=D, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    out = entropy_bonus(h, mask, coef=0.1)
    torch.testing.assert_close(out.per_example, torch.tensor([-0.2, -0.2, 0.0], dtype=D))
    (g,) = torch.autograd.grad(out.loss, h)
    expected = torch.tensor([[-0.05, -0.05, 0], [-0.1, 0, 0], [0, 0, 0]], dtype=D) / 3
    torch.testing.assert_close(g, expected)
    with pytest.raises(ValueError, match="coef=-0.1"):
        entropy_bonus(h, mask, coef=-0.1)


# ------------------------------------------------------------------------------------------------------------
# combine


def _terms():
    g = torch.Generator().manual_seed(6)
    lw, ll, rw, rl = (torch.randn(3, generator=g, dtype=D) - 20 for _ in range(4))
    lp, mask = _tokens(seed=7)
    return dpo(lw, ll, rw, rl, beta=0.1), nll(lp, mask)


def test_combine_total_metrics_and_forms():
    d, n = _terms()
    out = combine({"dpo": (1.0, d), "sft": (0.5, n)})
    torch.testing.assert_close(out.loss, d.loss + 0.5 * n.loss)
    torch.testing.assert_close(out.per_example, d.per_example + 0.5 * n.per_example)
    assert out.metrics["loss/dpo"].item() == d.loss.float().item()
    assert out.metrics["loss/sft"].item() == n.loss.float().item()  # unweighted term value
    torch.testing.assert_close(out.metrics["loss/total"], out.loss.float())
    assert {f"dpo/{k}" for k in d.metrics} | {f"sft/{k}" for k in n.metrics} < set(out.metrics)
    assert torch.equal(out.metrics["dpo/rewards/margins"], d.metrics["rewards/margins"])
    seq = combine([("dpo", 1.0, d), ("sft", 0.5, n)])
    assert torch.equal(seq.loss, out.loss) and seq.metrics.keys() == out.metrics.keys()


def test_combine_weight_zero_keeps_metrics_and_gives_no_gradient():
    """A weight-0 term is logged but leaves the graph, even when its value is NaN."""
    x = torch.tensor([-3.0, -4.0], dtype=D, requires_grad=True)
    y = torch.tensor([-1.0, -2.0], dtype=D, requires_grad=True)
    bad = LossOutput(x.sum() * float("nan"), x * float("nan"), {})
    out = combine({"main": (1.0, nll(y)), "off": (0.0, xpo_bonus(x, alpha=1.0)), "nan": (0.0, bad)})
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_example).all()
    assert "off/xpo/ref_sample_logps" in out.metrics and "loss/off" in out.metrics
    gx, gy = torch.autograd.grad(out.loss, (x, y), allow_unused=True)
    assert gx is None and torch.equal(gy, torch.full_like(y, -0.5))


def test_combine_broadcasts_scalar_terms():
    d, _ = _terms()
    scalar = LossOutput(torch.tensor(2.0, dtype=D), torch.tensor([2.0], dtype=D), {})
    out = combine({"dpo": (1.0, d), "const": (0.25, scalar)})
    torch.testing.assert_close(out.per_example, d.per_example + 0.5)
    torch.testing.assert_close(out.loss, d.loss + 0.5)


def test_combine_errors():
    d, n = _terms()
    short = nll(torch.zeros(2, 3, dtype=D))
    with pytest.raises(ValueError, match="per_example shapes differ"):
        combine({"dpo": (1.0, d), "short": (1.0, short)})
    with pytest.raises(ValueError, match="unique"):
        combine([("a", 1.0, d), ("a", 1.0, n)])
    with pytest.raises(ValueError, match="LossOutput"):
        combine({"a": (1.0, d.loss)})
    with pytest.raises(ValueError, match="non-finite weight"):
        combine({"a": (float("inf"), d)})
    with pytest.raises(ValueError, match="'total'"):
        combine({"total": (1.0, d)})
    with pytest.raises(ValueError, match="at least one"):
        combine({})
