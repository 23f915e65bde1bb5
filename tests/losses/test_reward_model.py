"""Bradley–Terry reward-model loss (TRL parity) and the General Preference Model loss."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmalign.losses.reward_model import bradley_terry, general_preference_rm, general_preference_score

DT = torch.float64
LN2 = math.log(2.0)


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=DT) * scale).requires_grad_(True)


# ---------------------------------------------------------------- Bradley–Terry


def test_bt_ln2_at_equal_rewards_and_closed_form():
    """r_w = r_l, m = 0: −log σ(0) = ln 2. r_w = 2, r_l = 0.5, m = 1: −log σ(0.5) = softplus(−0.5).
    Centering c = 0.1 adds 0.1·(2 + 0.5)² = 0.625."""
    r = torch.tensor([0.3, -1.0, 5.0], dtype=DT)
    assert torch.allclose(bradley_terry(r, r).per_example, torch.full((3,), LN2, dtype=DT))
    out = bradley_terry(
        torch.tensor([2.0], dtype=DT), torch.tensor([0.5], dtype=DT), margin=torch.tensor([1.0])
    )
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-12)
    centered = bradley_terry(
        torch.tensor([2.0], dtype=DT),
        torch.tensor([0.5], dtype=DT),
        margin=1.0,
        center_rewards_coefficient=0.1,
    )
    assert centered.loss.item() == pytest.approx(math.log1p(math.exp(-0.5)) + 0.625, abs=1e-12)
    assert centered.metrics["loss/center"].item() == pytest.approx(0.625)


def test_bt_swap_with_negated_margin_is_complement():
    """Swapping w ↔ l and m → −m maps z = r_w − r_l − m to −z; σ(z) + σ(−z) = 1, so
    exp(−L) + exp(−L_swapped) = 1 per pair (and L_swapped = L + z)."""
    r_w, r_l, m = _rand(5, seed=1), _rand(5, seed=2), _rand(5, seed=3)
    a = bradley_terry(r_w, r_l, margin=m).per_example
    b = bradley_terry(r_l, r_w, margin=-m).per_example
    assert torch.allclose(torch.exp(-a) + torch.exp(-b), torch.ones(5, dtype=DT), atol=1e-12)
    assert torch.allclose(b, a + (r_w - r_l - m), atol=1e-12)


def test_bt_gradients():
    """∂L_i/∂r_w,i = −σ(−(r_w − r_l − m)) < 0 and ∂L_i/∂r_l,i = +σ(−(r_w − r_l − m)) > 0 (per-pair loss)."""
    r_w, r_l = _rand(4, seed=4), _rand(4, seed=5)
    m = torch.tensor([0.0, 0.5, -0.5, 1.0], dtype=DT)
    out = bradley_terry(r_w, r_l, margin=m)
    out.per_example.sum().backward()
    expected = torch.sigmoid(-(r_w - r_l - m)).detach()
    assert torch.allclose(r_w.grad, -expected, atol=1e-12) and torch.allclose(r_l.grad, expected, atol=1e-12)
    assert (r_w.grad < 0).all() and (r_l.grad > 0).all()


def test_bt_shift_invariance_only_without_centering():
    r_w, r_l = _rand(4, seed=6), _rand(4, seed=7)
    base = bradley_terry(r_w, r_l).loss
    assert bradley_terry(r_w + 3.0, r_l + 3.0).loss.item() == pytest.approx(base.item(), abs=1e-12)
    c = bradley_terry(r_w, r_l, center_rewards_coefficient=0.01).loss
    c_shift = bradley_terry(r_w + 3.0, r_l + 3.0, center_rewards_coefficient=0.01).loss
    assert c_shift.item() != pytest.approx(c.item(), abs=1e-6)


def test_bt_metrics_extremes_shapes_and_errors():
    """Metrics use TRL's names: rewards 1, 3 (chosen) and 2, 0 (rejected): accuracy 0.5, margin
    mean(−1, 3) = 1, min 0, mean 1.5, max 3."""
    out = bradley_terry(torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [0.0]]))
    m = out.metrics
    assert m["accuracy"].item() == 0.5 and m["rewards/accuracies"].item() == 0.5
    assert m["margin"].item() == pytest.approx(1.0) and m["rewards/margins"].item() == pytest.approx(1.0)
    assert (m["min_reward"].item(), m["mean_reward"].item(), m["max_reward"].item()) == (0.0, 1.5, 3.0)
    assert not any(v.requires_grad for v in m.values())
    big = torch.tensor([1e4, -1e4], requires_grad=True)
    ext = bradley_terry(big, torch.zeros(2))
    ext.loss.backward()
    assert torch.isfinite(ext.per_example).all() and torch.isfinite(big.grad).all()
    assert ext.per_example[1].item() == pytest.approx(1e4)
    bf = bradley_terry(torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.bfloat16))
    assert bf.loss.dtype == torch.float32 and bf.loss.item() == pytest.approx(LN2, abs=1e-6)
    w = torch.tensor([1.0, 0.0])
    assert bradley_terry(
        torch.tensor([1.0, -50.0]), torch.zeros(2), sample_weight=w
    ).loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        bradley_terry(torch.zeros(2), torch.zeros(2), center_rewards_coefficient=-1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        bradley_terry(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry(torch.zeros(2), torch.zeros(2), margin=torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[B\]"):
        bradley_terry(torch.zeros(2, 2), torch.zeros(2, 2))


@pytest.mark.parametrize("margin, center", [(False, None), (True, 0.01)])
def test_bt_parity_with_trl_reward_trainer(margin, center):
    """TRL 1.16 ``RewardTrainer.compute_loss`` (its own code; a stub model returns the [2B, 1] reward logits,
    chosen first) against ours, float64, to 1e-6: loss and the logged metrics."""
    trl_rm = pytest.importorskip("trl.trainer.reward_trainer")
    g = torch.Generator().manual_seed(11)
    b = 4
    logits = torch.randn(2 * b, 1, generator=g, dtype=DT) * 2
    m = torch.randn(b, generator=g, dtype=DT) if margin else None
    inputs = {"attention_mask": torch.ones(2 * b, 3, dtype=torch.long)}
    if margin:
        inputs["margin"] = m
    acc = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(center_rewards_coefficient=center),
        accelerator=acc,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    trl_loss = trl_rm.RewardTrainer.compute_loss(stub, lambda **_: SimpleNamespace(logits=logits), inputs)
    ours = bradley_terry(logits[:b], logits[b:], margin=m, center_rewards_coefficient=center)
    assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for key in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
        assert ours.metrics[key].item() == pytest.approx(stub._metrics["train"][key][0], abs=1e-6), key


# ---------------------------------------------------------------- General Preference Model


def test_gpm_score_matches_explicit_skew_symmetric_matrix():
    """s = ⟨R v_a, v_b⟩ with R = blockdiag(λ_i·[[0, −1], [1, 0]]), built explicitly as in the reference
    code; s(a, b) = −s(b, a) and s(a, a) = 0."""
    a, b = _rand(3, 6, seed=1), _rand(3, 6, seed=2)
    lam = torch.tensor([0.5, 1.0, 2.0], dtype=DT)
    r = torch.zeros(6, 6, dtype=DT)
    for i in range(3):
        r[2 * i, 2 * i + 1] = -lam[i]
        r[2 * i + 1, 2 * i] = lam[i]
    explicit = ((a @ r.T) * b).sum(-1)
    s = general_preference_score(a, b, eigenvalues=lam)
    assert torch.allclose(s, explicit, atol=1e-12)
    assert torch.allclose(general_preference_score(b, a, eigenvalues=lam), -s, atol=1e-12)
    assert torch.allclose(general_preference_score(a, a), torch.zeros(3, dtype=DT), atol=1e-12)
    per_row = general_preference_score(a, b, eigenvalues=lam.expand(3, 3))
    assert torch.allclose(per_row, s)


def test_gpm_loss_values_and_cycle():
    """Equal embeddings: s = 0, loss ln 2. k = 1, unit vectors at angles θ_w, θ_l: s = sin(θ_l − θ_w), loss
    softplus(−s/τ). Three unit vectors 120° apart form a cycle (each beats the next), which no scalar
    reward can represent: all three losses are below ln 2."""
    v = _rand(2, 4, seed=3)
    assert torch.allclose(
        general_preference_rm(v, v).per_example, torch.full((2,), LN2, dtype=DT), atol=1e-12
    )
    ang = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=DT)
    pts = torch.stack([torch.cos(ang), torch.sin(ang)], -1)
    nxt = pts.roll(-1, 0)
    tau = 0.1
    out = general_preference_rm(pts, nxt, tau=tau)
    expected = F.softplus(-torch.sin(ang.roll(-1) - ang) / tau)
    assert torch.allclose(out.per_example, expected, atol=1e-12)
    assert (out.per_example < LN2).all() and out.metrics["rewards/accuracies"].item() == 1.0


def test_gpm_swap_normalize_gradients_and_errors():
    """Swap gives −s, so exp(−L) + exp(−L_swapped) = 1 (margin 0). normalize=True makes the loss
    invariant to the embedding norm. Gradients are finite at large embeddings."""
    v_w, v_l = _rand(4, 4, seed=5), _rand(4, 4, seed=6)
    a = general_preference_rm(v_w, v_l).per_example
    b = general_preference_rm(v_l, v_w).per_example
    assert torch.allclose(torch.exp(-a) + torch.exp(-b), torch.ones(4, dtype=DT), atol=1e-12)
    scaled = general_preference_rm(7.0 * v_w, 0.2 * v_l).per_example
    assert torch.allclose(scaled, a, atol=1e-12)
    raw = general_preference_rm(v_w, v_l, normalize=False, tau=1.0, margin=0.3).per_example
    s = general_preference_score(v_w, v_l)
    assert torch.allclose(raw, F.softplus(-(s - 0.3)), atol=1e-12)
    big = (torch.randn(2, 4) * 1e4).requires_grad_(True)
    out = general_preference_rm(big, torch.randn(2, 4), normalize=False, tau=1.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(big.grad).all()
    with pytest.raises(ValueError, match="even"):
        general_preference_rm(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="tau"):
        general_preference_rm(v_w, v_l, tau=0.0)
    with pytest.raises(ValueError, match="eigenvalues"):
        general_preference_rm(v_w, v_l, eigenvalues=torch.ones(3))
