"""Text recipes: which data format, reference and loss each method uses, as one explicit table.

Each entry maps the adapter's :class:`~mmalign.types.Scores` (candidates ``[B, K]``: pairs are
``[chosen, rejected]``) to a call of a pure loss in :mod:`mmalign.losses`. Adding a text method = adding a
row here; the loop and the adapter do not change.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .. import losses as L
from ..config import ConfigError
from ..losses import LossOutput
from ..types import Scores


@dataclass(frozen=True)
class TextMethod:
    name: str
    data_format: str  # pairs | unpaired | ranked | sft
    needs_reference: bool
    fn: Callable[..., LossOutput]
    value_head: bool = False
    mismatched_kl: bool = False  # KTO: score prompt i with completion i+1 too (reference point z0)
    citation: str = ""
    loss_fn: Callable[..., LossOutput] | None = None  # the pure loss whose keyword options loss.kwargs sets
    token_kl: bool = False  # needs per-token KL(pi_ref || pi) from the task (TDPO, SparsePO): extras["token_kl"]
    token_masks: str = ""  # SparsePO mask source: "learned" (mask heads) | "activation"; extras["reward_mask"]


def _chosen_nll(p: Scores) -> torch.Tensor:
    """Per-example token-mean NLL of candidate 0 (the chosen / target completion)."""
    return L.nll(p.token_logps[:, 0], p.token_mask[:, 0]).per_example


def _pair(p: Scores):
    return p.logps[:, 0], p.logps[:, 1], p.lengths[:, 0].float(), p.lengths[:, 1].float()


def _dpo(p: Scores, r: Scores, batch, kw: dict) -> LossOutput:
    lw, ll, nw, nl = _pair(p)
    return L.dpo(lw, ll, r.logps[:, 0], r.logps[:, 1], chosen_lengths=nw, rejected_lengths=nl, **kw)


def _simpo(p: Scores, r, batch, kw: dict) -> LossOutput:
    lw, ll, nw, nl = _pair(p)
    return L.simpo(lw, ll, chosen_lengths=nw, rejected_lengths=nl, **kw)


def _alphapo(p: Scores, r, batch, kw: dict) -> LossOutput:
    lw, ll, nw, nl = _pair(p)
    return L.alphapo(lw, ll, chosen_lengths=nw, rejected_lengths=nl, **kw)


def _cpo(p: Scores, r, batch, kw: dict) -> LossOutput:
    lw, ll, nw, nl = _pair(p)
    return L.cpo(lw, ll, chosen_lengths=nw, rejected_lengths=nl, nll_loss=_chosen_nll(p), **kw)


def _orpo(p: Scores, r, batch, kw: dict) -> LossOutput:
    lw, ll, nw, nl = _pair(p)
    return L.orpo(lw, ll, chosen_lengths=nw, rejected_lengths=nl, nll_loss=_chosen_nll(p), **kw)


def _slic(p: Scores, r, batch, kw: dict) -> LossOutput:
    lw, ll, _, _ = _pair(p)
    return L.slic(lw, ll, nll_loss=_chosen_nll(p), **kw)


def _kto_z0(p: Scores, r: Scores) -> torch.Tensor:
    # TRL estimates z0 on mismatched (prompt i, completion i+1) pairs; without them (precomputed reference)
    # the batch's own log-ratios stand in, detached and clamped the same way.
    if "kl_logps" in p.extras and "kl_logps" in r.extras:
        return L.kto_reference_point(p.extras["kl_logps"], r.extras["kl_logps"])
    return L.kto_reference_point(p.logps[:, 0], r.logps[:, 0])


def _kto(p: Scores, r: Scores, batch, kw: dict) -> LossOutput:
    labels = batch.labels[:, 0] > 0.5
    return L.kto(p.logps[:, 0], r.logps[:, 0], labels, kl_ref_point=_kto_z0(p, r), **kw)


def _bco(p: Scores, r: Scores, batch, kw: dict) -> LossOutput:
    return L.bco(p.logps[:, 0], r.logps[:, 0], batch.labels[:, 0] > 0.5, **kw)


def _npo(p: Scores, r: Scores, batch, kw: dict) -> LossOutput:
    return L.npo(p.logps[:, 0], r.logps[:, 0], **kw)


def _simnpo(p: Scores, r, batch, kw: dict) -> LossOutput:
    return L.simnpo(p.logps[:, 0], p.lengths[:, 0].float(), **kw)


def _gradient_ascent(p: Scores, r, batch, kw: dict) -> LossOutput:
    return L.gradient_ascent(p.logps[:, 0], lengths=p.lengths[:, 0].float(), **kw)


def _token_terms(p: Scores, r: Scores, name: str, *keys: str):
    """Per-token log-ratios, KL and masks of chosen (0) and rejected (1), from what TextTask put in extras."""
    missing = [k for k in keys if k not in p.extras]
    if missing or r is None or r.token_logps is None:
        raise ValueError(f"loss {name!r} needs per-token reference log-probs and extras {list(keys)} (missing "
                         f"{missing}); TextTask computes them, so score with TextTask.score and TextTask.loss")
    lr = p.token_logps - r.token_logps
    return lr, p.token_mask


def _tdpo(p: Scores, r: Scores, batch, kw: dict) -> LossOutput:
    """TDPO1/TDPO2 (arXiv 2404.11999; ``loss.kwargs.variant``) on the adapter's per-token KL(pi_ref || pi)."""
    lr, m = _token_terms(p, r, "tdpo", "token_kl")
    kl = p.extras["token_kl"]
    return L.tdpo(lr[:, 0], lr[:, 1], kl[:, 0], kl[:, 1], chosen_mask=m[:, 0], rejected_mask=m[:, 1], **kw)


def _sparsepo(p: Scores, r: Scores, batch, kw: dict) -> LossOutput:
    """SparsePO (arXiv 2410.05102): TDPO1 with token masks (learned heads or reference activations).

    Activation masks (``sparsepo_activation``; the repo's ``pref_optim="mapo"``) are built by TextTask from the
    reference's decoder-layer outputs (the residual stream, HF ``hidden_states[1:]``) only; the repo also hooks
    the MLP and attention outputs (``activation_hook="all"``) and averages the three hook types."""
    lr, m = _token_terms(p, r, "sparsepo", "token_kl", "reward_mask")
    kl, mu, md = p.extras["token_kl"], p.extras["reward_mask"], p.extras.get("kl_mask")
    return L.sparse_token_dpo(lr[:, 0], lr[:, 1], kl[:, 0], kl[:, 1], mu[:, 0], mu[:, 1],
                              None if md is None else md[:, 0], None if md is None else md[:, 1],
                              chosen_mask=m[:, 0], rejected_mask=m[:, 1], **kw)


def ranking_order(labels: torch.Tensor, candidate_mask: torch.Tensor | None) -> torch.Tensor:
    """Rank positions per candidate (0 = best, NaN/masked = unranked) → candidate indices best-first, −1 pad."""
    ranks = labels.clone().float()
    valid = ~torch.isnan(ranks)
    if candidate_mask is not None:
        valid &= candidate_mask.bool()
    ranks = torch.where(valid, ranks, torch.full_like(ranks, float("inf")))
    order = torch.argsort(ranks, dim=1, stable=True)
    n_valid = valid.sum(1, keepdim=True)
    pos = torch.arange(order.shape[1], device=order.device).unsqueeze(0)
    return torch.where(pos < n_valid, order, torch.full_like(order, -1))


def _plackett_luce(p: Scores, r: Scores, batch, kw: dict) -> LossOutput:
    kw = dict(kw)
    beta = kw.pop("beta", 0.1)
    order = ranking_order(batch.labels, batch.candidate_mask)
    return L.plackett_luce(p.logps - r.logps, order, candidate_mask=batch.candidate_mask, beta=beta, **kw)


def _reward_model(p: Scores, r, batch, kw: dict) -> LossOutput:
    margin = batch.extras.get("margin")
    if margin is not None:
        margin = torch.nan_to_num(margin, nan=0.0)  # rows without a margin column
    return L.bradley_terry(p.values[:, 0], p.values[:, 1], margin=margin, **kw)


def _sft(p: Scores, r, batch, kw: dict) -> LossOutput:
    return L.nll(p.token_logps[:, 0], p.token_mask[:, 0], **kw)


TEXT_METHODS: dict[str, TextMethod] = {
    m.name: m
    for m in [
        TextMethod("dpo", "pairs", True, _dpo, citation="arXiv 2305.18290 (+ TRL loss_type variants)", loss_fn=L.dpo),
        TextMethod("simpo", "pairs", False, _simpo, citation="arXiv 2405.14734", loss_fn=L.simpo),
        TextMethod("alphapo", "pairs", False, _alphapo, citation="arXiv 2501.03884", loss_fn=L.alphapo),
        TextMethod("cpo", "pairs", False, _cpo, citation="arXiv 2401.08417", loss_fn=L.cpo),
        TextMethod("orpo", "pairs", False, _orpo, citation="arXiv 2403.07691", loss_fn=L.orpo),
        TextMethod("slic", "pairs", False, _slic, citation="arXiv 2305.10425", loss_fn=L.slic),
        TextMethod("kto", "unpaired", True, _kto, mismatched_kl=True, citation="arXiv 2402.01306", loss_fn=L.kto),
        TextMethod("bco", "unpaired", True, _bco, citation="arXiv 2404.04656", loss_fn=L.bco),
        TextMethod("npo", "sft", True, _npo, citation="arXiv 2404.05868", loss_fn=L.npo),
        TextMethod("simnpo", "sft", False, _simnpo, citation="arXiv 2410.07163", loss_fn=L.simnpo),
        TextMethod("gradient_ascent", "sft", False, _gradient_ascent, loss_fn=L.gradient_ascent),
        TextMethod("plackett_luce", "ranked", True, _plackett_luce, citation="arXiv 2305.18290 App. A.3",
                   loss_fn=L.plackett_luce),
        TextMethod("rm", "pairs", False, _reward_model, value_head=True, citation="Bradley-Terry, TRL RewardTrainer",
                   loss_fn=L.bradley_terry),
        TextMethod("sft", "sft", False, _sft, loss_fn=L.nll),
        TextMethod("tdpo", "pairs", True, _tdpo, token_kl=True, citation="arXiv 2404.11999", loss_fn=L.tdpo),
        TextMethod("sparsepo", "pairs", True, _sparsepo, token_kl=True, token_masks="learned",
                   citation="arXiv 2410.05102 (learned masks)", loss_fn=L.sparse_token_dpo),
        TextMethod("sparsepo_activation", "pairs", True, _sparsepo, token_kl=True, token_masks="activation",
                   citation="arXiv 2410.05102 (activation masks, 'MAPO' in the repo)", loss_fn=L.sparse_token_dpo),
    ]
}

UNLEARNING = {"npo", "simnpo", "gradient_ascent"}

# Keyword arguments the recipes fill from the batch (tensors); everything else keyword-only is a user option.
_FROM_BATCH = {"chosen_lengths", "rejected_lengths", "nll_loss", "kl_ref_point", "lengths", "margin",
               "candidate_mask", "sample_weight", "soft_target", "pair_weights", "udm_weight", "chosen_mask",
               "rejected_mask"}


def get_text_method(name: str) -> TextMethod:
    try:
        return TEXT_METHODS[name]
    except KeyError:
        raise ConfigError(f"loss.name={name!r} is not a text method; valid: {sorted(TEXT_METHODS)}") from None


def loss_options(method: TextMethod) -> dict[str, inspect.Parameter]:
    """The keyword options of the method's loss that ``loss.kwargs`` may set (name -> parameter)."""
    if method.loss_fn is None:
        return {}
    params = inspect.signature(method.loss_fn).parameters.values()
    return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _FROM_BATCH}


def check_loss_kwargs(method: TextMethod, kwargs: Mapping, where: str = "loss.kwargs") -> list[str]:
    """Unknown and missing required loss options, checked before the model is trained: without this a typo
    (``betta``) or a required option left out (AlphaPO's ``alpha``) surfaced as a TypeError at step 1."""
    if method.loss_fn is None:
        return []
    options = loss_options(method)
    errors = [f"{where}.{k}: not an option of loss {method.name!r}; valid: {sorted(options)}"
              for k in kwargs if k not in options]
    errors += [f"{where}.{name}: loss {method.name!r} needs a value (no default); set {where}.{name}=..."
               for name, p in options.items() if p.default is inspect.Parameter.empty and name not in kwargs]
    return errors


def text_loss(method: TextMethod, policy: Scores, ref: Scores | None, batch, kwargs: dict, *,
              sft_weight: float = 0.0, retain: Scores | None = None, retain_weight: float = 1.0) -> LossOutput:
    """The method's loss, plus the optional SFT term (RPO/MPO) and, for unlearning, the retain-set NLL."""
    out = method.fn(policy, ref, batch, kwargs)
    if method.name in UNLEARNING and retain is not None:
        retain_nll = L.nll(retain.token_logps[:, 0], retain.token_mask[:, 0]).loss
        return L.unlearning_objective(out, retain_nll=retain_nll, retain_weight=retain_weight)
    if sft_weight:
        sft = L.nll(policy.token_logps[:, 0], policy.token_mask[:, 0])
        return L.combine([(method.name, 1.0, out), ("sft", sft_weight, sft)])
    return out


# -- token-level methods: options and SparsePO's learned mask producer --------------------------------------------
@dataclass
class TokenOptions:
    """``options:`` of the token-level recipes (tdpo, sparsepo, sparsepo_activation).

    Attributes:
        kl_chunk_size: most completion positions whose two ``[rows, V]`` logit blocks (policy, reference) exist at
            once while the per-token KL is formed.
        mask_dropout: dropout of SparsePO's mask heads (repo: 0.1).
        mask_max: upper clamp of the learned mask (None: the repo's unbounded ReLU output).
        mask_init: initial mask value (the heads start as TDPO1 scaled by it; see :class:`SparseMaskHeads`).
        independent_masks: learn separate reward and KL masks (repo ``rw_kl_independent=True``, "indp").
    """

    kl_chunk_size: int = 1024
    mask_dropout: float = 0.1
    mask_max: float | None = 1.0
    mask_init: float = 0.5
    independent_masks: bool = False


class SparseMaskHeads(torch.nn.Module):
    """SparsePO's learned token mask (``mask_model="simple_all"``, ``huawei-noah/HEBO/SparsePO``
    ``src/masks/mask_models.py``): a shared LayerNorm over each reference layer's hidden state, one
    ``Linear(H, 1)`` + ReLU + dropout per layer, a bias-free ``Linear(L, 1)`` mixer, ReLU, dropout.

    Input ``[..., L, H]`` (reference activations, no gradient), output ``[..., n_masks]`` >= 0.
    Deviations: the output is clamped to ``max_value`` (default 1, so masks lie in [0, 1]; the repo leaves
    them unbounded); the heads start at ``init`` for every token (per-layer weights N(0, 0.02), bias ``init``,
    mixer 1/L) instead of PyTorch's default init, whose random signs often start the ReLUs dead or the masks
    far from TDPO1; ``n_masks=2`` holds the reward and KL masks ("indp") in one module; LayerNorm eps 1e-5.
    """

    def __init__(self, hidden_size: int, num_layers: int, *, n_masks: int = 1, dropout: float = 0.1,
                 max_value: float | None = 1.0, init: float = 0.5):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden_size)
        self.heads = torch.nn.Linear(hidden_size, num_layers * n_masks)  # all per-layer heads as one matmul
        self.mixer = torch.nn.Parameter(torch.full((n_masks, num_layers), 1.0 / num_layers))
        self.drop = torch.nn.Dropout(dropout)
        self.num_layers, self.n_masks, self.max_value = num_layers, n_masks, max_value
        with torch.no_grad():
            self.heads.weight.normal_(0.0, 0.02)
            self.heads.bias.fill_(init)

    def forward(self, layer_states: torch.Tensor) -> torch.Tensor:
        if layer_states.shape[-2] != self.num_layers:
            raise ValueError(f"SparseMaskHeads: got {layer_states.shape[-2]} layers, built for {self.num_layers}")
        h = self.norm(layer_states.to(self.heads.weight.dtype))  # [..., L, H]
        w = self.heads.weight.view(self.n_masks, self.num_layers, -1)  # head (m, l) reads layer l
        b = self.heads.bias.view(self.n_masks, self.num_layers)
        per_layer = self.drop(torch.relu(torch.einsum("...lh,mlh->...ml", h, w) + b))
        out = self.drop(torch.relu((per_layer * self.mixer).sum(-1)))  # [..., n_masks]
        return out if self.max_value is None else out.clamp(max=self.max_value)
