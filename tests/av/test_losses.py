"""The ``cavp`` row's invariants (research note §2.8) on hand-built Scores: the intra term is 0 with one clip per
video, the temporal term rises when only the audio's time steps are swapped, the weights combine the terms
linearly, and the ``mean`` / ``clips`` slow terms are Diff-Foley's two semantic forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmalign.losses import cavp_loss, clip_contrastive
from mmalign.methods.av_losses import CAVP_DEFAULTS, cavp_row, intra_term, slow_term, temporal_term
from mmalign.types import Scores


def _scores(b=3, c=2, t=5, d=8, seed=0, aligned=False) -> Scores:
    g = torch.Generator().manual_seed(seed)
    vs, vf = torch.randn(b, c, d, generator=g), torch.randn(b, c, t, d, generator=g)
    as_ = vs.clone() if aligned else torch.randn(b, c, d, generator=g)
    af = vf.clone() if aligned else torch.randn(b, c, t, d, generator=g)
    emb = {"video_slow": F.normalize(vs, dim=-1), "audio_slow": F.normalize(as_, dim=-1),
           "video_fast": F.normalize(vf, dim=-1), "audio_fast": F.normalize(af, dim=-1)}
    extras = {"logit_scale_slow": torch.tensor(10.0), "logit_scale_fast": torch.tensor(20.0)}
    return Scores(logps=torch.zeros(b, 1), embeddings=emb, extras=extras)


def test_intra_term_is_zero_with_one_clip_per_video():
    s = _scores(c=1)
    assert intra_term(s).loss.item() == 0.0
    out = cavp_row(s, None, None, {**CAVP_DEFAULTS, "slow_weight": 0.0, "temporal_weight": 0.0, "intra_weight": 1.0})
    assert out.loss.item() == 0.0 and out.per_example.abs().max().item() == 0.0


def test_temporal_loss_rises_when_only_the_audio_time_steps_are_swapped():
    """Orthonormal, aligned time steps give a small temporal loss; swapping steps 1 and 3 of the audio only makes
    those steps pick the wrong partner, so the loss must go up (video untouched)."""
    s = _scores(b=2, c=1, t=6, d=16, aligned=True)
    base = temporal_term(s).loss
    swapped = s.embeddings["audio_fast"].clone()
    swapped[:, :, [1, 3]] = swapped[:, :, [3, 1]]
    s2 = Scores(logps=s.logps, embeddings={**s.embeddings, "audio_fast": swapped}, extras=s.extras)
    assert temporal_term(s2).loss > base + 1.0
    assert torch.equal(s2.embeddings["video_fast"], s.embeddings["video_fast"])


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.0, 2.0, 0.5), (3.0, 0.0, 0.0)])
def test_slow_and_fast_weights_combine_the_terms_linearly(weights):
    s = _scores()
    w_s, w_i, w_t = weights
    kw = {**CAVP_DEFAULTS, "slow_weight": w_s, "intra_weight": w_i, "temporal_weight": w_t}
    out = cavp_row(s, None, None, kw)
    want = w_s * slow_term(s).loss + w_i * intra_term(s).loss + w_t * temporal_term(s).loss
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert out.per_example.shape == (3,) and out.per_example.mean().item() == pytest.approx(want.item(), rel=1e-5)
    for name in ("slow", "intra", "temporal"):
        assert f"loss/{name}" in out.metrics  # logged even at weight 0


def test_slow_terms_are_diff_foleys_semantic_forms():
    """'mean' = InfoNCE over per-video means (the slow scale); 'clips' = InfoNCE over all B·C clips; on the same
    features, cavp_loss(semantic=...) gives the same semantic term (with one shared scale)."""
    s = _scores(b=4, c=3)
    vs, as_ = s.embeddings["video_slow"], s.embeddings["audio_slow"]
    mean = clip_contrastive(F.normalize(vs.mean(1), dim=-1), F.normalize(as_.mean(1), dim=-1), 10.0).loss
    assert slow_term(s, "mean").loss.item() == pytest.approx(mean.item(), rel=1e-6)
    ref = cavp_loss(vs, as_, 10.0, semantic="clips", intra_weight=0.0).loss
    assert slow_term(s, "clips").loss.item() == pytest.approx(ref.item(), rel=1e-6)
    ref_mean = cavp_loss(vs, as_, 10.0, semantic="mean", intra_weight=0.0).loss
    assert slow_term(s, "mean").loss.item() == pytest.approx(ref_mean.item(), rel=1e-6)
    with pytest.raises(ValueError, match="semantic"):
        slow_term(s, "bogus")


def test_aligned_features_with_a_large_scale_give_a_small_loss():
    s = _scores(b=4, c=2, t=4, d=64, aligned=True)
    s.extras = {"logit_scale_slow": torch.tensor(100.0), "logit_scale_fast": torch.tensor(100.0)}
    assert cavp_row(s, None, None, dict(CAVP_DEFAULTS)).loss.item() < 0.05
