"""The one ``METHODS`` table: loss name → how a preference loss reads any family's :class:`~mmalign.types.Scores`.

Every row maps Scores (candidates ``[B, K]``: pairs are ``[chosen, rejected]``, K=1 for unpaired / SFT rows, K>2
for ranked lists) to a call of a pure loss in :mod:`mmalign.losses`. The families score into the losses' own units
(:mod:`mmalign.adapters.family`), so the same row serves a causal LM (summed completion log-probs) and a diffusion
model (``logps = −c·err``, c set by the β convention): DPO with any ``loss_type``, IPO, KTO, Plackett–Luce, NPO,
SFT … run on both with no per-modality glue. Adding a method = adding a row here; a row a family cannot feed
(``needs`` ⊄ the family's ``provides``) is refused when the config is loaded, with the reason.

A row (:class:`Method`):

==================  ==========================================================================================
``fn``              ``fn(policy, reference, batch, kwargs) -> LossOutput`` (``aux=`` too when ``aux="scores"``)
``formats``         accepted data formats; the first is what ``data.format: auto`` reads for text rows
``needs_reference`` the loop runs (or caches) a reference pass
``needs``           what it reads from Scores: keys of :data:`mmalign.adapters.family.NEEDS`
``loss_fn``         the pure loss whose keyword-only options ``loss.kwargs`` may set (checked at config load);
                    ``None`` only with ``why`` saying where the options come from
``defaults``        ``loss.kwargs`` defaults of the row (under the user's, above the family's)
``unlearning``      the stage's retain set adds its NLL (:func:`mmalign.losses.unlearning_objective`)
``aux``             ``""`` none, ``"retain"`` (unlearning), ``"scores"`` (passed to ``fn`` as ``aux=``)
``winners_only``    pairs data is cut to the preferred candidate (SFT on winners)
``reverses_preferences``  the row trains on the reversed preference (Diffusion-NPO)
``mismatched_kl``   KTO: families that can also score (prompt i, completion i+1) give z0 that way
``token_masks``     SparsePO's mask source: ``learned`` (mask heads) or ``activation``
``recipe``          ``"module:Class"`` of the task that runs the row, for rows with per-step work (online
                    generation, self-made negatives, a second model, a teacher rollout): a
                    :class:`~mmalign.methods.preference.PreferenceTask` subclass with hooks, which
                    :func:`mmalign.api.build_task` builds instead of the family's task; ``fn`` is then ``None`` or
                    what the recipe's ``loss`` calls
``family``          recipe rows: the one family their task builds; any other family refuses the row
``data_free``       the recipe makes its own inputs: the run needs no ``data.train`` (Self-NPO)
==================  ==========================================================================================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .. import losses as L
from ..adapters.family import NEEDS
from ..config import ConfigError
from ..losses import LossOutput
from ..types import Scores
from . import av_losses as AV
from . import clip_losses as CL
from .loss_kwargs import check_option_values, default_options

__all__ = ["ALIASES", "METHODS", "Method", "check_loss_kwargs", "find_method", "get_method", "loss_options",
           "prior_nll", "ranking_order", "refusal", "sft_loss", "valid_names"]


@dataclass(frozen=True)
class Method:
    """One row of :data:`METHODS` (fields: see the module docstring). ``formats`` may be given as one string."""

    name: str
    formats: tuple[str, ...]
    needs_reference: bool
    fn: Callable[..., LossOutput] | None
    needs: frozenset[str] = frozenset({"logps"})
    loss_fn: Callable[..., LossOutput] | None = None
    citation: str = ""
    defaults: dict = field(default_factory=dict, hash=False)
    unlearning: bool = False
    aux: str = ""
    winners_only: bool = False
    reverses_preferences: bool = False
    mismatched_kl: bool = False
    token_masks: str = ""
    why: str = ""  # a row without loss_fn: where its options are checked instead
    recipe: str = ""
    family: str = ""
    data_free: bool = False

    def __post_init__(self):
        if isinstance(self.formats, str):
            object.__setattr__(self, "formats", (self.formats,))
        object.__setattr__(self, "needs", frozenset(self.needs))
        if self.unlearning and not self.aux:
            object.__setattr__(self, "aux", "retain")
        if bool(self.recipe) != bool(self.family):
            raise ValueError(f"row {self.name!r}: recipe and family go together")

    @property
    def data_format(self) -> str:
        """The format ``data.format: auto`` reads for this row (text rows)."""
        return self.formats[0]

    @property
    def value_head(self) -> bool:
        return "values" in self.needs

    @property
    def token_kl(self) -> bool:
        return "token_kl" in self.needs

    def options(self) -> dict[str, inspect.Parameter]:
        return loss_options(self)


# -- SFT term: the one place that knows how a candidate's training loss is read ---------------------------------
def sft_loss(p: Scores, k: int = 0, **kwargs) -> LossOutput:
    """The SFT loss of candidate ``k``: :func:`mmalign.losses.nll` over its tokens where Scores has per-token
    log-probs (autoregressive families; token-mean NLL per sequence), else the mean of the family's per-candidate
    training loss ``extras["nll"]`` (diffusion: the denoising MSE, :func:`mmalign.losses.diffusion_sft`)."""
    if p.token_logps is not None:
        return L.nll(p.token_logps[:, k], p.token_mask[:, k], **kwargs)
    if "nll" not in p.extras:
        raise ValueError("an SFT term needs per-token log-probs or a per-candidate training loss (Scores.extras"
                         "['nll']) from the family's score")
    return L.diffusion_sft(p.extras["nll"][:, k], **kwargs)


def _chosen_nll(p: Scores) -> torch.Tensor:
    """Per-example SFT loss of candidate 0 (the chosen / target completion)."""
    return sft_loss(p).per_example


def _pair(p: Scores):
    return p.logps[:, 0], p.logps[:, 1], p.lengths[:, 0].float(), p.lengths[:, 1].float()


# -- rows -----------------------------------------------------------------------------------------------------------
def _dpo(p: Scores, r: Scores, batch, kw: dict) -> LossOutput:
    lw, ll, nw, nl = _pair(p)
    return L.dpo(lw, ll, r.logps[:, 0], r.logps[:, 1], chosen_lengths=nw, rejected_lengths=nl, **kw)


def _dpo_reversed(p: Scores, r: Scores, batch, kw: dict) -> LossOutput:
    """Diffusion-NPO (arXiv 2505.11245): DPO with the pair reversed, so the model learns the *rejected* side
    (the negative model of NPO-guided CFG); every metric refers to that reversed objective."""
    lw, ll, nw, nl = _pair(p)
    return L.dpo(ll, lw, r.logps[:, 1], r.logps[:, 0], chosen_lengths=nl, rejected_lengths=nw, **kw)


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
    return L.slic(p.logps[:, 0], p.logps[:, 1], nll_loss=_chosen_nll(p), **kw)


def _kto_z0(p: Scores, r: Scores) -> torch.Tensor:
    # TRL estimates z0 on mismatched (prompt i, completion i+1) pairs; without them (precomputed reference, or a
    # family that cannot score mismatched pairs) the batch's own log-ratios stand in, detached and clamped alike.
    if "kl_logps" in p.extras and "kl_logps" in r.extras:
        return L.kto_reference_point(p.extras["kl_logps"], r.extras["kl_logps"])
    return L.kto_reference_point(p.logps[:, 0], r.logps[:, 0])


def _kto(p: Scores, r: Scores, batch, kw: dict) -> LossOutput:
    """KTO (arXiv 2402.01306); on diffusion scores Diffusion-KTO (arXiv 2404.04465) with z0 from the batch (the
    Diffusion-KTO code's exact reference point was not read, unverified)."""
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
    """Per-token log-ratios and mask of chosen (0) and rejected (1), checking the extras the family added."""
    missing = [k for k in keys if k not in p.extras]
    if missing or r is None or r.token_logps is None:
        raise ValueError(f"loss {name!r} needs per-token reference log-probs and extras {list(keys)} (missing "
                         f"{missing}); the causal-LM family computes them in score + finish_scores")
    return p.token_logps - r.token_logps, p.token_mask


def _tdpo(p: Scores, r: Scores, batch, kw: dict) -> LossOutput:
    """TDPO1/TDPO2 (arXiv 2404.11999; ``loss.kwargs.variant``) on the family's per-token KL(pi_ref || pi)."""
    lr, m = _token_terms(p, r, "tdpo", "token_kl")
    kl = p.extras["token_kl"]
    return L.tdpo(lr[:, 0], lr[:, 1], kl[:, 0], kl[:, 1], chosen_mask=m[:, 0], rejected_mask=m[:, 1], **kw)


def _sparsepo(p: Scores, r: Scores, batch, kw: dict) -> LossOutput:
    """SparsePO (arXiv 2410.05102): TDPO1 with token masks (learned heads or reference activations).

    Activation masks (``sparsepo_activation``; the repo's ``pref_optim="mapo"``) are built by the causal-LM family
    from the reference's decoder-layer outputs (the residual stream, HF ``hidden_states[1:]``) only; the repo also
    hooks the MLP and attention outputs (``activation_hook="all"``) and averages the three hook types."""
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
    """Plackett–Luce over the K candidates of a ranked list (DPO paper App. A.3) on the log-ratios; K = 2 is
    sigmoid DPO (on diffusion scores: Diffusion-DPO)."""
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
    return sft_loss(p, **kw)


def prior_nll(p: Scores, r, batch, kw: dict) -> LossOutput:
    """PRIOR's weighted next-token loss over the caption (candidate 0): the batch's per-token weights
    ``extras["prior_weights"]`` (data: no gradient; absent → plain NTP) rescaled to mean 1 over the micro-batch's
    valid tokens when ``kw["normalize"]`` (``prior.normalize``, set by the PRIOR task) is ``"batch"``."""
    logps, mask = p.token_logps[:, 0], p.token_mask[:, 0]
    w, extra = batch.extras.get("prior_weights"), {}
    if w is not None:
        w, valid = w[:, 0].to(logps.device, torch.float32).detach(), mask.bool()
        raw = w[valid]
        if kw.get("normalize", "batch") == "batch" and raw.numel():
            mean = raw.mean()
            w = w / mean if mean > 0 else torch.zeros_like(w)
        extra = {"prior/raw_weight_mean": raw.mean() if raw.numel() else w.new_zeros(()),
                 "prior/weight_max": w[valid].max() if raw.numel() else w.new_zeros(())}
    out = L.token_weighted_nll(logps, mask, weights=w, normalize="per_token")
    out.metrics.update({k: v.detach() for k, v in extra.items()})
    return out


_SEQ = frozenset({"logps", "lengths"})
_TOKEN = frozenset({"token_logps", "token_kl"})
_PAIRS_OR_SFT = ("sft", "pairs")
_ONLINE = "mmalign.methods.online:OnlineDPOTask"

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("dpo", "pairs", True, _dpo, _SEQ, L.dpo,
               "arXiv 2305.18290 (+ TRL loss_type variants); Diffusion-DPO arXiv 2311.12908 Eq. 14"),
        Method("npo_diffusion", "pairs", True, _dpo_reversed, _SEQ, L.dpo, "Diffusion-NPO, arXiv 2505.11245",
               reverses_preferences=True),
        Method("simpo", "pairs", False, _simpo, _SEQ, L.simpo, "arXiv 2405.14734"),
        Method("alphapo", "pairs", False, _alphapo, _SEQ, L.alphapo, "arXiv 2501.03884"),
        Method("cpo", "pairs", False, _cpo, _SEQ | {"nll"}, L.cpo, "arXiv 2401.08417"),
        Method("orpo", "pairs", False, _orpo, _SEQ | {"nll"}, L.orpo, "arXiv 2403.07691"),
        Method("slic", "pairs", False, _slic, {"logps", "nll"}, L.slic, "arXiv 2305.10425"),
        Method("kto", "unpaired", True, _kto, {"logps"}, L.kto, "arXiv 2402.01306; Diffusion-KTO arXiv 2404.04465",
               mismatched_kl=True),
        Method("bco", "unpaired", True, _bco, {"logps"}, L.bco, "arXiv 2404.04656"),
        Method("npo", "sft", True, _npo, {"logps"}, L.npo, "arXiv 2404.05868", unlearning=True),
        Method("simnpo", "sft", False, _simnpo, _SEQ, L.simnpo, "arXiv 2410.07163", unlearning=True),
        Method("gradient_ascent", "sft", False, _gradient_ascent, _SEQ, L.gradient_ascent, unlearning=True),
        Method("plackett_luce", ("ranked", "pairs"), True, _plackett_luce, {"logps"}, L.plackett_luce,
               "arXiv 2305.18290 App. A.3"),
        Method("rm", "pairs", False, _reward_model, {"values"}, L.bradley_terry, "Bradley-Terry, TRL RewardTrainer"),
        Method("sft", _PAIRS_OR_SFT, False, _sft, {"nll"}, L.nll,
               "SFT; on diffusion the SFT-on-winners baseline of arXiv 2311.12908 §5", winners_only=True),
        Method("tdpo", "pairs", True, _tdpo, _TOKEN, L.tdpo, "arXiv 2404.11999"),
        Method("sparsepo", "pairs", True, _sparsepo, _TOKEN, L.sparse_token_dpo, "arXiv 2410.05102 (learned masks)",
               token_masks="learned"),
        Method("sparsepo_activation", "pairs", True, _sparsepo, _TOKEN, L.sparse_token_dpo,
               "arXiv 2410.05102 (activation masks, 'MAPO' in the repo)", token_masks="activation"),
        # Recipes: rows with per-step work, run by their own task (the generic task + hooks; see `recipe`).
        Method("online_dpo", "prompts", True, None, _SEQ, L.dpo, "arXiv 2402.04792 (TRL OnlineDPOTrainer)",
               recipe=_ONLINE, family="causal_lm"),
        Method("xpo", "prompts", True, None, _SEQ, L.dpo, "arXiv 2405.21046 (TRL XPOTrainer)",
               defaults={"alpha": 1e-5}, recipe=_ONLINE, family="causal_lm"),
        Method("seq_contrastive", "sft", True, _plackett_luce, {"logps"}, L.plackett_luce, "arXiv 2502.16433",
               recipe="mmalign.methods.seq_contrastive:SeqContrastiveTask", family="causal_lm"),
        Method("token_guidance", _PAIRS_OR_SFT, False, None, {"token_logps"}, None, "arXiv 2306.00398",
               why="options.* (TokenGuidanceOptions, checked by the task)",
               recipe="mmalign.methods.token_guidance:TokenGuidanceTask", family="causal_lm"),
        Method("avp_rpo", "videos", True, None, {"logps"}, L.dpo, "AVP-RPO, MultiSoundGen-style (arXiv 2509.19999, "
               "no code)", recipe="mmalign.methods.avp_rpo:AVPRPOTask", family="v2a"),
        Method("self_npo", "sft", False, None, {"logps"}, None, "Self-NPO, arXiv 2505.11777",
               why="loss.kwargs are Self-NPO's options (SelfNPOOptions, checked by the task)",
               recipe="mmalign.methods.self_npo:SelfNPOTask", family="diffusion", data_free=True),
        Method("prior", "captions", False, prior_nll, {"token_logps"}, None, "PRIOR, arXiv 2505.08971",
               why="prior.* (PriorConfig); loss.kwargs must be empty", recipe="mmalign.methods.prior:PriorTask",
               family="lvlm"),
        # Contrastive rows (dual-encoder family): image–caption pairs, in-batch negatives; options = defaults.
        Method("clip", "pairs", False, CL.clip_row, {"embeddings"}, None, "arXiv 2103.00020 (open_clip ClipLoss)",
               why=CL.OPTIONS),
        Method("siglip", "pairs", False, CL.siglip_row, {"embeddings"}, None, "arXiv 2303.15343 (open_clip SigLipLoss)",
               why=CL.OPTIONS),
        Method("clip_refine", "pairs", False, CL.clip_refine_row, {"embeddings"}, None, "CLIP-Refine, arXiv 2504.12717",
               defaults=CL.CLIP_REFINE_DEFAULTS, why=CL.OPTIONS),
        Method("zscl", "pairs", False, CL.zscl_row, {"embeddings"}, None, "ZSCL, arXiv 2303.06628", aux="scores",
               defaults=CL.ZSCL_DEFAULTS, why=CL.OPTIONS),
        Method("cavp", "pairs", False, AV.cavp_row, {"embeddings"}, None, "SF-CAVP-style (MultiSoundGen arXiv "
               "2509.19999, no code) on CAVP (Diff-Foley arXiv 2306.17203)", defaults=AV.CAVP_DEFAULTS, why=AV.OPTIONS,
               recipe="mmalign.methods.av:AVTask", family="av_contrastive"),
    ]
}
# Other names of rows (the diffusion recipe's historical names).
ALIASES = {"diffusion_dpo": "dpo", "diffusion_npo": "npo_diffusion", "diffusion_sft": "sft", "diffusion_kto": "kto",
           "listwise": "plackett_luce"}

# Keyword arguments the rows fill from the batch (tensors); everything else keyword-only is a user option.
_FROM_BATCH = {"chosen_lengths", "rejected_lengths", "nll_loss", "kl_ref_point", "lengths", "margin",
               "candidate_mask", "sample_weight", "soft_target", "pair_weights", "udm_weight", "chosen_mask",
               "rejected_mask"}
# Loss options that only mean something over per-token log-probs.
TOKEN_OPTIONS = {"reduction_over_tokens", "token_level_mean"}


def refusal(method: Method, family) -> str | None:
    """Why ``family`` (a ModelFamily class) cannot run ``method`` (None: it can): a recipe row runs only on the
    family its task builds; any row whose ``needs`` the family does not provide is refused by the family."""
    if method.family and method.family != family.name:
        return (f"loss {method.name!r} cannot run on the {family.name} family: it is a recipe of the "
                f"{method.family} family ({method.recipe} builds that family's model)")
    return family.refusal(method)


def valid_names(family) -> list[str]:
    """Sorted names (and aliases) of the rows ``family`` can run (recipe rows included)."""
    ok = {n for n, m in METHODS.items() if refusal(m, family) is None}
    return sorted(ok | {a for a, n in ALIASES.items() if n in ok})


def find_method(name: str) -> Method | None:
    """The row named ``name`` (or an alias), or None; no family check."""
    return METHODS.get(ALIASES.get(name, name))


def get_method(name: str, family=None, where: str = "loss") -> Method:
    """The row named ``name`` (or an alias), checked against ``family`` (a ModelFamily class) when given:
    unknown names list the sorted valid ones, rows the family cannot run say why. Raises
    :class:`~mmalign.config.ConfigError` with one message prefixed by ``where``."""
    method = find_method(name)
    if method is None:
        kind = f"{family.modality} " if family is not None else ""
        valid = valid_names(family) if family is not None else sorted([*METHODS, *ALIASES])
        raise ConfigError(f"{where}.name={name!r} is not a {kind}method; valid: {valid}")
    if family is not None:
        why = refusal(method, family)
        if why is not None:
            raise ConfigError(f"{where}.name={name!r}: {why}")
    return method


def loss_options(method: Method) -> dict[str, inspect.Parameter]:
    """The keyword options of the row's loss that ``loss.kwargs`` may set (name -> parameter)."""
    if method.loss_fn is None:
        return {}
    params = inspect.signature(method.loss_fn).parameters.values()
    return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _FROM_BATCH}


def check_loss_kwargs(method: Method, kwargs: Mapping, where: str = "loss.kwargs", *, family=None) -> list[str]:
    """Unknown and missing required loss options, and the values of the known ones (types, finiteness, allowed
    names, the loss's own range checks: :mod:`mmalign.methods.loss_kwargs`), checked before the model is built:
    without this a typo (``betta``), a required option left out (AlphaPO's ``alpha``) or a bad value
    (``loss_type=bogus``, ``beta=nan``) surfaced at step 1. ``family`` (a ModelFamily class) adds the keys it
    consumes and refuses per-token options it cannot honour. Rows whose options are their defaults: values only."""
    if method.loss_fn is None:
        return check_option_values(method, default_options(method), kwargs, where)
    options = loss_options(method)
    extra = family.extra_kwargs if family is not None else frozenset()
    errors = [f"{where}.{k}: not an option of loss {method.name!r}; valid: {sorted(options)}"
              for k in kwargs if k not in options and k not in extra and k not in method.defaults]
    errors += [f"{where}.{name}: loss {method.name!r} needs a value (no default); set {where}.{name}=..."
               for name, p in options.items()
               if p.default is inspect.Parameter.empty and name not in kwargs and name not in method.defaults]
    if family is not None and "token_logps" not in family.provides:
        errors += [f"{where}.{k}: a per-token option, but the {family.name} family has no tokens "
                   f"({family.cannot.get('token_logps', NEEDS['token_logps'])})" for k in kwargs if k in TOKEN_OPTIONS]
    return errors + check_option_values(method, options, kwargs, where)
