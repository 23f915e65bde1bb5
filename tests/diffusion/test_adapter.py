"""The diffusion adapter's invariants (research/diffusion.md §6, "suggested invariants"), on tiny models.

Batches are built directly (random latents/embeddings, noise from :class:`NoiseSampler`), so each test is about
the adapter and the loss arithmetic, not about data loading.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmalign import losses as L
from mmalign.adapters.diffusion import DiffusionAdapter, make_noise_sampler
from mmalign.data.batches import ImageBatch
from mmalign.data.noise import NoiseSampler
from mmalign.models.diffusion import apply_lora
from mmalign.models.diffusion_tiny import build_tiny_components
from mmalign.train.reference import AdapterReference

LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def unet():
    return build_tiny_components("unet", seed=0)


def _batch(comps, *, b: int = 3, k: int = 2, same: bool = False, seed: int = 0, epoch: int = 0) -> ImageBatch:
    """Random posterior parameters (mean ‖ logvar) for K candidates; ``same``: every candidate identical."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = comps.latent_shape(16)
    params = torch.randn(b, k, 2 * c if comps.vae is not None else c, h, w, generator=g)
    if comps.vae is not None:
        params[:, :, c:] = -4.0  # small posterior variance
    if same:
        params = params[:, :1].expand_as(params).clone()
    sampler = make_noise_sampler(comps, 16, seed=seed)
    draws = [sampler.draw(i, epoch, k) for i in range(b)]
    extras = {key: torch.stack([d[key] for d in draws]) for key in ("noise", "timesteps", "sigmas", "vae_noise")
              if key in draws[0]}
    extras["time_ids"] = torch.tensor([32.0, 32, 0, 0, 16, 16]).expand(b, k, 6).clone()
    return ImageBatch(captions=[f"a red circle {i}" for i in range(b)], latent_params=params, extras=extras)


def _lora(comps, seed: int = 1):
    model = apply_lora(comps.denoiser, r=2)
    torch.manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.2)  # a policy that differs from the base
    return model


def _dpo(p, r, beta=5000.0):
    return L.diffusion_dpo(p.extras["err"][:, 0], p.extras["err"][:, 1], r.extras["err"][:, 0],
                           r.extras["err"][:, 1], beta=beta)


def test_policy_equals_reference_gives_ln2(unet):
    """s = 0 when policy == reference: loss ln 2, accuracy 0 (ties count wrong, Salesforce/TRL rule)."""
    adapter, batch = DiffusionAdapter(unet), _batch(unet)
    with torch.no_grad():
        pol, ref = adapter.score(unet.denoiser, batch), adapter.score(unet.denoiser, batch)
    out = _dpo(pol, ref)
    assert out.loss.item() == pytest.approx(LN2, abs=1e-6)
    assert out.metrics["rewards/accuracies"].item() == 0.0


def test_identical_images_give_ln2_for_any_policy(unet):
    """Winner == loser ⇒ m_w = m_l and r_w = r_l exactly (shared noise and t) ⇒ loss ln 2 for any policy."""
    comps = build_tiny_components("unet", seed=3)
    model = _lora(comps)
    adapter, batch = DiffusionAdapter(comps), _batch(comps, same=True)
    ref = AdapterReference(model, adapter.score).scores(batch)
    pol = adapter.score(model, batch)
    assert not torch.equal(pol.extras["err"], ref.extras["err"])  # the policy really differs
    assert torch.equal(pol.extras["err"][:, 0], pol.extras["err"][:, 1])
    assert _dpo(pol, ref).loss.item() == pytest.approx(LN2, abs=1e-6)


def test_swap_negates_inside_term(unet):
    comps = build_tiny_components("unet", seed=4)
    model = _lora(comps)
    adapter, batch = DiffusionAdapter(comps), _batch(comps)
    swapped = _batch(comps)
    swapped.latent_params = batch.latent_params.flip(1)
    ref = AdapterReference(model, adapter.score)
    with torch.no_grad():
        a = _dpo(adapter.score(model, batch), ref.scores(batch))
        b = _dpo(adapter.score(model, swapped), ref.scores(swapped))
    torch.testing.assert_close(a.metrics["rewards/margins"], -b.metrics["rewards/margins"])
    # NPO(w, l) == DPO(l, w)
    pol, rs = adapter.score(model, batch), ref.scores(batch)
    e, r = pol.extras["err"], rs.extras["err"]
    npo = L.diffusion_npo(e[:, 0], e[:, 1], r[:, 0], r[:, 1], beta=5000.0)
    torch.testing.assert_close(npo.loss, L.diffusion_dpo(e[:, 1], e[:, 0], r[:, 1], r[:, 0], beta=5000.0).loss)


def test_v_prediction_target_is_get_velocity():
    """v target = scheduler.get_velocity(x0, ε, t); and ε̂ − ε = α_t·(v̂ − v) for the implied predictions."""
    comps = build_tiny_components("unet", prediction_type="v_prediction", seed=0)
    adapter, sched = DiffusionAdapter(comps), comps.scheduler
    x0, noise, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([0, 250, 600, 999])
    x_t, target = adapter.noisy_and_target(x0, noise, t, None)
    torch.testing.assert_close(target, sched.get_velocity(x0, noise, t))
    torch.testing.assert_close(x_t, sched.add_noise(x0, noise, t))
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    v_hat = target + 0.1 * torch.randn_like(target)
    eps_hat = a * v_hat + s * x_t  # ε from a v prediction
    torch.testing.assert_close(eps_hat - noise, a * (v_hat - target), atol=1e-5, rtol=1e-4)


def test_flow_target_and_sigma_sampling():
    comps = build_tiny_components("sd3", seed=0)
    adapter = DiffusionAdapter(comps)
    x0, noise, sig = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    x_t, target = adapter.noisy_and_target(x0, noise, sig * 1000, sig)
    torch.testing.assert_close(x_t, (1 - sig.view(-1, 1, 1, 1)) * x0 + sig.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(target, noise - x0)
    sampler = make_noise_sampler(comps, 16, seed=0)
    draws = [sampler.draw(i, 0, 2) for i in range(400)]
    sigmas = torch.stack([d["sigmas"] for d in draws])
    table = comps.scheduler.sigmas
    assert all(bool((table - s).abs().min() < 1e-6) for s in sigmas)  # indexes the training table
    torch.testing.assert_close(torch.stack([d["timesteps"] for d in draws]), sigmas * 1000, atol=1e-3, rtol=1e-5)
    # logit-normal u centred at 0.5 → median σ ≈ the table entry at index N/2 (shift 3 ⇒ ≈ 0.75)
    assert abs(sigmas.median().item() - table[len(table) // 2].item()) < 0.08


def test_noise_sampler_is_deterministic_per_example():
    s = NoiseSampler(latent_shape=(4, 8, 8), seed=5, vae_sample=True)
    a, b = s.draw(7, 2, 2), s.draw(7, 2, 2)
    assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["timesteps"], b["timesteps"])
    assert not torch.equal(a["noise"], s.draw(7, 3, 2)["noise"])  # a new epoch, new noise
    assert not torch.equal(a["noise"], s.draw(8, 2, 2)["noise"])
    fixed = NoiseSampler(latent_shape=(4, 8, 8), seed=5, fixed=True)
    assert torch.equal(fixed.draw(7, 0, 2)["noise"], fixed.draw(7, 9, 2)["noise"])


def test_lora_adapters_enabled_after_reference_pass(unet):
    """AdapterReference disables the LoRA for the reference pass and enables it again: the policy pass after it
    gives nonzero LoRA gradients and differs from the reference."""
    comps = build_tiny_components("unet", seed=5)
    model = _lora(comps)
    adapter, batch = DiffusionAdapter(comps), _batch(comps)
    ref = AdapterReference(model, adapter.score).scores(batch)
    pol = adapter.score(model, batch)
    _dpo(pol, ref).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    with model.disable_adapter(), torch.no_grad():
        plain = adapter.score(model, batch)
    torch.testing.assert_close(ref.logps, plain.logps)
    assert not torch.allclose(pol.logps.detach(), ref.logps)


def test_one_step_raises_winner_over_loser(unet):
    """One SGD step on the DPO loss lowers (m_w − r_w) − (m_l − r_l) on the batch (the inside term rises)."""
    comps = build_tiny_components("unet", seed=6)
    model = _lora(comps, seed=2)
    adapter, batch = DiffusionAdapter(comps), _batch(comps, b=4)
    ref = AdapterReference(model, adapter.score).scores(batch)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = _dpo(adapter.score(model, batch), ref)
    before.loss.backward()
    opt.step()
    with torch.no_grad():
        after = _dpo(adapter.score(model, batch), ref)
    assert after.metrics["rewards/margins"] > before.metrics["rewards/margins"]
    assert after.loss < before.loss


@pytest.mark.parametrize("convention", ["original", "diffusers"])
def test_loss_parity_with_diffusers_formula(convention):
    """mmalign.losses.diffusion_dpo == the diffusers example's formula after β conversion.

    Re-implemented from research/diffusion.md §1.2 (the example is not installed):
    SDXL / Salesforce: ``inside = −½β·(model_diff − ref_diff)``, ``loss = −logσ(inside).mean()``;
    SD1.5 (after PR #6788): ``logits = ref_diff − model_diff``, ``loss = −logσ(β·logits).mean()``,
    hinge ``relu(1 − β·logits).mean()``; diffusers' implicit_acc counts ties as ½.
    """
    g = torch.Generator().manual_seed(0)
    mw, ml, rw, rl = (torch.rand(8, generator=g) * 0.01 + 0.1 for _ in range(4))
    rw[0], rl[0], mw[0], ml[0] = 0.1, 0.1, 0.1, 0.1  # one exact tie
    model_diff, ref_diff = mw - ml, rw - rl
    beta = 5000.0 if convention == "original" else 2500.0
    if convention == "original":
        inside = -0.5 * beta * (model_diff - ref_diff)
    else:
        inside = beta * (ref_diff - model_diff)
    expected = -F.logsigmoid(inside).mean()
    out = L.diffusion_dpo(mw, ml, rw, rl, beta=beta, beta_convention=convention)
    torch.testing.assert_close(out.loss, expected)
    hinge = L.diffusion_dpo(mw, ml, rw, rl, beta=beta, beta_convention=convention, loss_type="hinge")
    b_diffusers = L.convert_beta(beta, convention, "diffusers")
    torch.testing.assert_close(hinge.loss, F.relu(1 - b_diffusers * (ref_diff - model_diff)).mean())
    # The one table's dpo row on the diffusion family's units (logps = −c·err, c = ½ original / 1 diffusers) takes
    # the user's β as is (the whole task path, bit for bit: tests/diffusion/test_family_units.py).
    from mmalign.adapters.diffusion_family import LOGP_SCALE
    from mmalign.methods.table import METHODS
    from mmalign.types import Scores

    c = LOGP_SCALE[convention]
    ones = torch.ones(8, 2)
    p = Scores(logps=torch.stack([mw, ml], 1) * -c, lengths=ones)
    r = Scores(logps=torch.stack([rw, rl], 1) * -c, lengths=ones)
    row_out = METHODS["dpo"].fn(p, r, None, {"beta": beta})
    torch.testing.assert_close(row_out.loss, expected)
    torch.testing.assert_close(METHODS["dpo"].fn(p, r, None, {"beta": beta, "loss_type": "hinge"}).loss, hinge.loss)


def test_ragged_candidates_and_sdxl_added_cond():
    """Padding candidates of ragged lists are not forwarded (error 0); SDXL gets added_cond_kwargs and the
    fixed/from-image time_ids change its prediction."""
    comps = build_tiny_components("sdxl", seed=0)
    batch = _batch(comps, b=2, k=3)
    batch.candidate_mask = torch.tensor([[True, True, True], [True, True, False]])
    calls = []
    net = comps.denoiser
    hook = net.register_forward_pre_hook(lambda m, a, kw: calls.append(a[0].shape[0]), with_kwargs=True)
    adapter = DiffusionAdapter(comps)
    with torch.no_grad():
        s = adapter.score(net, batch)
    hook.remove()
    assert calls == [5] and s.extras["err"][1, 2] == 0 and (s.extras["err"][0] > 0).all()
    fixed = DiffusionAdapter(comps, fixed_time_ids=True, resolution=16)
    with torch.no_grad():
        s2 = fixed.score(net, batch)
    assert not torch.allclose(s.logps, s2.logps)


def test_snr_gamma_weights():
    comps = build_tiny_components("unet", seed=0)
    plain, weighted = DiffusionAdapter(comps), DiffusionAdapter(comps, snr_gamma=5.0)
    batch = _batch(comps)
    with torch.no_grad():
        a, b = plain.score(comps.denoiser, batch), weighted.score(comps.denoiser, batch)
    ac = comps.scheduler.alphas_cumprod[batch.extras["timesteps"]]
    snr = ac / (1 - ac)
    w = torch.clamp(snr, max=5.0) / snr
    torch.testing.assert_close(b.extras["err"], a.extras["err"] * w[:, None])
