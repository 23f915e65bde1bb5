"""Plackett–Luce, pairwise expansion, token aggregation and ListMLE: arithmetic and invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.losses.listwise import (
    aggregate_token_values,
    listmle,
    pairwise_expand,
    pairwise_from_ranking,
    plackett_luce,
)

DT = torch.float64


def _rand(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=DT) * scale).requires_grad_(True)


# ---------------------------------------------------------------- plackett_luce: values at equal scores


@pytest.mark.parametrize("k", [2, 3, 5])
def test_equal_scores_give_log_k_factorial_and_log_k(k):
    """All s equal: stage j has (K − j) equally likely candidates, so L = Σ_j log(K − j) = log K!;
    top-1 keeps only the first stage: log K. K = 2 gives ln 2 (DPO at policy == reference)."""
    s = torch.zeros(3, k, dtype=DT)
    assert torch.allclose(
        plackett_luce(s).per_example, torch.full((3,), math.log(math.factorial(k)), dtype=DT)
    )
    assert torch.allclose(plackett_luce(s, top_k=1).per_example, torch.full((3,), math.log(k), dtype=DT))
    if k == 2:
        assert plackett_luce(s).loss.item() == pytest.approx(math.log(2), abs=1e-12)


def test_k2_equals_sigmoid_dpo():
    """K = 2: L = log(e^{s0} + e^{s1}) − s0 = −log σ(s0 − s1); with beta the logit is β·(s0 − s1)."""
    s = _rand(4, 2)
    beta = 0.3
    out = plackett_luce(s, beta=beta)
    expected = -F.logsigmoid(beta * (s[:, 0] - s[:, 1]))
    assert torch.allclose(out.per_example, expected, atol=1e-12)
    pw = pairwise_from_ranking(s, beta=beta)
    assert torch.allclose(pw.per_example, expected, atol=1e-12)


def test_k2_matches_peer_dpo_sigmoid():
    """K = 2 PL on s = β·(policy − ref) log-ratios equals mmalign's own sigmoid DPO kernel (research note
    §1.4 invariant 5), per example, with its reward metrics."""
    from mmalign.losses.pairwise import dpo

    pol, ref = _rand(5, 2, seed=8), _rand(5, 2, seed=9)
    out = plackett_luce(pol - ref, beta=0.1)
    peer = dpo(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=0.1)
    assert torch.allclose(out.per_example, peer.per_example, atol=1e-12)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies"):
        assert out.metrics[key].item() == pytest.approx(peer.metrics[key].item(), abs=1e-6)


def test_closed_form_three_candidates_with_order():
    """Stored scores [0, 2, 1], order = [1, 2, 0] (best-first): ranked scores 2, 1, 0, so
    L = [log(e² + e¹ + e⁰) − 2] + [log(e¹ + e⁰) − 1]; top_k=2 is the same (the third stage is 0)."""
    s = torch.tensor([[0.0, 2.0, 1.0]], dtype=DT)
    order = torch.tensor([[1, 2, 0]])
    expected = (math.log(math.e**2 + math.e + 1) - 2) + (math.log(math.e + 1) - 1)
    assert plackett_luce(s, order).loss.item() == pytest.approx(expected, abs=1e-12)
    assert plackett_luce(s, order, top_k=2).loss.item() == pytest.approx(expected, abs=1e-12)
    assert plackett_luce(s, order, top_k=1).loss.item() == pytest.approx(
        math.log(math.e**2 + math.e + 1) - 2, abs=1e-12
    )


def test_top1_is_infonce_and_partial_order_is_best_vs_rest():
    """top_k=1 = cross-entropy of the best candidate over the list; an order that ranks only the best
    ([best, -1, ...]) gives the same loss (the others are the unranked "rest")."""
    s = _rand(3, 4, seed=1)
    order = torch.tensor([[2, 0, 1, 3], [0, 1, 2, 3], [3, 2, 1, 0]])
    ce = F.cross_entropy(s, order[:, 0], reduction="none")
    assert torch.allclose(plackett_luce(s, order, top_k=1).per_example, ce, atol=1e-12)
    partial = torch.full_like(order, -1)
    partial[:, 0] = order[:, 0]
    assert torch.allclose(plackett_luce(s, partial).per_example, ce, atol=1e-12)


# ---------------------------------------------------------------- invariances


def test_shift_invariance_and_gradients_sum_to_zero():
    """Adding c to every score leaves each stage s_τ(k) − logsumexp(...) unchanged; hence Σ_c ∂L/∂s_c = 0.
    The best-ranked candidate is pushed up (∂L/∂s < 0), the last-ranked one down (∂L/∂s > 0)."""
    s = _rand(3, 5, seed=2)
    order = torch.tensor([[4, 3, 2, 1, 0], [0, 1, 2, 3, 4], [1, 0, 3, 2, 4]])
    base = plackett_luce(s, order)
    shifted = plackett_luce(s + 7.5, order)
    assert torch.allclose(base.per_example, shifted.per_example, atol=1e-10)
    base.loss.backward()
    assert torch.allclose(s.grad.sum(1), torch.zeros(3, dtype=DT), atol=1e-12)
    best = s.grad.gather(1, order[:, :1])
    worst = s.grad.gather(1, order[:, -1:])
    assert (best < 0).all() and (worst > 0).all()


def test_permutation_equivariance():
    """Permuting storage (scores, mask) and relabelling ``order`` consistently gives the same loss."""
    s = _rand(2, 5, seed=3)
    order = torch.tensor([[3, 1, 4, -1, -1], [0, 2, 1, 4, 3]])
    cmask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    perm = torch.tensor([4, 2, 0, 1, 3])  # new position i holds old candidate perm[i]
    inv = torch.argsort(perm)
    new_order = torch.where(order >= 0, inv[order.clamp_min(0)], order)
    a = plackett_luce(s, order, candidate_mask=cmask)
    b = plackett_luce(s[:, perm], new_order, candidate_mask=cmask[:, perm])
    assert torch.allclose(a.per_example, b.per_example, atol=1e-12)


def test_masked_candidates_contribute_nothing():
    """A ragged row equals the same list without its padding; padding may hold NaN/inf and still gets
    exactly zero gradient."""
    s = torch.tensor([[1.0, float("nan"), -0.5, float("inf"), 2.0]], dtype=DT, requires_grad=True)
    cmask = torch.tensor([[1, 0, 1, 0, 1]], dtype=torch.bool)
    order = torch.tensor([[4, 0, 2, -1, -1]])
    out = plackett_luce(s, order, candidate_mask=cmask)
    sub = plackett_luce(torch.tensor([[1.0, -0.5, 2.0]], dtype=DT), torch.tensor([[2, 0, 1]]))
    assert out.loss.item() == pytest.approx(sub.loss.item(), abs=1e-12)
    out.loss.backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad[0, 1] == 0 and s.grad[0, 3] == 0
    # order=None with a mask: valid candidates in storage order are the ranking
    none_order = plackett_luce(s.detach(), candidate_mask=cmask)
    expected = plackett_luce(torch.tensor([[1.0, -0.5, 2.0]], dtype=DT))
    assert none_order.loss.item() == pytest.approx(expected.loss.item(), abs=1e-12)


def test_fully_masked_row_and_single_candidate_give_zero():
    s = torch.randn(3, 4, dtype=DT, requires_grad=True)
    cmask = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = plackett_luce(s, candidate_mask=cmask)
    assert out.per_example[0] == 0 and out.per_example[1] == 0 and out.per_example[2] > 0
    out.loss.backward()
    assert torch.isfinite(s.grad).all() and (s.grad[:2] == 0).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())


def test_extremes_are_finite_and_bf16_accepted():
    """|s| = 1e4: the wrong order costs ≈ 2e4 per stage gap, the right one ≈ 0; values and grads finite."""
    s = torch.tensor([[1e4, 0.0, -1e4], [-1e4, 0.0, 1e4]], requires_grad=True)
    out = plackett_luce(s)
    out.loss.backward()
    assert torch.isfinite(out.per_example).all() and torch.isfinite(s.grad).all()
    assert out.per_example[0].item() == pytest.approx(0.0, abs=1e-3)
    assert out.per_example[1].item() == pytest.approx(3e4, rel=1e-4)
    bf = plackett_luce(torch.zeros(2, 3, dtype=torch.bfloat16))
    assert bf.loss.dtype == torch.float32 and bf.loss.item() == pytest.approx(math.log(6), abs=1e-6)


def test_metrics_and_reductions():
    """Row 0: top (idx 0) has s = 3 > others {1, 2}: chosen 3, rejected 1.5, acc 1. Row 1: ranked top
    (idx 2) has s = 0 < max other 5: acc 0, chosen 0, rejected 3. Metrics average rows."""
    s = torch.tensor([[3.0, 1.0, 2.0], [1.0, 5.0, 0.0]], dtype=DT)
    order = torch.tensor([[0, 2, 1], [2, 0, 1]])
    out = plackett_luce(s, order)
    m = out.metrics
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert m["rewards/chosen"].item() == pytest.approx(1.5)
    assert m["rewards/rejected"].item() == pytest.approx(2.25)
    assert m["rewards/margins"].item() == pytest.approx(-0.75)
    assert not any(v.requires_grad for v in m.values())
    w = torch.tensor([1.0, 3.0], dtype=DT)
    weighted = plackett_luce(s, order, sample_weight=w)
    expected = (out.per_example * w).sum() / w.sum()
    assert weighted.loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert plackett_luce(s, order, reduction="sum").loss.item() == pytest.approx(out.per_example.sum().item())


@pytest.mark.parametrize(
    "order, msg",
    [
        ([[0, 0, 1]], "repeats"),
        ([[0, 3, 1]], r"\[-1, 2\]"),
        ([[0, -1, 1]], "after -1"),
        ([[-2, 0, 1]], r"\[-1, 2\]"),
    ],
)
def test_bad_order_raises(order, msg):
    with pytest.raises(ValueError, match=msg):
        plackett_luce(torch.zeros(1, 3), torch.tensor(order))


def test_bad_arguments_raise():
    s = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="padding"):
        plackett_luce(s, torch.tensor([[1, 0, -1]]), candidate_mask=torch.tensor([[1, 0, 1]]).bool())
    with pytest.raises(ValueError, match="top_k"):
        plackett_luce(s, top_k=0)
    with pytest.raises(ValueError, match="beta"):
        plackett_luce(s, beta=0.0)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        plackett_luce(torch.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        plackett_luce(s, reduction="max")
    with pytest.raises(ValueError, match="integer"):
        plackett_luce(s, torch.tensor([[0.0, 1.0, 2.0]]))


# ---------------------------------------------------------------- pairwise expansion


def test_pairwise_expand_counts_and_pairs():
    """Full ranking of K = 4: C(4,2) = 6 pairs for "all", K − 1 = 3 for "adjacent" and "best_vs_rest"."""
    w, lo, ex = pairwise_expand(num_candidates=4)
    assert list(zip(w.tolist(), lo.tolist(), strict=True)) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert (ex == 0).all()
    order = torch.tensor([[2, 0, 3, 1]])
    adj = pairwise_expand(order, mode="adjacent")
    assert sorted(zip(adj[0].tolist(), adj[1].tolist(), strict=True)) == [(0, 3), (2, 0), (3, 1)]
    bvr = pairwise_expand(order, mode="best_vs_rest")
    assert sorted(zip(bvr[0].tolist(), bvr[1].tolist(), strict=True)) == [(2, 0), (2, 1), (2, 3)]


def test_pairwise_expand_partial_ranking_and_mask():
    """order [1, -1, -1, -1] with candidate 2 masked: the best beats the two unranked valid candidates;
    unranked candidates are tied (no pair between 0 and 3); the masked one never appears."""
    order = torch.tensor([[1, -1, -1, -1], [0, 1, 2, 3]])
    cmask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    w, lo, ex = pairwise_expand(order, candidate_mask=cmask, mode="all")
    row0 = sorted((a, b) for a, b, e in zip(w.tolist(), lo.tolist(), ex.tolist(), strict=True) if e == 0)
    assert row0 == [(1, 0), (1, 3)]
    assert int((ex == 1).sum()) == 6
    with pytest.raises(ValueError, match="mode"):
        pairwise_expand(order, mode="random")


def test_pairwise_from_ranking_averages_pairs_per_example():
    """Scores [2, 1, 0] best-first: all-pairs loss = mean(softplus(−1), softplus(−2), softplus(−1));
    gradient signs: the best is pushed up, the worst down; masked NaN does not leak."""
    s = torch.tensor([[2.0, 1.0, 0.0, float("nan")]], dtype=DT, requires_grad=True)
    cmask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    out = pairwise_from_ranking(s, candidate_mask=cmask)
    sp = F.softplus(torch.tensor([-1.0, -2.0, -1.0], dtype=DT)).mean()
    assert out.loss.item() == pytest.approx(sp.item(), abs=1e-12)
    out.loss.backward()
    assert s.grad[0, 0] < 0 and s.grad[0, 2] > 0 and s.grad[0, 3] == 0
    assert out.metrics["rewards/accuracies"].item() == 1.0
    empty = pairwise_from_ranking(
        torch.zeros(2, 3), candidate_mask=torch.tensor([[1, 0, 0], [1, 1, 0]]).bool()
    )
    assert empty.per_example[0] == 0 and empty.per_example[1].item() == pytest.approx(math.log(2))


# ---------------------------------------------------------------- aggregation (Yang et al. 2023)


def test_aggregate_constant_reward():
    """Constant reward c on n_k valid tokens, list-average length n̄ = mean_k n_k:
    sum = c·n_k, mean = c, mean_list_len = c·n̄, softmax = (c + T·log n_k)·n̄, softmin = (c − T·log n_k)·n̄."""
    c, temp = 0.7, 2.0
    lengths = torch.tensor([[2, 3, 5]])
    mask = torch.arange(5)[None, None, :] < lengths[..., None]
    vals = torch.where(mask, torch.full((1, 3, 5), c, dtype=DT), torch.tensor(float("nan"), dtype=DT))
    n = lengths.to(DT)
    nbar = n.mean()
    agg = {
        m: aggregate_token_values(vals, mask, mode=m, temperature=temp)
        for m in ("sum", "mean", "mean_list_len", "softmax", "softmin")
    }
    assert torch.allclose(agg["sum"], c * n)
    assert torch.allclose(agg["mean"], torch.full_like(n, c))
    assert torch.allclose(agg["mean_list_len"], c * nbar.expand_as(n))
    assert torch.allclose(agg["softmax"], (c + temp * torch.log(n)) * nbar)
    assert torch.allclose(agg["softmin"], (c - temp * torch.log(n)) * nbar)


def test_aggregate_soft_max_min_bounds_and_empty_candidates():
    """Soft max ≥ max·n̄ and soft min ≤ min·n̄; a small temperature approaches the hard max. A candidate
    with no valid token gets 0 and is left out of the list-average length."""
    g = torch.Generator().manual_seed(4)
    vals = torch.rand(2, 3, 4, generator=g, dtype=DT)
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[1, 2] = False  # empty candidate
    mask[1, 0, 3] = False
    nbar = torch.tensor([4.0, 3.5], dtype=DT)[:, None]
    hard_max = torch.where(mask, vals, -torch.inf).amax(-1)
    hard_min = torch.where(mask, vals, torch.inf).amin(-1)
    smax = aggregate_token_values(vals, mask, mode="softmax")
    smin = aggregate_token_values(vals, mask, mode="softmin")
    ok = mask.any(-1)
    assert (smax[ok] >= (hard_max * nbar)[ok]).all() and (smin[ok] <= (hard_min * nbar)[ok]).all()
    assert smax[1, 2] == 0 and smin[1, 2] == 0
    sharp = aggregate_token_values(vals, mask, mode="softmax", temperature=1e-4)
    assert torch.allclose(sharp[ok], (hard_max * nbar)[ok], atol=1e-3)
    with pytest.raises(ValueError, match="mode"):
        aggregate_token_values(vals, mask, mode="median")


# ---------------------------------------------------------------- ListMLE


def test_listmle_equals_pl_on_sorted_order_and_log_k_factorial():
    """ListMLE orders by true scores (descending) and applies PL to pred/temperature; equal predictions
    give log K! whatever the truth."""
    pred = _rand(2, 4, seed=5)
    true = torch.tensor([[0.1, 0.9, 0.5, 0.3], [3.0, 1.0, 2.0, 0.0]], dtype=DT)
    order = torch.argsort(true, dim=1, descending=True)
    out = listmle(pred, true, temperature=0.5)
    assert torch.allclose(out.per_example, plackett_luce(pred / 0.5, order).per_example, atol=1e-12)
    assert "loss/listmle" in out.metrics
    flat = listmle(torch.zeros(2, 4, dtype=DT), true)
    assert torch.allclose(flat.per_example, torch.full((2,), math.log(24), dtype=DT))


def test_listmle_seeded_tie_breaking():
    """true = [1, 1, 0]: candidates 0 and 1 tie. The two tie orders give different losses on pred
    [2, 0, 1]; a fixed seed repeats its choice, and over seeds both orders occur. No generator keeps
    storage order (candidate 0 first)."""
    pred = torch.tensor([[2.0, 0.0, 1.0]], dtype=DT)
    true = torch.tensor([[1.0, 1.0, 0.0]], dtype=DT)
    first = plackett_luce(pred, torch.tensor([[0, 1, 2]])).loss.item()
    second = plackett_luce(pred, torch.tensor([[1, 0, 2]])).loss.item()
    seen = set()
    for seed in range(16):
        a = listmle(pred, true, generator=torch.Generator().manual_seed(seed)).loss.item()
        b = listmle(pred, true, generator=torch.Generator().manual_seed(seed)).loss.item()
        assert a == b
        assert a == pytest.approx(first) or a == pytest.approx(second)
        seen.add(round(a, 9))
    assert len(seen) == 2
    assert listmle(pred, true).loss.item() == pytest.approx(first)


def test_listmle_mask_and_bad_args():
    pred = torch.tensor([[1.0, float("nan"), 0.0]], dtype=DT)
    true = torch.tensor([[0.0, 9.0, 1.0]], dtype=DT)
    cmask = torch.tensor([[1, 0, 1]], dtype=torch.bool)
    out = listmle(pred, true, candidate_mask=cmask)
    expected = -F.logsigmoid(torch.tensor(0.0 - 1.0, dtype=DT))  # candidate 2 ranked first
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        listmle(pred, true, temperature=-1.0)
    with pytest.raises(ValueError, match="true_scores shape"):
        listmle(pred, true[:, :2])
