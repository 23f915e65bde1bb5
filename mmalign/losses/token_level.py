"""Token-level preference losses and token weights (research/llm_losses.md §2.2, §5; frameworks.md §3).

Every function takes small per-token tensors ``[B, T]``; full-vocabulary quantities (TDPO's forward KL
per position, WPO's log Σ_v p_v²) are computed upstream by the model adapter, in chunks, and passed in.
Chosen and rejected sides may have different lengths T and T'. A ``*_mask`` marks completion tokens;
masked positions contribute exactly 0 even if they hold inf/NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import LossOutput, detach_metrics, masked_mean, masked_sum, reduce_loss, upcast

__all__ = [
    "tdpo",
    "sparse_token_dpo",
    "activation_token_mask",
    "token_weighted_nll",
    "reward_to_go",
    "prior_token_weights",
    "wpo_weights",
]

_TDPO_VARIANTS = ("tdpo1", "tdpo2")
_NLL_NORMALIZE = ("none", "per_sequence", "per_token")
_PRIOR_FORMS = ("inverse_p", "one_minus_p", "surprisal")
_PRIOR_NORMALIZE = ("batch", "none", "sequence")


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta={beta!r} must be a finite number > 0")


def _mask_for(values: Tensor, mask: Tensor | None, name: str) -> Tensor:
    if values.dim() != 2:
        raise ValueError(f"{name} must be [B, T]; got shape {tuple(values.shape)}")
    if mask is None:
        return torch.ones_like(values, dtype=torch.bool)
    if tuple(mask.shape) != tuple(values.shape):
        raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}; expected {tuple(values.shape)}")
    return mask.to(values.device).bool()


def _same(name: str, t: Tensor, ref: Tensor) -> Tensor:
    t = upcast(t)
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(ref.shape)}")
    return t


def tdpo(
    chosen_token_logratios: Tensor,
    rejected_token_logratios: Tensor,
    chosen_token_kl: Tensor,
    rejected_token_kl: Tensor,
    *,
    chosen_mask: Tensor | None,
    rejected_mask: Tensor | None,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: str = "tdpo2",
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Token-level DPO (Zeng et al. 2024, arXiv 2404.11999, Eq. for TDPO1 / TDPO2).

    Inputs per token: ``*_token_logratios`` = log π_θ(y_t|·) − log π_ref(y_t|·) and ``*_token_kl`` =
    KL(π_ref(·|s_t) ‖ π_θ(·|s_t)) over the full vocabulary (forward KL, ≥ 0). With sums over masked
    tokens r_w, r_l, D_w, D_l and u = r_w − r_l::

        tdpo1: −log σ(β·(u − (D_l − D_w)))
        tdpo2: −log σ(β·(u − α·(D_l − sg(D_w))))      (sg = stop-gradient)

    Reference code: ``Vance0124/Token-level-Direct-Preference-Optimization`` ``tdpo_loss``. Its function
    defaults to TDPO2 while its config (``config/loss/tdpo.yaml``, ``if_tdpo2: false``) runs TDPO1; we
    follow the function: ``variant="tdpo2"``. ``alpha`` only affects tdpo2. Metrics follow the reference:
    ``rewards/{chosen,rejected}`` = β·(r + D) per response (so their margin is the tdpo1 logit),
    accuracies on those rewards, ``kl/{chosen,rejected,margin}`` = D_w, D_l, D_w − D_l.
    """
    _check_beta(beta)
    if variant not in _TDPO_VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {sorted(_TDPO_VARIANTS)}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha!r} must be finite")
    lr_w, lr_l = upcast(chosen_token_logratios), upcast(rejected_token_logratios)
    m_w = _mask_for(lr_w, chosen_mask, "chosen_token_logratios")
    m_l = _mask_for(lr_l, rejected_mask, "rejected_token_logratios")
    kl_w = _same("chosen_token_kl", chosen_token_kl, lr_w)
    kl_l = _same("rejected_token_kl", rejected_token_kl, lr_l)
    if lr_w.shape[0] != lr_l.shape[0]:
        raise ValueError(f"batch sizes differ: chosen {lr_w.shape[0]} vs rejected {lr_l.shape[0]}")
    r_w, r_l = masked_sum(lr_w, m_w), masked_sum(lr_l, m_l)
    d_w, d_l = masked_sum(kl_w, m_w), masked_sum(kl_l, m_l)
    if variant == "tdpo1":
        logits = (r_w - r_l) - (d_l - d_w)
    else:
        logits = (r_w - r_l) - alpha * (d_l - d_w.detach())
    per_example = F.softplus(-beta * logits)  # = −log σ(β·logits)
    chosen_rewards, rejected_rewards = beta * (r_w + d_w).detach(), beta * (r_l + d_l).detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "kl/chosen": d_w,
        "kl/rejected": d_l,
        "kl/margin": d_w - d_l,
        f"loss/{variant}": per_example,
    }
    loss = reduce_loss(per_example, sample_weight, reduction)
    return LossOutput(loss, per_example, detach_metrics(metrics))


def _sparsity(mask_values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row percentage of valid tokens whose mask is exactly 0, and which rows have any token."""
    n = valid.sum(-1)
    zeros = (valid & (mask_values == 0)).sum(-1)
    return 100.0 * zeros.float() / n.clamp_min(1).float(), n > 0


def sparse_token_dpo(
    chosen_token_logratios: Tensor,
    rejected_token_logratios: Tensor,
    chosen_token_kl: Tensor,
    rejected_token_kl: Tensor,
    reward_mask_chosen: Tensor,
    reward_mask_rejected: Tensor,
    kl_mask_chosen: Tensor | None = None,
    kl_mask_rejected: Tensor | None = None,
    *,
    chosen_mask: Tensor | None = None,
    rejected_mask: Tensor | None = None,
    beta: float = 0.1,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """SparsePO (Christopoulou et al. 2024, arXiv 2410.05102): TDPO1 with per-token masks m ≥ 0.

    With per-token masks m^u (reward) and m^d (KL), sums over valid tokens, and KL_t ≥ 0 the forward
    KL(π_ref ‖ π_θ) at position t::

        u_m = Σ_t m^u_w,t·r_w,t − Σ_t m^u_l,t·r_l,t
        d_m = Σ_t m^d_l,t·KL_l,t − Σ_t m^d_w,t·KL_w,t
        L   = −log σ(β·(u_m − d_m)) + λ_u·(‖m^u_w‖₁ + ‖m^u_l‖₁) + λ_d·(‖m^d_w‖₁ + ‖m^d_l‖₁)

    Unit masks give TDPO1 exactly. ``kl_mask_*=None`` is the repo's "common" mask (m^d = m^u); the
    repo then halves both L1 coefficients to avoid double counting, so the common penalty here is
    (λ_u + λ_d)/2·(‖m_w‖₁ + ‖m_l‖₁). Masks may be learned (gradient flows into them through both
    terms) or detached (see :func:`activation_token_mask`).

    Reference code: ``huawei-noah/HEBO/SparsePO`` ``sparse_trainer.py``. Deviations: the repo computes
    the KL with the opposite sign (Σ_v p_ref·(log p_θ − log p_ref) = −KL_t) and subtracts chosen minus
    rejected; the algebra is identical and we take the positive KL. The repo's ``rewards/*`` add that
    signed (−KL) term; ours are β·(u + D) per response like TDPO, so ``rewards/margins`` equals the
    logit β·(u_m − d_m). ``mask/sparsity`` (in [0, 100]) is the percentage of valid tokens whose mask is
    exactly 0, averaged over sequences with at least one token (the repo divides by zero on empty rows).
    """
    _check_beta(beta)
    for name, lam in (("l1_reward", l1_reward), ("l1_kl", l1_kl)):
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"{name}={lam!r} must be a finite number >= 0")
    if (kl_mask_chosen is None) != (kl_mask_rejected is None):
        raise ValueError("give both kl_mask_chosen and kl_mask_rejected, or neither (common mask)")
    lr_w, lr_l = upcast(chosen_token_logratios), upcast(rejected_token_logratios)
    v_w = _mask_for(lr_w, chosen_mask, "chosen_token_logratios")
    v_l = _mask_for(lr_l, rejected_mask, "rejected_token_logratios")
    kl_w = _same("chosen_token_kl", chosen_token_kl, lr_w)
    kl_l = _same("rejected_token_kl", rejected_token_kl, lr_l)
    mu_w = _same("reward_mask_chosen", reward_mask_chosen, lr_w)
    mu_l = _same("reward_mask_rejected", reward_mask_rejected, lr_l)
    common = kl_mask_chosen is None
    md_w = mu_w if common else _same("kl_mask_chosen", kl_mask_chosen, lr_w)
    md_l = mu_l if common else _same("kl_mask_rejected", kl_mask_rejected, lr_l)
    for name, m, v in (
        ("reward_mask_chosen", mu_w, v_w),
        ("reward_mask_rejected", mu_l, v_l),
        ("kl_mask_chosen", md_w, v_w),
        ("kl_mask_rejected", md_l, v_l),
    ):
        if bool((v & ~(m >= 0)).any()):
            raise ValueError(f"{name} must be >= 0 (and not NaN) on valid tokens")
    # Zero the padding before any product: 0 * NaN in a backward pass would leak into the mask gradients.
    lr_w, kl_w, mu_w, md_w = (torch.where(v_w, t, 0.0) for t in (lr_w, kl_w, mu_w, md_w))
    lr_l, kl_l, mu_l, md_l = (torch.where(v_l, t, 0.0) for t in (lr_l, kl_l, mu_l, md_l))

    r_w, r_l = masked_sum(mu_w * lr_w, v_w), masked_sum(mu_l * lr_l, v_l)
    d_w, d_l = masked_sum(md_w * kl_w, v_w), masked_sum(md_l * kl_l, v_l)
    logits = (r_w - r_l) - (d_l - d_w)
    pref = F.softplus(-beta * logits)
    l1_u = masked_sum(mu_w.abs(), v_w) + masked_sum(mu_l.abs(), v_l)
    if common:
        penalty = 0.5 * (l1_reward + l1_kl) * l1_u
    else:
        penalty = l1_reward * l1_u + l1_kl * (masked_sum(md_w.abs(), v_w) + masked_sum(md_l.abs(), v_l))
    per_example = pref + penalty

    chosen_rewards, rejected_rewards = beta * (r_w + d_w).detach(), beta * (r_l + d_l).detach()
    sparsities = [_sparsity(mu_w.detach(), v_w), _sparsity(mu_l.detach(), v_l)]
    names = ["reward_chosen", "reward_rejected"]
    if not common:
        sparsities += [_sparsity(md_w.detach(), v_w), _sparsity(md_l.detach(), v_l)]
        names += ["kl_chosen", "kl_rejected"]
    metrics: dict[str, Tensor] = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "kl/chosen": masked_sum(kl_w, v_w),
        "kl/rejected": masked_sum(kl_l, v_l),
        "kl_masked/chosen": d_w,
        "kl_masked/rejected": d_l,
        "loss/sparse_po": pref,
        "loss/l1": penalty,
    }
    for name, (pct, has) in zip(names, sparsities, strict=True):
        metrics[f"mask/{name}_sparsity"] = masked_mean(pct, has, 0)
    pct_all = torch.stack([p for p, _ in sparsities])
    has_all = torch.stack([h for _, h in sparsities])
    metrics["mask/sparsity"] = masked_mean(pct_all.flatten(), has_all.flatten(), 0)
    loss = reduce_loss(per_example, sample_weight, reduction)
    return LossOutput(loss, per_example, detach_metrics(metrics))


def activation_token_mask(activations: Tensor | Sequence, mask: Tensor | None) -> Tensor:
    """Activation-based token mask ("MAPO" in the SparsePO repo; named ``token_mask_activation`` in the
    research note to avoid a clash with margin-aware MaPO), values in [0, 1], detached, ``[B, T]``.

    ``activations``: one tensor ``[B, T]`` / ``[B, T, H]`` (/ ``[B, T, heads, d]``), or a list with one
    entry per hook type (MLP, attention, residual, ...), each entry a tensor or a list of per-layer
    tensors. Each tensor is averaged over its trailing (hidden) dims, z-normalised over the valid tokens
    of each sequence and min-max rescaled to [0, 1]; layers are averaged within a hook type, then hook
    types are averaged (``huawei-noah/HEBO/SparsePO`` ``mapo_trainer.py``, ``activation_mapping=
    "zn_rescale"``). The z-normalisation is an increasing affine map per sequence, so it cancels in the
    min-max step: we compute the min-max directly. Deviations: vectorised (the repo loops over samples
    in Python and casts statistics to float16, where its 1e-12 epsilon underflows to 0); a sequence whose
    valid activations are all equal (or with one valid token) gets weight 1 on every valid token instead
    of NaN; fully masked rows give 0. As in the repo, each sequence's least-activated token gets 0.
    """
    with torch.no_grad():
        groups = [activations] if torch.is_tensor(activations) else list(activations)
        if not groups:
            raise ValueError("activations is empty; give a tensor or a non-empty list of tensors")
        per_type = []
        valid = None
        for group in groups:
            layers = [group] if torch.is_tensor(group) else list(group)
            if not layers:
                raise ValueError("an activation hook type holds an empty list")
            rescaled = []
            for a in layers:
                a = upcast(a)
                if a.dim() < 2:
                    raise ValueError(f"activations must be [B, T, ...]; got shape {tuple(a.shape)}")
                a = a.flatten(2).mean(-1) if a.dim() > 2 else a
                if valid is None:
                    valid = _mask_for(a, mask, "activations")
                elif tuple(a.shape) != tuple(valid.shape):
                    raise ValueError(f"activation shape {tuple(a.shape)} differs from {tuple(valid.shape)}")
                inf = torch.full((), float("inf"), dtype=a.dtype, device=a.device)
                lo = torch.where(valid, a, inf).amin(-1, keepdim=True)
                hi = torch.where(valid, a, -inf).amax(-1, keepdim=True)
                span = hi - lo
                ok = span > 0
                scaled = torch.where(ok, (a - lo) / torch.where(ok, span, torch.ones_like(span)), 1.0)
                rescaled.append(torch.where(valid, scaled, 0.0))
            per_type.append(torch.stack(rescaled).mean(0))
        return torch.stack(per_type).mean(0)


def token_weighted_nll(
    token_logps: Tensor,
    mask: Tensor | None,
    *,
    weights: Tensor | None = None,
    normalize: str = "per_sequence",
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """Token-weighted negative log-likelihood, −Σ_t w_t·log p_t, in three normalisations.

    - ``"per_sequence"``: w normalised to sum 1 over each sequence's valid tokens, then Σ_t w_t·NLL_t.
      This is Yang et al.'s reward-weighted MLE (arXiv 2306.00398 §3.2; reference code
      ``Shentao-YANG/Preference_Grounded_Guidance``); uniform weights give the length-normalised NLL.
      Weights must be ≥ 0; a row whose weights are all 0 contributes 0.
    - ``"per_token"``: Σ_t w_t·NLL_t of each row divided by the batch-average valid length, so the batch
      mean equals the token-level mean over all valid tokens (HF / TRL ``sft`` cross-entropy). With
      weights of mean 1 this is the PRIOR objective (see :func:`prior_token_weights`).
    - ``"none"``: Σ_t w_t·NLL_t (sum over tokens).

    ``weights`` are used as given (pass detached weights: Yang's and PRIOR's carry no gradient).
    """
    if normalize not in _NLL_NORMALIZE:
        raise ValueError(f"normalize={normalize!r} is not one of {sorted(_NLL_NORMALIZE)}")
    logps = upcast(token_logps)
    valid = _mask_for(logps, mask, "token_logps")
    nll = -logps
    if weights is None:
        w = torch.ones_like(logps)
    else:
        w = _same("weights", weights, logps)
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    w = torch.where(valid, w, zero)
    if normalize == "per_sequence":
        if bool((valid & ~(w >= 0)).any()):
            raise ValueError("weights must be >= 0 (not NaN) on valid tokens for normalize='per_sequence'")
        total = w.sum(-1, keepdim=True)
        w = w / total.clamp_min(torch.finfo(w.dtype).tiny)
    per_example = masked_sum(w * torch.where(valid, nll, zero), valid)
    if normalize == "per_token":
        avg_len = valid.sum().to(logps.dtype) / max(logps.shape[0], 1)
        per_example = per_example / avg_len.clamp_min(1)
    metrics = {
        "loss/token_weighted_nll": per_example,
        "nll/token_mean": masked_sum(nll.detach(), valid, -1).sum() / valid.sum().clamp_min(1),
    }
    loss = reduce_loss(per_example, sample_weight, reduction)
    return LossOutput(loss, per_example, detach_metrics(metrics))


def reward_to_go(token_rewards: Tensor, mask: Tensor | None) -> Tensor:
    """Reverse cumulative sum over valid tokens: q_t = Σ_{t' ≥ t, valid} r_t' (t itself included).

    For a constant reward c on n valid tokens at 0-indexed positions 0..n−1, q_t = c·(n − t). Masked
    positions get 0 and contribute 0. This is Yang et al.'s ``use_q_for_weight`` option (arXiv
    2306.00398; no discounting, no baseline). Works on ``[..., T]``.
    """
    r = upcast(token_rewards)
    if mask is None:
        valid = torch.ones_like(r, dtype=torch.bool)
    else:
        if tuple(mask.shape) != tuple(r.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal token_rewards {tuple(r.shape)}")
        valid = mask.to(r.device).bool()
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    r = torch.where(valid, r, zero)
    q = torch.flip(torch.cumsum(torch.flip(r, [-1]), -1), [-1])
    return torch.where(valid, q, zero)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x ≤ 0, accurate on both sides of −ln 2."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def prior_token_weights(
    ref_token_logps: Tensor,
    mask: Tensor | None,
    *,
    alpha: float = 1.0,
    form: str = "one_minus_p",
    normalize: str = "batch",
    clip: float | None = None,
    floor: float = 0.0,
) -> Tensor:
    """PRIOR token weights from a text-only reference LM (Chen et al. 2025, arXiv 2505.08971).

    UNVERIFIED: PRIOR's code is not released and its method section was not read; the paper only says
    a token-specific re-weighting from "importance scores" in which tokens that are hard to predict
    without the image (low reference probability p̂) weigh more. The forms below are the candidates of
    research/video_audio_clip_prior.md §3.2, all non-increasing in p̂; the paper's exact choice, α, and
    normalisation scope are unknown:

    - ``"one_minus_p"``: w = (1 − p̂)^α     - ``"inverse_p"``: w = p̂^(−α)     - ``"surprisal"``: w = (−log p̂)^α

    Then w is clamped to [``floor``, ``clip``] and, with ``normalize="batch"`` (or ``"sequence"``),
    rescaled to mean 1 over the valid tokens of the batch (of each sequence); ``"none"`` keeps raw w.
    α = 0 gives uniform weights, so ``token_weighted_nll(..., normalize="per_token")`` becomes plain NTP.
    Computed in log space (no overflow of p̂^(−α) before clipping/normalising); returned detached, 0 on
    masked tokens, and 0 where every valid weight is 0 (e.g. p̂ = 1 everywhere with ``floor=0``).
    """
    if form not in _PRIOR_FORMS:
        raise ValueError(f"form={form!r} is not one of {sorted(_PRIOR_FORMS)}")
    if normalize not in _PRIOR_NORMALIZE:
        raise ValueError(f"normalize={normalize!r} is not one of {sorted(_PRIOR_NORMALIZE)}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha={alpha!r} must be a finite number >= 0")
    if not (math.isfinite(floor) and floor >= 0):
        raise ValueError(f"floor={floor!r} must be a finite number >= 0")
    if clip is not None and not (math.isfinite(clip) and clip > 0 and clip >= floor):
        raise ValueError(f"clip={clip!r} must be None or a finite number > 0 and >= floor={floor}")
    with torch.no_grad():
        logp = upcast(ref_token_logps)
        valid = _mask_for(logp, mask, "ref_token_logps")
        logp = torch.where(valid, logp, torch.zeros((), dtype=logp.dtype, device=logp.device)).clamp_max(0.0)
        if alpha == 0:
            logw = torch.zeros_like(logp)
        elif form == "one_minus_p":
            logw = alpha * _log1mexp(logp)
        elif form == "inverse_p":
            logw = -alpha * logp
        else:
            logw = alpha * torch.log(-logp)
        if floor > 0:
            logw = logw.clamp_min(math.log(floor))
        if clip is not None:
            logw = logw.clamp_max(math.log(clip))
        neg_inf = torch.full((), float("-inf"), dtype=logw.dtype, device=logw.device)
        logw = torch.where(valid, logw, neg_inf)
        if normalize == "none":
            w = torch.exp(logw)
        else:
            dims = (0, 1) if normalize == "batch" else (1,)
            count = valid.sum(dims, keepdim=True).clamp_min(1).to(logw.dtype)
            log_mean = torch.logsumexp(logw, dim=dims, keepdim=True) - torch.log(count)
            ok = torch.isfinite(log_mean)
            w = torch.where(ok, torch.exp(logw - torch.where(ok, log_mean, 0.0)), 0.0)
        return torch.where(valid, w, torch.zeros((), dtype=w.dtype, device=w.device))


def wpo_weights(token_logps: Tensor, token_log_sum_p2: Tensor, mask: Tensor | None) -> Tensor:
    """WPO sequence weights (Zhou et al. 2024, arXiv 2406.11827 Eq. 2; TRL ``use_weighting``), no grad.

    w = exp( mean over valid t of [ log p_t − log Σ_v p_v,t² ] ), shape ``[...]`` from ``[..., T]``; the
    adapter supplies log Σ_v p_v² per token. Matches TRL 1.16 ``DPOTrainer._compute_loss`` exactly: no
    clamping, lengths clamped to ≥ 1 (an empty sequence gets w = 1). TRL multiplies each pair's loss by
    w_chosen·w_rejected and then takes the plain batch mean: reproduce it with
    ``(out.per_example * w_c * w_r).mean()``. Passing the product as ``sample_weight`` with
    ``reduction="mean"`` instead gives Σ w·l / Σ w (a weighted mean), which differs by the factor mean(w).
    """
    with torch.no_grad():
        logps = upcast(token_logps)
        lsp2 = upcast(token_log_sum_p2)
        if tuple(lsp2.shape) != tuple(logps.shape):
            raise ValueError(f"token_log_sum_p2 shape {tuple(lsp2.shape)} must equal {tuple(logps.shape)}")
        if mask is None:
            valid = torch.ones_like(logps, dtype=torch.bool)
        else:
            if tuple(mask.shape) != tuple(logps.shape):
                raise ValueError(f"mask shape {tuple(mask.shape)} must equal {tuple(logps.shape)}")
            valid = mask.to(logps.device).bool()
        mean = masked_sum(logps - lsp2, valid, -1) / valid.sum(-1).clamp_min(1).to(logps.dtype)
        return torch.exp(mean)
