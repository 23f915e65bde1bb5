"""Tests for mmalign.losses.contrastive: parity with open_clip, closed forms, symmetries, gradient signs,
reductions, masks, extremes and weight averaging."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, DistillClipLoss, SigLipLoss

from mmalign.losses.contrastive import (
    alignment,
    average_weights,
    cavp_intra_contrastive,
    cavp_loss,
    clip_contrastive,
    hycd,
    modality_gap,
    rafa,
    siglip,
    uniformity,
    update_weight_average,
    zscl_distill,
)

D64 = torch.float64


def _feats(n=6, d=8, seed=0, dtype=D64, normalize=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(n, d, generator=g, dtype=dtype)
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return x, y


def _clips(b=3, c=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(b, c, d, generator=g, dtype=D64), dim=-1)
    a = F.normalize(torch.randn(b, c, d, generator=g, dtype=D64), dim=-1)
    return v, a


# ----------------------------------------------------------------------------------------- parity (open_clip)


@pytest.mark.parametrize("scale", [0.5, 1.0, 14.3, 100.0])
@pytest.mark.parametrize("bias", [None, -3.0])
def test_clip_parity_with_open_clip(scale, bias):
    """Loss and gradients (features and logit_scale) equal open_clip ClipLoss (single process), float64."""
    img, txt = _feats()
    img1, txt1 = img.clone().requires_grad_(), txt.clone().requires_grad_()
    img2, txt2 = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s1 = torch.tensor(scale, dtype=D64, requires_grad=True)
    s2 = torch.tensor(scale, dtype=D64, requires_grad=True)
    b = None if bias is None else torch.tensor(bias, dtype=D64)
    ours = clip_contrastive(img1, txt1, s1, logit_bias=b)
    ref = ClipLoss()(img2, txt2, s2, logit_bias=b)
    torch.testing.assert_close(ours.loss, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.per_example.mean(), ref, atol=1e-6, rtol=0)
    ours.loss.backward()
    ref.backward()
    torch.testing.assert_close(img1.grad, img2.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(txt1.grad, txt2.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-6, rtol=0)  # learnable temperature


@pytest.mark.parametrize("scale", [1.0, 10.0, 112.3])
@pytest.mark.parametrize("bias", [None, -10.0, 2.0])
def test_siglip_parity_with_open_clip(scale, bias):
    """Loss (sum over N×N logsigmoid terms / N) and gradients equal open_clip SigLipLoss in float64."""
    img, txt = _feats(seed=1)
    img1, img2 = img.clone().requires_grad_(), img.clone().requires_grad_()
    s = torch.tensor(scale, dtype=D64)
    b = None if bias is None else torch.tensor(bias, dtype=D64)
    ours = siglip(img1, txt, s, b)
    ref = SigLipLoss()(img2, txt, s, b)
    torch.testing.assert_close(ours.loss, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.per_example.mean(), ours.loss)
    ours.loss.backward()
    ref.backward()
    torch.testing.assert_close(img1.grad, img2.grad, atol=1e-6, rtol=0)
    neg = siglip(img, txt, s, b, negative_only=True).loss
    torch.testing.assert_close(neg, SigLipLoss()._loss(img, txt, s, b, negative_only=True), atol=1e-6, rtol=0)


def test_hycd_alpha0_parity_with_open_clip_distill():
    """α=0, T=1: HyCD = KL(teacher‖student) averaged over both directions. open_clip DistillClipLoss.dist_loss
    is the soft-target CE, so the two differ by exactly the mean teacher entropy ½(H_i2t + H_t2i)."""
    s_img, s_txt = _feats(seed=2)
    t_img, t_txt = _feats(seed=3)
    s, ts = torch.tensor(7.0, dtype=D64), torch.tensor(11.0, dtype=D64)
    ours = hycd(s_img, s_txt, t_img, t_txt, s, teacher_logit_scale=ts, alpha=0.0, temperature=1.0).loss
    _, ref_ce = DistillClipLoss()(s_img, s_txt, s, t_img, t_txt, ts)
    t_logits = ts * t_img @ t_txt.T

    def entropy(logits):
        p = logits.softmax(-1)
        return -(p * p.log()).sum(-1).mean()

    h = 0.5 * (entropy(t_logits) + entropy(t_logits.T))
    torch.testing.assert_close(ours, ref_ce - h, atol=1e-6, rtol=0)


def test_hycd_matches_kl_div_batchmean_form():
    """CLIP-Refine's ``distill``: F.kl_div(log_softmax(y_s/T), α·I + (1−α)·softmax(y_t/T), 'batchmean')·T²,
    averaged over i2t and t2i, with raw dot-product logits (s=1)."""
    s_img, s_txt = _feats(n=5, seed=4, normalize=False)
    t_img, t_txt = _feats(n=5, seed=5, normalize=False)
    alpha, temp = 0.3, 2.5
    ys, yt = s_img @ s_txt.T, t_img @ t_txt.T
    eye = torch.eye(5, dtype=D64)

    def distill(a, b):
        target = alpha * eye + (1 - alpha) * (b / temp).softmax(1)
        return F.kl_div((a / temp).log_softmax(1), target, reduction="batchmean") * temp**2

    expected = 0.5 * (distill(ys, yt) + distill(ys.T, yt.T))
    got = hycd(s_img, s_txt, t_img, t_txt, alpha=alpha, temperature=temp)
    torch.testing.assert_close(got.loss, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ closed forms


def test_clip_aligned_large_scale_and_zero_scale():
    """Orthonormal I = T: logits = s on the diagonal, 0 elsewhere, so each CE = log(1 + (N−1)e^{−s}) (→ 0 at
    s = 100). At s = 0 every row is uniform: loss = log N."""
    n = 4
    e = torch.eye(n, 6, dtype=D64)
    out = clip_contrastive(e, e, 100.0)
    torch.testing.assert_close(out.loss, torch.log1p(torch.tensor((n - 1) * math.exp(-100.0), dtype=D64)))
    assert out.loss < 1e-40
    assert out.metrics["acc/i2t"] == 1 and out.metrics["acc/t2i"] == 1
    img, txt = _feats(n=n)
    torch.testing.assert_close(clip_contrastive(img, txt, 0.0).loss, torch.tensor(math.log(n), dtype=D64))


def test_siglip_closed_forms():
    """s = b = 0: every term is −log σ(0) = ln 2 and a row has N of them: loss = N·ln 2.
    Orthonormal I = T, s = 10, b = −5: diag −logσ(5), off-diag −logσ(5): loss = N·softplus(−5)."""
    img, txt = _feats(n=5)
    torch.testing.assert_close(siglip(img, txt, 0.0, 0.0).loss, torch.tensor(5 * math.log(2), dtype=D64))
    e = torch.eye(5, dtype=D64)
    torch.testing.assert_close(siglip(e, e, 10.0, -5.0).loss, 5 * F.softplus(torch.tensor(-5.0, dtype=D64)))


def test_clip_swap_symmetry_and_labels_permutation():
    img, txt = _feats(seed=6)
    a, b = clip_contrastive(img, txt, 9.0), clip_contrastive(txt, img, 9.0)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.per_example, b.per_example)
    # Shuffle the texts, tell the loss where each image's positive went: identical per-pair values.
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    shuffled = clip_contrastive(img, txt[perm], 9.0, labels=torch.argsort(perm))
    torch.testing.assert_close(shuffled.per_example, a.per_example)
    with pytest.raises(ValueError, match="permutation"):
        clip_contrastive(img, txt, 9.0, labels=torch.tensor([0, 0, 1, 2, 3, 4]))


def _diag_grad(fn):
    """With one-hot texts (T = I), image[i, j] = logit[i, j] / s, so ∂L/∂image is s·∂L/∂logits."""
    img, _ = _feats(n=4, d=4, seed=7, normalize=False)
    img = (0.3 * img).requires_grad_()
    fn(img, torch.eye(4, dtype=D64)).backward()
    off = ~torch.eye(4, dtype=torch.bool)
    return img.grad.diagonal(), img.grad[off]


@pytest.mark.parametrize(
    "fn",
    [
        lambda i, t: clip_contrastive(i, t, 3.0).loss,
        lambda i, t: siglip(i, t, 3.0, -1.0).loss,
        lambda i, t: hycd(i, t, i.detach().flip(0), t, 3.0, alpha=1.0).loss,
        lambda i, t: cavp_intra_contrastive(i[None], t[None], 3.0).loss,
    ],
    ids=["clip", "siglip", "hycd_alpha1", "cavp_intra"],
)
def test_gradient_signs(fn):
    """Raising a positive-pair similarity lowers the loss; raising a negative-pair similarity raises it."""
    diag, off = _diag_grad(fn)
    assert (diag < 0).all() and (off > 0).all()


def test_hycd_reductions():
    """α=1, T=1: the target is the one-hot pairing, KL = CE, so HyCD == clip_contrastive (any teacher).
    α=0 with student == teacher: KL = 0."""
    s_img, s_txt = _feats(seed=8)
    t_img, t_txt = _feats(seed=9)
    got = hycd(s_img, s_txt, t_img, t_txt, 12.0, alpha=1.0, temperature=1.0)
    ref = clip_contrastive(s_img, s_txt, 12.0)
    torch.testing.assert_close(got.loss, ref.loss)
    torch.testing.assert_close(got.per_example, ref.per_example)
    same = hycd(s_img, s_txt, s_img, s_txt, 12.0, alpha=0.0, temperature=3.0)
    torch.testing.assert_close(same.loss, torch.zeros((), dtype=D64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="alpha"):
        hycd(s_img, s_txt, t_img, t_txt, alpha=1.5)


# ------------------------------------------------------------------------------------------------- RaFA


def test_rafa_seeded_determinism_and_shared_targets():
    img, txt = _feats(n=4, d=5, seed=10, normalize=False)
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    a, b, c = rafa(img, txt, generator=g(0)), rafa(img, txt, generator=g(0)), rafa(img, txt, generator=g(1))
    torch.testing.assert_close(a.loss, b.loss, atol=0, rtol=0)
    assert not torch.allclose(a.loss, c.loss)
    # The generator draws one [N, D] sample shared by image and text: code form MSE(f_i, r) + MSE(f_t, r).
    r = torch.randn(4, 5, generator=g(0), dtype=D64)
    torch.testing.assert_close(a.loss, F.mse_loss(img, r) + F.mse_loss(txt, r))
    torch.testing.assert_close(rafa(img, txt, targets=r).loss, a.loss)
    # Zero iff f_i = f_t = r; separate text targets break the zero.
    assert rafa(r, r, targets=r).loss == 0
    assert rafa(r, r, generator=g(0)).loss == 0
    assert rafa(r, r, generator=g(0), share_targets=False).loss > 0
    # std = 0 collapses the prior onto its mean.
    const = torch.full((4, 5), 0.7, dtype=D64)
    assert rafa(const, const, mean=0.7, std=0.0).loss == 0


def test_rafa_literal_distances():
    """f_i = (2,0,0,0), f_t = (0,1,0,0), r = 0: code MSE = 4/4 + 1/4 = 1.25; paper ½(‖·‖²+‖·‖²) = 2.5."""
    img = torch.tensor([[2.0, 0, 0, 0]])
    txt = torch.tensor([[0.0, 1, 0, 0]])
    r = torch.zeros(1, 4)
    assert rafa(img, txt, targets=r).loss.item() == pytest.approx(1.25)
    assert rafa(img, txt, targets=r, distance="l2").loss.item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="distance"):
        rafa(img, txt, targets=r, distance="cosine")


# ------------------------------------------------------------------------------------------------- ZSCL


def test_zscl_equal_models_and_divergences():
    """cur == ref: KL = 0; soft CE = T²·H(softmax(y_ref/T)) with zero gradient; CE − KL = T²·H for any
    inputs, and the two give the same gradient."""
    cur, txt = _feats(n=5, seed=11)
    t = 2.0
    x = cur.clone().requires_grad_()
    ce = zscl_distill(x, cur, txt[:4], 50.0, temperature=t)
    ce.loss.backward()
    p = (50.0 * cur @ txt[:4].T / t).softmax(-1)
    h = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(ce.loss, t**2 * h)
    assert x.grad.abs().max() < 1e-12
    assert zscl_distill(cur, cur, txt[:4], 50.0, divergence="kl").loss.abs() < 1e-12
    other, _ = _feats(n=5, seed=12)
    y1, y2 = other.clone().requires_grad_(), other.clone().requires_grad_()
    l_ce = zscl_distill(y1, cur, txt[:4], 50.0, temperature=t)
    l_kl = zscl_distill(y2, cur, txt[:4], 50.0, temperature=t, divergence="kl")
    torch.testing.assert_close(l_ce.loss - l_kl.loss, t**2 * h)
    l_ce.loss.backward()
    l_kl.loss.backward()
    torch.testing.assert_close(y1.grad, y2.grad)


def test_zscl_text_term_and_temperature_scaling():
    """The text term is the same distillation over images per reference text. The T² factor keeps the
    gradient magnitude T-independent at large T (gradient → (Δ − mean Δ)/M); without it T=20 would give
    half the gradient of T=10."""
    cur, txt = _feats(n=4, seed=13)
    ref, _ = _feats(n=4, seed=14)
    both = zscl_distill(cur, ref, txt, 5.0, image_weight=0.5, text_weight=0.5)
    img_only = zscl_distill(cur, ref, txt, 5.0)
    txt_only = zscl_distill(cur, ref, txt, 5.0, image_weight=0.0, text_weight=1.0)
    torch.testing.assert_close(both.loss, 0.5 * img_only.loss + 0.5 * txt_only.loss)
    # ZSCL's ``distillation(t, s, T)``: F.cross_entropy(s/T, softmax(t/T)) (soft targets, row mean) · T².
    y_cur, y_ref, t = 5.0 * cur @ txt.T, 5.0 * ref @ txt.T, 2.0
    zscl_ce = lambda te, st: F.cross_entropy(st / t, (te / t).softmax(1)) * t**2  # noqa: E731
    torch.testing.assert_close(img_only.loss, zscl_ce(y_ref, y_cur))
    torch.testing.assert_close(txt_only.loss, zscl_ce(y_ref.T, y_cur.T))
    norms = []
    for t in (10.0, 20.0):
        x = cur.clone().requires_grad_()
        zscl_distill(x, ref, txt, 5.0, temperature=t, divergence="kl").loss.backward()
        norms.append(x.grad.norm())
    assert abs(norms[0] / norms[1] - 1) < 0.05


# ------------------------------------------------------------------------------------------------- CAVP


def test_cavp_intra_single_clip_is_zero_and_aligned_is_zero():
    v, a = _clips(c=1)
    assert cavp_intra_contrastive(v, a, 100.0).loss == 0
    e = torch.eye(9, 10, dtype=D64).view(3, 3, 10)  # orthonormal across all 9 clips
    out = cavp_loss(e, e, 100.0)
    assert out.loss < 1e-30 and out.metrics["loss/cavp_intra"] < 1e-30


def test_cavp_matches_flat_diff_foley_layout():
    """ClipLoss_Intra_Contrast on a flat batch of B·C contiguous clips: extra = CLIP InfoNCE on the flat
    batch; intra = CE over the C×C diagonal blocks of the flat logits, both directions."""
    v, a = _clips(b=3, c=3, seed=15)
    flat_v, flat_a, s = v.reshape(9, -1), a.reshape(9, -1), 20.0
    logits = s * flat_v @ flat_a.T
    blocks = torch.stack([logits[3 * k : 3 * k + 3, 3 * k : 3 * k + 3] for k in range(3)])
    lab = torch.arange(3).repeat(3)
    intra = 0.5 * (
        F.cross_entropy(blocks.reshape(9, 3), lab)
        + F.cross_entropy(blocks.transpose(1, 2).reshape(9, 3), lab)
    )
    extra = clip_contrastive(flat_v, flat_a, s).loss
    torch.testing.assert_close(cavp_intra_contrastive(v, a, s).loss, intra)
    torch.testing.assert_close(cavp_loss(v, a, s, intra_weight=0.5).loss, extra + 0.5 * intra)
    # Temporal_Semantic form with model-supplied pooled features: CLIP InfoNCE on them + weight·intra.
    pv, pa = _feats(n=3, seed=16)
    got = cavp_loss(v, a, s, semantic="mean", video_pooled_features=pv, audio_pooled_features=pa)
    torch.testing.assert_close(got.loss, clip_contrastive(pv, pa, s).loss + intra)


@pytest.mark.parametrize("semantic", ["clips", "mean"])
def test_cavp_video_permutation_invariance(semantic):
    v, a = _clips(b=4, c=3, seed=17)
    perm = torch.tensor([2, 0, 3, 1])
    x, y = cavp_loss(v, a, 15.0, semantic=semantic), cavp_loss(v[perm], a[perm], 15.0, semantic=semantic)
    torch.testing.assert_close(x.loss, y.loss)
    torch.testing.assert_close(x.per_example[perm], y.per_example)


def test_cavp_temporal_swap_increases_loss():
    """Aligned frames (A = V): swapping two time steps in A only makes two frames pick the wrong audio."""
    v, _ = _clips(b=2, c=4, seed=18)
    a = v.clone()
    swapped = a.clone()
    swapped[:, [0, 2]] = a[:, [2, 0]]
    assert cavp_intra_contrastive(v, swapped, 10.0).loss > cavp_intra_contrastive(v, a, 10.0).loss


def test_cavp_masks():
    """A masked clip contributes exactly 0 even if it holds NaN: the result equals the loss on the videos
    without it. A fully masked video gives per-example 0 and no NaN gradient."""
    v, a = _clips(b=2, c=3, seed=19)
    vm, am = v.clone(), a.clone()
    vm[1, 2] = float("nan")
    am[1, 2] = float("inf")
    mask = torch.tensor([[True, True, True], [True, True, False]])
    vg = vm.clone().requires_grad_()
    got = cavp_intra_contrastive(vg, am, 10.0, mask=mask)
    got.loss.backward()
    assert torch.isfinite(vg.grad).all() and (vg.grad[1, 2] == 0).all()
    torch.testing.assert_close(got.per_example[0], cavp_intra_contrastive(v[:1], a[:1], 10.0).per_example[0])
    torch.testing.assert_close(got.per_example[1], cavp_intra_contrastive(v[1:, :2], a[1:, :2], 10.0).loss)
    flat = cavp_loss(vm, am, 10.0, intra_weight=0.0, mask=mask)
    kept = torch.cat([v[0], v[1, :2]]), torch.cat([a[0], a[1, :2]])
    rows = clip_contrastive(*kept, 10.0).per_example
    torch.testing.assert_close(flat.per_example, torch.stack([rows[:3].mean(), rows[3:].mean()]))
    vg = vm.clone().requires_grad_()
    full = torch.tensor([[True, True, True], [False, False, False]])
    out = cavp_loss(vg, am, 10.0, mask=full)
    out.loss.backward()
    assert out.per_example[1] == 0 and torch.isfinite(out.loss)
    assert torch.isfinite(vg.grad).all() and (vg.grad[1] == 0).all()
    # Pooled semantic term: the fully masked video is neither query nor negative.
    out_mean = cavp_loss(vm, am, 10.0, semantic="mean", intra_weight=0.0, mask=full)
    assert out_mean.per_example[1] == 0
    pooled = F.normalize(v[:1].mean(1), dim=-1), F.normalize(a[:1].mean(1), dim=-1)
    torch.testing.assert_close(out_mean.per_example[0], clip_contrastive(*pooled, 10.0).loss)


# -------------------------------------------------------------------------------------- geometry metrics


def test_modality_gap():
    """Centroid distance over the batch dim: x = (1,0), y = (0,1) gives √2 (a mean over features would give
    0). Identical sets or a permutation of one give 0; normalisation happens first ((2,0) → (1,0))."""
    gap = modality_gap(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert gap.item() == pytest.approx(2**0.5)
    img, txt = _feats(seed=20)
    assert modality_gap(img, img) == 0
    assert modality_gap(img, img[torch.tensor([5, 4, 3, 2, 1, 0])]) < 1e-12
    torch.testing.assert_close(modality_gap(img, txt[:3]), (img.mean(0) - txt[:3].mean(0)).norm())


def test_alignment_uniformity_closed_forms():
    """alignment: pairs ((1,0),(0,1)) and ((0,1),(0,1)): squared distances 2 and 0, mean 1; α=1: √2/2.
    uniformity: points (1,0), (−1,0), (1,0): pair distances² 4, 0, 4 → log((2e^{−8} + 1)/3); t=2."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert alignment(x, y).item() == pytest.approx(1.0)
    assert alignment(x, y, alpha=1.0).item() == pytest.approx(2**0.5 / 2)
    pts = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]], dtype=D64, requires_grad=True)
    u = uniformity(pts)
    assert u.item() == pytest.approx(math.log((2 * math.exp(-8) + 1) / 3))
    u.backward()
    assert torch.isfinite(pts.grad).all()
    img, _ = _feats(seed=21)
    torch.testing.assert_close(uniformity(img, t=3.0), torch.pdist(img).pow(2).mul(-3.0).exp().mean().log())
    with pytest.raises(ValueError, match="at least 2"):
        uniformity(img[:1])


# ---------------------------------------------------------------------------------------- weight averaging


def test_weight_averaging():
    """SMA: starting at θ_0 and updating with counts 1..n gives the mean of the n+1 snapshots; the WiSE
    variant with α=1 is the SMA; one WiSE step is α·(n·θ_we + θ)/(n+1) + (1−α)·θ_0."""
    g = torch.Generator().manual_seed(0)
    snaps = [{"w": torch.randn(3, generator=g), "n": torch.tensor(k)} for k in range(4)]
    avg = snaps[0]
    for k in range(1, 4):
        avg = update_weight_average(avg, snaps[k], k)
    torch.testing.assert_close(avg["w"], torch.stack([s["w"] for s in snaps]).mean(0))
    assert avg["n"] == 0  # integer buffers are copied from the running average, not averaged
    wise1 = update_weight_average(snaps[0], snaps[1], 1, anchor=snaps[3], wise_alpha=1.0)
    torch.testing.assert_close(wise1["w"], (snaps[0]["w"] + snaps[1]["w"]) / 2)
    wise = update_weight_average(snaps[1], snaps[2], 2, anchor=snaps[0], wise_alpha=0.98)
    expected = 0.98 * (2 * snaps[1]["w"] + snaps[2]["w"]) / 3 + 0.02 * snaps[0]["w"]
    torch.testing.assert_close(wise["w"], expected)
    soup = average_weights([snaps[0], snaps[1]], [0.25, 0.75])
    torch.testing.assert_close(soup["w"], 0.25 * snaps[0]["w"] + 0.75 * snaps[1]["w"])
    bf16 = torch.bfloat16
    half = average_weights([{"w": torch.ones(2, dtype=bf16)}, {"w": torch.zeros(2, dtype=bf16)}])
    assert half["w"].dtype == torch.bfloat16 and (half["w"] == 0.5).all()
    with pytest.raises(ValueError, match="different keys"):
        average_weights([{"w": torch.ones(1)}, {"v": torch.ones(1)}])


# -------------------------------------------------------------------------------- dtypes, extremes, errors


def _all_losses(img, txt, scale):
    b, d = img.shape[0] // 2, img.shape[1]
    return {
        "clip": clip_contrastive(img, txt, scale),
        "siglip": siglip(img, txt, scale, -10.0),
        "cavp": cavp_loss(img.reshape(b, 2, d), txt.reshape(b, 2, d), scale),
        "cavp_mean": cavp_loss(img.reshape(b, 2, d), txt.reshape(b, 2, d), scale, semantic="mean"),
        "hycd": hycd(img, txt, txt.detach(), img.detach(), scale, alpha=0.5),
        "zscl": zscl_distill(img, txt.detach(), txt.detach(), scale),
        "rafa": rafa(img, txt, generator=torch.Generator().manual_seed(0)),
    }


def test_bf16_inputs_accepted():
    img, txt = _feats(dtype=torch.float32)
    scale = torch.tensor(20.0, dtype=torch.bfloat16)
    for name, out in _all_losses(img.bfloat16(), txt.bfloat16(), scale).items():
        assert out.loss.dtype == torch.float32, name
        assert torch.isfinite(out.loss), name
    assert modality_gap(img.bfloat16(), txt.bfloat16()).dtype == torch.float32


def test_finite_at_huge_logit_scale():
    """s = 1e4 (|logits| up to 1e4): values and gradients stay finite for every loss."""
    img, txt = _feats(dtype=torch.float32, seed=22)
    for name, out in _all_losses(img.requires_grad_(), txt.requires_grad_(), 1e4).items():
        assert torch.isfinite(out.loss), name
        (g_img,) = torch.autograd.grad(out.loss, img, retain_graph=False)
        assert torch.isfinite(g_img).all(), name


def test_sample_weight_and_reduction():
    img, txt = _feats(seed=23)
    base = clip_contrastive(img, txt, 5.0)
    w = torch.zeros(6, dtype=D64)
    w[2] = 3.0
    torch.testing.assert_close(clip_contrastive(img, txt, 5.0, sample_weight=w).loss, base.per_example[2])
    torch.testing.assert_close(clip_contrastive(img, txt, 5.0, reduction="sum").loss, base.per_example.sum())


def test_bad_arguments_raise():
    img, txt = _feats()
    v, a = _clips()
    with pytest.raises(ValueError, match="same N and D"):
        clip_contrastive(img, txt[:5], 1.0)
    with pytest.raises(ValueError, match="reduction"):
        siglip(img, txt, 1.0, reduction="avg")
    with pytest.raises(ValueError, match="semantic"):
        cavp_loss(v, a, 1.0, semantic="max")
    with pytest.raises(ValueError, match="mask"):
        cavp_intra_contrastive(v, a, 1.0, mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        zscl_distill(img, txt, txt, 1.0, temperature=0.0)
    with pytest.raises(ValueError, match="divergence"):
        zscl_distill(img, txt, txt, 1.0, divergence="js")
    with pytest.raises(ValueError, match="logit_scale"):
        clip_contrastive(img, txt, torch.ones(2))
