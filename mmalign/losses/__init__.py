"""``mmalign.losses``: every preference/alignment loss as a pure torch function.

Importing this package needs only torch. Each loss takes tensors (sequence scores, per-token log-probs,
features) and returns :class:`LossOutput` ``(loss, per_example, metrics)``. Files by family:

=================  ==========================================================================================
``pairwise``       DPO with TRL 1.x ``loss_type`` names (sigmoid, hinge, ipo, exo_pair, nca_pair, robust,
                   bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm),
                   f-divergences, cDPO/soft targets, LD-DPO
``reference_free`` SimPO, CPO, ORPO, AlphaPO, SLiC-HF
``unpaired``       KTO, BCO, NPO, SimNPO, gradient ascent, unlearning objectives (forget + retain)
``listwise``       Plackett–Luce (full and top-k), pairwise expansion of rankings, ListMLE on aggregates
``token_level``    TDPO1/2, SparsePO, activation masks, token-weighted NLL, PRIOR weights, WPO weights
``reward_model``   Bradley–Terry (margin, centering), general preference model
``contrastive``    CLIP InfoNCE, SigLIP; modality gap, alignment, uniformity (re-exports the next two)
``cavp``           CAVP (Diff-Foley): semantic + intra-video/temporal contrast over clip groups
``clip_tuning``    RaFA, HyCD (CLIP-Refine), ZSCL distillation, weight averaging
``diffusion``      Diffusion-DPO/NPO over denoising errors (any pairwise loss_type), Self-NPO regression, SFT
``regularizers``   NLL, KL to the reference, XPO bonus, entropy bonus, and ``combine`` (weighted terms)
=================  ==========================================================================================

``LOSSES`` is the greppable name → function table; :func:`get_loss` raises with the sorted valid names.
"""

from __future__ import annotations

from collections.abc import Callable

from ._base import LossOutput, masked_mean, masked_sum, reduce_loss
from .contrastive import (
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
from .diffusion import convert_beta, diffusion_dpo, diffusion_npo, diffusion_sft, self_npo_regression
from .listwise import aggregate_token_values, listmle, pairwise_expand, pairwise_from_ranking, plackett_luce
from .pairwise import DPO_LOSS_TYPES, F_DIVERGENCES, dpo, ld_logps
from .reference_free import alphapo, cpo, orpo, simpo, slic
from .regularizers import combine, entropy_bonus, kl_to_ref, nll, xpo_bonus
from .reward_model import bradley_terry, general_preference_rm, general_preference_score
from .token_level import (
    activation_token_mask,
    prior_token_weights,
    reward_to_go,
    sparse_token_dpo,
    tdpo,
    token_weighted_nll,
    wpo_weights,
)
from .unpaired import bco, gradient_ascent, kto, kto_reference_point, npo, simnpo, unlearning_objective

# name -> loss function. Helpers that return weights or metrics (not a LossOutput) are exported but not listed.
LOSSES: dict[str, Callable[..., LossOutput]] = {
    # pairwise, reference-based
    "dpo": dpo,
    # reference-free pairwise
    "simpo": simpo,
    "cpo": cpo,
    "orpo": orpo,
    "alphapo": alphapo,
    "slic": slic,
    # unpaired and unlearning
    "kto": kto,
    "bco": bco,
    "npo": npo,
    "simnpo": simnpo,
    "gradient_ascent": gradient_ascent,
    # listwise
    "plackett_luce": plackett_luce,
    "pairwise_from_ranking": pairwise_from_ranking,
    "listmle": listmle,
    # token level
    "tdpo": tdpo,
    "sparse_token_dpo": sparse_token_dpo,
    "token_weighted_nll": token_weighted_nll,
    # reward models
    "bradley_terry": bradley_terry,
    "general_preference_rm": general_preference_rm,
    # contrastive
    "clip_contrastive": clip_contrastive,
    "siglip": siglip,
    "cavp_intra_contrastive": cavp_intra_contrastive,
    "cavp_loss": cavp_loss,
    "rafa": rafa,
    "hycd": hycd,
    "zscl_distill": zscl_distill,
    # diffusion / flow
    "diffusion_dpo": diffusion_dpo,
    "diffusion_npo": diffusion_npo,
    "diffusion_sft": diffusion_sft,
    "self_npo_regression": self_npo_regression,
    # regularisers and bonuses
    "nll": nll,
    "kl_to_ref": kl_to_ref,
    "xpo_bonus": xpo_bonus,
    "entropy_bonus": entropy_bonus,
}


def get_loss(name: str) -> Callable[..., LossOutput]:
    """Look a loss up by name; an unknown name raises with every valid name, sorted."""
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; valid names: {sorted(LOSSES)}") from None


__all__ = [
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "LOSSES",
    "LossOutput",
    "activation_token_mask",
    "aggregate_token_values",
    "alignment",
    "alphapo",
    "average_weights",
    "bco",
    "bradley_terry",
    "cavp_intra_contrastive",
    "cavp_loss",
    "clip_contrastive",
    "combine",
    "convert_beta",
    "cpo",
    "diffusion_dpo",
    "diffusion_npo",
    "diffusion_sft",
    "dpo",
    "entropy_bonus",
    "general_preference_rm",
    "general_preference_score",
    "get_loss",
    "gradient_ascent",
    "hycd",
    "kl_to_ref",
    "kto",
    "kto_reference_point",
    "ld_logps",
    "listmle",
    "masked_mean",
    "masked_sum",
    "modality_gap",
    "nll",
    "npo",
    "orpo",
    "pairwise_expand",
    "pairwise_from_ranking",
    "plackett_luce",
    "prior_token_weights",
    "rafa",
    "reduce_loss",
    "reward_to_go",
    "self_npo_regression",
    "siglip",
    "simnpo",
    "simpo",
    "slic",
    "sparse_token_dpo",
    "tdpo",
    "token_weighted_nll",
    "uniformity",
    "unlearning_objective",
    "update_weight_average",
    "wpo_weights",
    "xpo_bonus",
    "zscl_distill",
]
