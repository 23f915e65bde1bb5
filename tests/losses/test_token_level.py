"""TDPO, SparsePO, activation masks, token-weighted NLL, reward-to-go, PRIOR and WPO weights."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmalign.losses.token_level import (
    activation_token_mask,
    prior_token_weights,
    reward_to_go,
    sparse_token_dpo,
    tdpo,
    token_weighted_nll,
    wpo_weights,
)

DT = torch.float64
LN2 = math.log(2.0)


def _rand(*shape, seed=0, scale=1.0, positive=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=DT) * scale
    return (t.abs() if positive else t).requires_grad_(True)


def _pair_inputs(seed=0, b=3, t_w=5, t_l=4):
    """Per-token log-ratios and KLs for chosen (length t_w) and rejected (t_l), right padding with NaN."""
    lr_w, lr_l = _rand(b, t_w, seed=seed), _rand(b, t_l, seed=seed + 1)
    kl_w, kl_l = _rand(b, t_w, seed=seed + 2, positive=True), _rand(b, t_l, seed=seed + 3, positive=True)
    m_w = torch.arange(t_w)[None] < torch.tensor([[t_w], [2], [3]])[:b]
    m_l = torch.arange(t_l)[None] < torch.tensor([[t_l], [t_l], [1]])[:b]
    return lr_w, lr_l, kl_w, kl_l, m_w, m_l


def _poison(t, mask):
    """Write NaN into masked positions (a leaf copy), to prove padding never leaks."""
    return torch.where(mask, t.detach(), torch.tensor(float("nan"), dtype=t.dtype)).requires_grad_(True)


# ---------------------------------------------------------------- TDPO


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_reduces_to_dpo_and_ln2(variant):
    """KL = 0 and masks all 1: both variants are −log σ(β·(Σ r_w − Σ r_l)) (sigmoid DPO); at policy == ref
    every term is 0 and the loss is ln 2."""
    lr_w, lr_l = _rand(3, 4, seed=1), _rand(3, 4, seed=2)
    z = torch.zeros(3, 4, dtype=DT)
    ones = torch.ones(3, 4, dtype=torch.bool)
    out = tdpo(lr_w, lr_l, z, z, chosen_mask=ones, rejected_mask=ones, beta=0.2, variant=variant)
    dpo = -F.logsigmoid(0.2 * (lr_w.sum(1) - lr_l.sum(1)))
    assert torch.allclose(out.per_example, dpo, atol=1e-12)
    init = tdpo(z, z, z, z, chosen_mask=ones, rejected_mask=ones, variant=variant)
    assert init.loss.item() == pytest.approx(LN2, abs=1e-12)


def test_tdpo_closed_form_with_masks_and_kl():
    """Literal, β = 0.5, α = 0.5. Chosen log-ratios [1, 2, pad], KL [0.1, 0.2, pad]: r_w = 3, D_w = 0.3.
    Rejected [0.5, pad], KL [0.4, pad]: r_l = 0.5, D_l = 0.4. u = 2.5.
    TDPO1 logit = 2.5 − (0.4 − 0.3) = 2.4; TDPO2 logit = 2.5 − 0.5·(0.4 − 0.3) = 2.45.
    rewards: chosen β(r_w + D_w) = 1.65, rejected β(r_l + D_l) = 0.45."""
    nan = float("nan")
    lr_w = torch.tensor([[1.0, 2.0, nan]], dtype=DT)
    kl_w = torch.tensor([[0.1, 0.2, nan]], dtype=DT)
    lr_l = torch.tensor([[0.5, nan]], dtype=DT)
    kl_l = torch.tensor([[0.4, nan]], dtype=DT)
    m_w, m_l = torch.tensor([[1, 1, 0]]).bool(), torch.tensor([[1, 0]]).bool()
    kw = dict(chosen_mask=m_w, rejected_mask=m_l, beta=0.5, alpha=0.5)
    t1 = tdpo(lr_w, lr_l, kl_w, kl_l, variant="tdpo1", **kw)
    t2 = tdpo(lr_w, lr_l, kl_w, kl_l, **kw)
    assert t1.loss.item() == pytest.approx(F.softplus(torch.tensor(-0.5 * 2.4, dtype=DT)).item(), abs=1e-12)
    assert t2.loss.item() == pytest.approx(F.softplus(torch.tensor(-0.5 * 2.45, dtype=DT)).item(), abs=1e-12)
    assert t2.metrics["rewards/chosen"].item() == pytest.approx(1.65)
    assert t2.metrics["rewards/rejected"].item() == pytest.approx(0.45)
    assert t2.metrics["rewards/accuracies"].item() == 1.0
    assert t2.metrics["kl/chosen"].item() == pytest.approx(0.3)
    assert t2.metrics["kl/margin"].item() == pytest.approx(-0.1)


def test_tdpo_gradients():
    """z1 = u − D_l + D_w. ∂L/∂r_w < 0, ∂L/∂r_l > 0. TDPO1: ∂L/∂D_w = −β·σ(−βz) < 0. TDPO2 stops the
    gradient of D_w (exactly 0) and ∂L/∂D_l = α·β·σ(−β·z2). Padding holding NaN gets exactly 0 grad."""
    lr_w, lr_l, kl_w, kl_l, m_w, m_l = _pair_inputs()
    lr_w, lr_l, kl_w, kl_l = (_poison(t, m) for t, m in ((lr_w, m_w), (lr_l, m_l), (kl_w, m_w), (kl_l, m_l)))
    beta, alpha = 0.3, 0.7
    out = tdpo(lr_w, lr_l, kl_w, kl_l, chosen_mask=m_w, rejected_mask=m_l, beta=beta, alpha=alpha)
    out.per_example.sum().backward()
    assert torch.isfinite(out.per_example).all()
    assert (lr_w.grad[m_w] < 0).all() and (lr_l.grad[m_l] > 0).all()
    assert kl_w.grad is None  # no gradient path at all through sg(D_w)
    r_w, r_l = lr_w.detach().nan_to_num().sum(1), lr_l.detach().nan_to_num().sum(1)
    d_w, d_l = kl_w.detach().nan_to_num().sum(1), kl_l.detach().nan_to_num().sum(1)
    z2 = (r_w - r_l) - alpha * (d_l - d_w)
    expected = alpha * beta * torch.sigmoid(-beta * z2)
    assert torch.allclose(kl_l.grad, torch.where(m_l, expected[:, None], 0.0), atol=1e-12)
    assert (lr_w.grad[~m_w] == 0).all() and (kl_l.grad[~m_l] == 0).all()

    kl_w1 = kl_w.detach().clone().requires_grad_(True)
    t1 = tdpo(
        lr_w.detach(),
        lr_l.detach(),
        kl_w1,
        kl_l.detach(),
        chosen_mask=m_w,
        rejected_mask=m_l,
        beta=beta,
        variant="tdpo1",
    )
    t1.per_example.sum().backward()
    z1 = (r_w - r_l) - (d_l - d_w)
    assert torch.allclose(kl_w1.grad, torch.where(m_w, (-beta * torch.sigmoid(-beta * z1))[:, None], 0.0))


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_swap_symmetry(variant):
    """Swapping chosen and rejected maps z → −z (α·(D_l − D_w) flips sign too), so for the logistic link
    L(swapped) = L + β·z, i.e. softplus(βz) = softplus(−βz) + βz."""
    lr_w, lr_l, kl_w, kl_l, _, _ = _pair_inputs(seed=3, t_w=4, t_l=4)
    m = torch.ones(3, 4, dtype=torch.bool)
    kw = dict(chosen_mask=m, rejected_mask=m, beta=0.4, alpha=0.6, variant=variant)
    a = tdpo(lr_w, lr_l, kl_w, kl_l, **kw)
    b = tdpo(lr_l, lr_w, kl_l, kl_w, **kw)
    alpha = 0.6 if variant == "tdpo2" else 1.0
    zz = (lr_w.sum(1) - lr_l.sum(1)) - alpha * (kl_l.sum(1) - kl_w.sum(1))
    assert torch.allclose(b.per_example, a.per_example + 0.4 * zz, atol=1e-12)


def test_tdpo_extremes_bf16_and_errors():
    big = torch.full((2, 3), 1e4, requires_grad=True)
    z = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    for sign in (1.0, -1.0):
        x = (sign * big).detach().requires_grad_(True)
        out = tdpo(x, z, z, z, chosen_mask=m, rejected_mask=m, beta=1.0)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
    bf = tdpo(*(torch.zeros(2, 3, dtype=torch.bfloat16),) * 4, chosen_mask=m, rejected_mask=m)
    assert bf.loss.dtype == torch.float32 and bf.loss.item() == pytest.approx(LN2, abs=1e-6)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert tdpo(z, z, z, z, chosen_mask=empty, rejected_mask=empty).loss.item() == pytest.approx(LN2)
    with pytest.raises(ValueError, match="variant"):
        tdpo(z, z, z, z, chosen_mask=m, rejected_mask=m, variant="tdpo3")
    with pytest.raises(ValueError, match="beta"):
        tdpo(z, z, z, z, chosen_mask=m, rejected_mask=m, beta=0)
    with pytest.raises(ValueError, match="chosen_token_kl"):
        tdpo(z, z, z[:, :2], z, chosen_mask=m, rejected_mask=m)


def test_tdpo_from_logits_matches_sequence_level_definition():
    """Adapter contract on tiny logits (V = 5): KL_t = Σ_v p_ref·(log p_ref − log p_θ) ≥ 0; the summed
    inputs give TDPO1's logit u − (D_l − D_w) computed directly from the distributions."""
    g = torch.Generator().manual_seed(7)
    pol, ref = torch.randn(2, 2, 3, 5, generator=g, dtype=DT), torch.randn(2, 2, 3, 5, generator=g, dtype=DT)
    tokens = torch.randint(0, 5, (2, 2, 3), generator=g)
    lp, lr = pol.log_softmax(-1), ref.log_softmax(-1)
    logratio = (lp - lr).gather(-1, tokens[..., None]).squeeze(-1)  # [side, B, T]
    kl = (lr.exp() * (lr - lp)).sum(-1)
    assert (kl >= 0).all()
    m = torch.ones(2, 3, dtype=torch.bool)
    out = tdpo(
        logratio[0], logratio[1], kl[0], kl[1], chosen_mask=m, rejected_mask=m, beta=1.0, variant="tdpo1"
    )
    u = logratio[0].sum(-1) - logratio[1].sum(-1)
    logits = u - (kl[1].sum(-1) - kl[0].sum(-1))
    assert torch.allclose(out.per_example, -F.logsigmoid(logits))


# ---------------------------------------------------------------- SparsePO


def test_sparse_unit_masks_equal_tdpo1_and_repo_sign_convention():
    """Unit masks: SparsePO = TDPO1. The repo writes KL⁻ = −KL and d = Σ KL⁻_w − Σ KL⁻_l, loss
    −log σ(β(u − d)); d = D_l − D_w, so both conventions agree."""
    lr_w, lr_l, kl_w, kl_l, m_w, m_l = _pair_inputs(seed=4)
    ones_w, ones_l = torch.ones_like(lr_w), torch.ones_like(lr_l)
    kw = dict(chosen_mask=m_w, rejected_mask=m_l, beta=0.8)
    sp = sparse_token_dpo(lr_w, lr_l, kl_w, kl_l, ones_w, ones_l, **kw)
    t1 = tdpo(lr_w, lr_l, kl_w, kl_l, variant="tdpo1", **kw)
    assert torch.allclose(sp.per_example, t1.per_example, atol=1e-12)
    u = (lr_w * m_w).sum(1) - (lr_l * m_l).sum(1)
    d_repo = (-kl_w * m_w).sum(1) - (-kl_l * m_l).sum(1)
    assert torch.allclose(sp.per_example, -F.logsigmoid(0.8 * (u - d_repo)), atol=1e-12)


def test_sparse_mask_scaling_scales_logit():
    """u_m and d_m are linear in the masks, so masks × c multiply the logit by c:
    L(c·m) = softplus(−β·c·z_m), and rewards/margins = β·c·z_m."""
    lr_w, lr_l, kl_w, kl_l, m_w, m_l = _pair_inputs(seed=5)
    mu_w, mu_l = _rand(3, 5, seed=9, positive=True), _rand(3, 4, seed=10, positive=True)
    md_w, md_l = _rand(3, 5, seed=11, positive=True), _rand(3, 4, seed=12, positive=True)
    z_m = ((mu_w * lr_w * m_w).sum(1) - (mu_l * lr_l * m_l).sum(1)) - (
        (md_l * kl_l * m_l).sum(1) - (md_w * kl_w * m_w).sum(1)
    )
    beta = 0.5
    for c in (1.0, 3.0):
        out = sparse_token_dpo(
            lr_w,
            lr_l,
            kl_w,
            kl_l,
            c * mu_w,
            c * mu_l,
            c * md_w,
            c * md_l,
            chosen_mask=m_w,
            rejected_mask=m_l,
            beta=beta,
        )
        assert torch.allclose(out.per_example, F.softplus(-beta * c * z_m), atol=1e-12)
        assert out.metrics["rewards/margins"].item() == pytest.approx(
            (beta * c * z_m).mean().item(), rel=1e-6
        )


def test_sparse_ln2_plus_l1_and_gradients_to_masks():
    """At policy == ref the preference term is ln 2; the L1 term adds λ_u·Σm^u + λ_d·Σm^d (independent
    masks) or (λ_u + λ_d)/2·Σm (common mask, the repo halves both). Learned masks get gradient."""
    z_w, z_l = torch.zeros(2, 3, dtype=DT), torch.zeros(2, 4, dtype=DT)
    m_w = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    m_l = torch.ones(2, 4, dtype=torch.bool)
    mu_w, mu_l = _rand(2, 3, seed=1, positive=True), _rand(2, 4, seed=2, positive=True)
    md_w, md_l = _rand(2, 3, seed=3, positive=True), _rand(2, 4, seed=4, positive=True)
    s_u = (mu_w * m_w).sum(1) + mu_l.sum(1)
    s_d = (md_w * m_w).sum(1) + md_l.sum(1)
    indp = sparse_token_dpo(
        z_w,
        z_l,
        z_w,
        z_l,
        mu_w,
        mu_l,
        md_w,
        md_l,
        chosen_mask=m_w,
        rejected_mask=m_l,
        l1_reward=0.01,
        l1_kl=0.02,
    )
    assert torch.allclose(indp.per_example, LN2 + 0.01 * s_u + 0.02 * s_d, atol=1e-12)
    common = sparse_token_dpo(
        z_w, z_l, z_w, z_l, mu_w, mu_l, chosen_mask=m_w, rejected_mask=m_l, l1_reward=0.01, l1_kl=0.02
    )
    assert torch.allclose(common.per_example, LN2 + 0.015 * s_u, atol=1e-12)
    lr_w, lr_l = _poison(_rand(2, 3, seed=5), m_w), _rand(2, 4, seed=6)  # NaN in chosen padding
    out = sparse_token_dpo(lr_w, lr_l, z_w, z_l, mu_w, mu_l, chosen_mask=m_w, rejected_mask=m_l)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(mu_w.grad).all() and torch.isfinite(lr_w.grad).all()
    assert mu_w.grad[m_w].abs().sum() > 0 and (mu_w.grad[~m_w] == 0).all() and (lr_w.grad[~m_w] == 0).all()


def test_sparse_sparsity_metric_and_errors():
    """Chosen reward mask [1, 0, 0.5, 0] on 4 valid tokens: 50 % zeros; rejected [0, 2, pad]: 1 of 2 → 50 %;
    second row chosen all zero → 100 %, rejected fully masked → left out. Metric in [0, 100]."""
    z_w, z_l = torch.zeros(2, 4), torch.zeros(2, 3)
    mu_w = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mu_l = torch.tensor([[0.0, 2.0, 9.0], [1.0, 1.0, 1.0]])
    m_w = torch.ones(2, 4, dtype=torch.bool)
    m_l = torch.tensor([[1, 1, 0], [0, 0, 0]]).bool()
    out = sparse_token_dpo(z_w, z_l, z_w, z_l, mu_w, mu_l, chosen_mask=m_w, rejected_mask=m_l)
    assert out.metrics["mask/reward_chosen_sparsity"].item() == pytest.approx(75.0)
    assert out.metrics["mask/reward_rejected_sparsity"].item() == pytest.approx(50.0)
    assert out.metrics["mask/sparsity"].item() == pytest.approx((50 + 100 + 50) / 3)
    assert 0 <= out.metrics["mask/sparsity"].item() <= 100
    with pytest.raises(ValueError, match="reward_mask_chosen"):
        sparse_token_dpo(z_w, z_l, z_w, z_l, -mu_w - 1, mu_l, chosen_mask=m_w, rejected_mask=m_l)
    with pytest.raises(ValueError, match="both"):
        sparse_token_dpo(z_w, z_l, z_w, z_l, mu_w, mu_l, mu_w, chosen_mask=m_w, rejected_mask=m_l)
    with pytest.raises(ValueError, match="l1_reward"):
        sparse_token_dpo(z_w, z_l, z_w, z_l, mu_w, mu_l, chosen_mask=m_w, rejected_mask=m_l, l1_reward=-1.0)


# ---------------------------------------------------------------- activation mask


def test_activation_mask_matches_zn_rescale_and_ranges():
    """The repo's recipe (mean over hidden, z-normalise over valid tokens with the unbiased std, min-max
    to [0, 1], masked positions 0) recomputed per row in float64; each row with ≥ 2 distinct values
    reaches exactly 0 and 1."""
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(3, 6, 4, generator=g, dtype=DT)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]]).bool()
    acts = torch.where(mask[..., None], acts, torch.tensor(float("inf"), dtype=DT))
    out = activation_token_mask(acts, mask)
    for i in range(3):
        a = acts[i].mean(-1)[mask[i]]
        zn = (a - a.mean()) / a.std()
        expected = (zn - zn.min()) / (zn.max() - zn.min())
        assert torch.allclose(out[i][mask[i]], expected, atol=1e-12)
        assert out[i][mask[i]].min() == 0 and out[i][mask[i]].max() == 1
    assert (out[~mask] == 0).all()


def test_activation_mask_hook_types_layers_and_edge_rows():
    """A list of hook types is the mean of each type's mask; a nested list averages layers first.
    Constant or single-token rows get 1 on valid tokens; fully masked rows give 0; output is detached."""
    g = torch.Generator().manual_seed(1)
    a1 = torch.randn(4, 5, 3, generator=g, requires_grad=True)
    a2 = torch.randn(4, 5, generator=g)
    a3 = torch.randn(4, 5, 2, 2, generator=g)
    mask = torch.tensor([[1] * 5, [1, 0, 0, 0, 0], [0] * 5, [1] * 5]).bool()
    a2[3] = 0.5  # constant row for hook type 2
    single = [activation_token_mask(x, mask) for x in (a1, a2, a3)]
    both = activation_token_mask([a1, [a2, a3]], mask)
    assert torch.allclose(both, (single[0] + (single[1] + single[2]) / 2) / 2, atol=1e-6)
    assert not both.requires_grad
    assert torch.isfinite(both).all() and (both >= 0).all() and (both <= 1).all()
    assert (single[1][3] == 1).all() and single[0][1, 0] == 1 and (both[2] == 0).all()
    bf = activation_token_mask(a2.to(torch.bfloat16), mask)
    assert bf.dtype == torch.float32
    with pytest.raises(ValueError, match="empty"):
        activation_token_mask([], mask)


# ---------------------------------------------------------------- token-weighted NLL and reward-to-go


def test_token_weighted_nll_normalisations():
    """logp rows with lengths 3 and 1 (padding NaN). Uniform weights: per_sequence = length-normalised NLL
    per row; per_token = the token mean over all 4 valid tokens (HF/TRL ``sft``); none = sum per row.
    Weights [1, 3, 0] normalise to [0.25, 0.75, 0]."""
    nan = float("nan")
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, nan, nan]], dtype=DT, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    seq = token_weighted_nll(logp, mask)
    assert torch.allclose(seq.per_example, torch.tensor([2.0, 4.0], dtype=DT))
    tok = token_weighted_nll(logp, mask, normalize="per_token")
    assert tok.loss.item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert tok.metrics["nll/token_mean"].item() == pytest.approx(2.5)
    assert torch.allclose(
        token_weighted_nll(logp, mask, normalize="none").per_example, torch.tensor([6.0, 4.0], dtype=DT)
    )
    w = torch.tensor([[1.0, 3.0, 0.0], [5.0, nan, nan]], dtype=DT)
    out = token_weighted_nll(logp, mask, weights=w)
    assert out.per_example[0].item() == pytest.approx(0.25 * 1 + 0.75 * 2)
    assert torch.allclose(out.per_example, token_weighted_nll(logp, mask, weights=7 * w).per_example)
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.125, -0.375, 0.0], [-0.5, 0.0, 0.0]], dtype=DT))


def test_token_weighted_nll_edge_cases():
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    mask = torch.tensor([[0, 0], [1, 1]]).bool()
    out = token_weighted_nll(logp, mask, weights=torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert (out.per_example == 0).all()
    with pytest.raises(ValueError, match=">= 0"):
        token_weighted_nll(logp, mask, weights=-torch.ones(2, 2))
    with pytest.raises(ValueError, match="normalize"):
        token_weighted_nll(logp, mask, normalize="per_batch")
    assert token_weighted_nll(logp.bfloat16(), mask).loss.dtype == torch.float32


def test_reward_to_go():
    """q_t = Σ_{t' ≥ t} r_t' (t included). Constant c on n valid tokens: q_t = c·(n − t), 0-indexed; [1, 2, 3]
    gives [6, 5, 3]; masked positions (left padding here) give 0 and are not summed."""
    c = 0.5
    r = torch.full((1, 4), c)
    mask = torch.tensor([[1, 1, 1, 0]]).bool()
    assert torch.allclose(reward_to_go(r, mask), torch.tensor([[c * 3, c * 2, c * 1, 0.0]]))
    assert torch.allclose(
        reward_to_go(torch.tensor([[1.0, 2.0, 3.0]]), None), torch.tensor([[6.0, 5.0, 3.0]])
    )
    left = torch.tensor([[float("nan"), 1.0, 2.0]])
    assert torch.allclose(
        reward_to_go(left, torch.tensor([[0, 1, 1]]).bool()), torch.tensor([[0.0, 3.0, 2.0]])
    )


# ---------------------------------------------------------------- PRIOR weights


@pytest.mark.parametrize("form", ["one_minus_p", "inverse_p", "surprisal"])
def test_prior_alpha_zero_is_plain_ntp(form):
    """α = 0: every weight is 1 (after normalisation), so the weighted per-token NLL equals plain NTP, the
    mean NLL over all valid tokens."""
    g = torch.Generator().manual_seed(2)
    ref = torch.rand(2, 5, generator=g, dtype=DT).log()
    logp = torch.rand(2, 5, generator=g, dtype=DT).log()
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]).bool()
    w = prior_token_weights(ref, mask, alpha=0.0, form=form)
    assert torch.equal(w, mask.to(DT))
    weighted = token_weighted_nll(logp, mask, weights=w, normalize="per_token").loss
    assert weighted.item() == pytest.approx((-logp[mask]).mean().item(), abs=1e-12)


@pytest.mark.parametrize("form", ["one_minus_p", "inverse_p", "surprisal"])
def test_prior_monotone_and_normalised(form):
    """Weights are non-increasing in p̂ (hard-without-image tokens weigh more) and average 1 over the
    valid tokens of the batch (or of each sequence); no gradient flows to the reference."""
    p = torch.tensor([[0.05, 0.2, 0.5, 0.9, 0.99], [0.3, 0.6, 0.01, 0.5, 0.5]], dtype=DT)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    ref = p.log().requires_grad_(True)
    w = prior_token_weights(ref, mask, alpha=1.5, form=form)
    assert not w.requires_grad
    assert (w[0, :-1] >= w[0, 1:]).all()
    assert w[mask].mean().item() == pytest.approx(1.0, abs=1e-12) and (w[~mask] == 0).all()
    ws = prior_token_weights(ref, mask, alpha=1.5, form=form, normalize="sequence")
    assert torch.allclose(ws.sum(1) / mask.sum(1), torch.ones(2, dtype=DT))


def test_prior_closed_forms_clip_floor_and_extremes():
    """Raw forms: (1 − p)^α, p^(−α), (−log p)^α; clip caps and floor lifts the raw weight. p̂ = e^{−1e4}
    with inverse_p would be e^{1e4}: the log-space normalisation keeps it finite. p̂ = 1 everywhere gives
    all-zero (1 − p)^α, returned as zeros rather than NaN."""
    p = torch.tensor([[0.5, 0.25, 0.9]], dtype=DT)
    m = torch.ones(1, 3, dtype=torch.bool)
    assert torch.allclose(prior_token_weights(p.log(), m, alpha=2.0, normalize="none"), (1 - p) ** 2)
    assert torch.allclose(
        prior_token_weights(p.log(), m, alpha=1.0, form="inverse_p", normalize="none"), 1 / p
    )
    assert torch.allclose(
        prior_token_weights(p.log(), m, alpha=0.5, form="surprisal", normalize="none"), (-p.log()).sqrt()
    )
    clipped = prior_token_weights(p.log(), m, alpha=1.0, form="inverse_p", normalize="none", clip=3.0)
    assert torch.allclose(clipped, torch.tensor([[2.0, 3.0, 1 / 0.9]], dtype=DT))
    floored = prior_token_weights(p.log(), m, alpha=1.0, normalize="none", floor=0.2)
    assert torch.allclose(floored, torch.tensor([[0.5, 0.75, 0.2]], dtype=DT))
    extreme = prior_token_weights(torch.tensor([[-1e4, -1.0, -0.1]]), m, form="inverse_p")
    assert torch.isfinite(extreme).all() and extreme.mean().item() == pytest.approx(1.0, abs=1e-4)
    ones = prior_token_weights(torch.zeros(1, 3), m)
    assert (ones == 0).all()
    with pytest.raises(ValueError, match="form"):
        prior_token_weights(p.log(), m, form="entropy")
    with pytest.raises(ValueError, match="alpha"):
        prior_token_weights(p.log(), m, alpha=-1.0)
    with pytest.raises(ValueError, match="clip"):
        prior_token_weights(p.log(), m, clip=0.1, floor=0.5)


# ---------------------------------------------------------------- WPO


def test_wpo_weights_closed_form():
    """w = exp(mean_t[log p_t − log Σ p²]). Tokens: p = 0.5 with Σp² = 0.5 (two-way split) → ratio 1; p = 0.25
    with Σp² = 0.25 (uniform over 4) → 1; p = 0.1 with Σp² = 0.5 → 0.2. Mean of logs over 3 tokens:
    log(0.2)/3, so w = 0.2^(1/3). Empty row → 1 (TRL's clamp of the length to ≥ 1)."""
    nan = float("nan")
    logp = torch.tensor([[0.5, 0.25, 0.1, nan], [nan] * 4], dtype=DT).log().requires_grad_(True)
    lsp2 = torch.tensor([[0.5, 0.25, 0.5, nan], [nan] * 4], dtype=DT).log()
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]]).bool()
    w = wpo_weights(logp, lsp2, mask)
    assert not w.requires_grad
    assert torch.allclose(w, torch.tensor([0.2 ** (1 / 3), 1.0], dtype=DT))


def test_wpo_parity_with_trl_dpo_trainer():
    """TRL 1.16 ``DPOTrainer._compute_loss`` (its own code, driven by a stub model that returns per-token
    log-probs and log Σ p²) with ``use_weighting=True``: loss = mean_b(−log σ(β·Δ_b)·w_chosen·w_rejected).
    Ours: tdpo(variant='tdpo1') with KL = 0 is sigmoid DPO; multiply by our weights; compare to 1e-6."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    g = torch.Generator().manual_seed(0)
    b, t = 3, 6
    logp = -torch.rand(2 * b, t, generator=g, dtype=DT) * 3
    lsp2 = -torch.rand(2 * b, t, generator=g, dtype=DT) * 2
    completion_mask = torch.ones(2 * b, t + 1, dtype=torch.long)
    completion_mask[:, 0] = 0  # prompt token
    completion_mask[1, -2:] = 0
    completion_mask[4, -3:] = 0
    ref_w, ref_l = torch.randn(b, generator=g, dtype=DT), torch.randn(b, generator=g, dtype=DT)
    zeros = torch.zeros(2 * b, t, dtype=DT)

    def model(**_):
        # TRL's fused LM head zeroes every per-token field where the label is -100 (outside the completion)
        keep = completion_mask[:, 1:].bool()
        return SimpleNamespace(
            log_probs=torch.where(keep, logp, 0.0),
            log_sum_sq_probs=torch.where(keep, lsp2, 0.0),
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
        )

    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=acc,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=0.1,
        use_weighting=True,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = dict(
        input_ids=torch.zeros(2 * b, t + 1, dtype=torch.long),
        completion_mask=completion_mask,
        attention_mask=torch.ones(2 * b, t + 1, dtype=torch.long),
        ref_chosen_logps=ref_w,
        ref_rejected_logps=ref_l,
    )
    trl_loss = trl_dpo.DPOTrainer._compute_loss(stub, model, inputs, False)

    mask = completion_mask[:, 1:].bool()
    w = wpo_weights(logp, lsp2, mask)
    # sequence log-ratio spread on the first token so tdpo's masked sums reproduce Σ logp − ref
    ref = torch.cat([ref_w, ref_l])
    token_lr = torch.where(mask, logp, 0.0)
    token_lr[:, 0] -= ref
    kl = torch.zeros_like(logp)
    out = tdpo(
        token_lr[:b],
        token_lr[b:],
        kl[:b],
        kl[b:],
        chosen_mask=mask[:b],
        rejected_mask=mask[b:],
        beta=0.1,
        variant="tdpo1",
    )
    ours = (out.per_example * w[:b] * w[b:]).mean()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6)
