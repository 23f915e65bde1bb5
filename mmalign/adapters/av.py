"""The audio-visual adapter: ``(SF-CAVP model, AVBatch) → Scores``, and the reward :func:`cavp_scores`.

Scores of a batch of B videos × C clips (:func:`score_av`), all unit-norm:

- ``embeddings["video_slow" | "audio_slow"]``: ``[B, C, D]`` slow (semantic) clip embeddings;
- ``embeddings["video_fast" | "audio_fast"]``: ``[B, C, T, D]`` fast (per-time-step) embeddings on one time grid;
- multi-process: ``video_slow_all`` / ``audio_slow_all`` ``[world·B, C, D]`` gathered as open_clip does
  (:func:`~mmalign.adapters.contrastive.gather_features`; with grad by default), ``extras["rank"]``. The fast
  embeddings stay local: the intra-video and temporal terms only compare clips of one video, which never spans
  two ranks (one example = one video, :mod:`mmalign.data.av_clips`);
- ``extras["logit_scale_slow" | "logit_scale_fast"]`` (exponentiated, ≤ 100);
- ``logps [B, 1]``: the mean over clips of the pair's reward (:func:`mmalign.data.av_ranking.av_reward`, weights
  1, 1), for reporting only.

:func:`cavp_scores` is the reward AVP-RPO ranks generated audio with (MultiSoundGen-style, arXiv 2509.19999 §2.2
step 2 of the research note; the paper's formula is unpublished): r(v, a) = w_s·cos(slow) + w_f·mean_t cos(fast_t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.av_clips import AVBatch
from ..data.av_media import frame_indices
from ..data.av_ranking import av_reward
from ..types import Scores
from .contrastive import dist_info, gather_features

__all__ = ["SEMANTIC", "cavp_scores", "embed_audio", "embed_video", "score_av"]

SEMANTIC = ("mean", "clips")  # the cavp row's slow-term forms (mmalign.methods.av_losses), checked by the family


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def embed_video(model: nn.Module, slow: Tensor, fast: Tensor) -> tuple[Tensor, Tensor]:
    """Unit-norm ``([N, D], [N, T, D])`` of ``slow [N, Ts, 3, S, S]`` / ``fast [N, T, 3, s, s]`` pixels."""
    s, f = _unwrap(model).encode_video(slow, fast)
    return F.normalize(s, dim=-1), F.normalize(f, dim=-1)


def embed_audio(model: nn.Module, mel: Tensor) -> tuple[Tensor, Tensor]:
    """Unit-norm ``([N, D], [N, T, D])`` of log-mel ``[N, n_mels, F]``."""
    s, f = _unwrap(model).encode_audio(mel)
    return F.normalize(s, dim=-1), F.normalize(f, dim=-1)


def score_av(model: nn.Module, batch: AVBatch, *, gather: bool = True, gather_with_grad: bool = True) -> Scores:
    """Encode a batch; see the module docstring for what the Scores hold."""
    b, c = batch.slow.shape[:2]
    vs, vf = embed_video(model, batch.slow.flatten(0, 1), batch.fast.flatten(0, 1))
    as_, af = embed_audio(model, batch.mel.flatten(0, 1))
    emb = {"video_slow": vs.view(b, c, -1), "audio_slow": as_.view(b, c, -1),
           "video_fast": vf.view(b, c, *vf.shape[1:]), "audio_fast": af.view(b, c, *af.shape[1:])}
    scale_slow, scale_fast = _unwrap(model).logit_scales()
    extras = {"logit_scale_slow": scale_slow, "logit_scale_fast": scale_fast}
    with torch.no_grad():
        reward = av_reward(emb["video_slow"], emb["audio_slow"], emb["video_fast"], emb["audio_fast"])  # [B, C]
    rank, world = dist_info()
    if gather and world > 1:
        for name in ("video_slow", "audio_slow"):
            emb[f"{name}_all"] = gather_features(emb[name].flatten(1), gather_with_grad=gather_with_grad).view(
                -1, c, emb[name].shape[-1])
        extras["rank"] = torch.tensor(rank, device=scale_slow.device)
    return Scores(logps=reward.mean(1, keepdim=True), embeddings=emb, extras=extras)


def _clip_frames(video_frames: Tensor, times: list[float], seconds: float) -> Tensor:
    """Frames ``[N, T_in, H, W, 3]`` spread uniformly over ``seconds`` → the ones shown at ``times``."""
    t_in = video_frames.shape[1]
    return video_frames[:, frame_indices(times, t_in / seconds, t_in)]


@torch.no_grad()
def cavp_scores(model: nn.Module, video_frames: Tensor, audio_candidates: Tensor, *, sample_rate: int | None = None,
                weights: tuple[float, float] = (1.0, 1.0), batch_size: int = 16) -> Tensor:
    """Reward ``[N, K]`` of K candidate audios for each of N videos (higher = better matched), in
    ``[−(w_s + w_f), w_s + w_f]``.

    Args:
        model: an :class:`~mmalign.models.cavp.SFCAVP` (its media settings say fps, image sizes, mel, clip length).
        video_frames: uint8 ``[N, T, H, W, 3]``, T frames spread uniformly over one clip (``clip_seconds``); any T
            (the slow and fast frames are picked from it by time).
        audio_candidates: waves ``[N, K, S]`` (or ``[N, S]`` for K = 1) covering the same clip; cropped or
            zero-padded to the model's clip length.
        sample_rate: the waves' rate; resampled to the model's when it differs (None: already the model's).
        weights: ``(w_s, w_f)`` of the slow and fast cosine terms.
        batch_size: videos encoded per forward (their K audios in one batch).
    """
    m = _unwrap(model)
    media = m.media
    if video_frames.dim() != 5 or video_frames.shape[-1] != 3:
        raise ValueError(f"video_frames must be uint8 [N, T, H, W, 3], got {tuple(video_frames.shape)}")
    if audio_candidates.dim() == 2:
        audio_candidates = audio_candidates[:, None]
    n, k = audio_candidates.shape[:2]
    if audio_candidates.dim() != 3 or n != video_frames.shape[0]:
        raise ValueError(f"audio_candidates must be [N, K, S] with N={video_frames.shape[0]} videos, got "
                         f"{tuple(audio_candidates.shape)}")
    if sample_rate is not None and sample_rate != media.sample_rate:
        import torchaudio.functional as AF

        audio_candidates = AF.resample(audio_candidates.float(), orig_freq=sample_rate, new_freq=media.sample_rate)
    was_training = m.training
    m.eval()
    dev = next(m.parameters()).device
    slow_t = [(i + 0.5) / media.slow_fps for i in range(media.num_slow)]
    fast_t = [(i + 0.5) / media.fast_fps for i in range(media.num_fast)]
    out = []
    try:
        for i in range(0, n, batch_size):
            frames = video_frames[i:i + batch_size]
            slow = media.slow_pixels(_clip_frames(frames, slow_t, media.clip_seconds)).to(dev)
            fast = media.fast_pixels(_clip_frames(frames, fast_t, media.clip_seconds)).to(dev)
            vs, vf = embed_video(m, slow, fast)
            waves = audio_candidates[i:i + batch_size].float()
            mel = media.mel_of(waves.flatten(0, 1)).to(dev)
            as_, af = embed_audio(m, mel)
            as_, af = as_.view(len(frames), k, -1), af.view(len(frames), k, *af.shape[1:])
            out.append(av_reward(vs[:, None], as_, vf[:, None], af, weights=weights).float().cpu())
    finally:
        m.train(was_training)
    return torch.cat(out)
