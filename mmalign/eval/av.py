"""Evaluation of the SF-CAVP-style audio-visual model: audio↔video retrieval and audio-offset detection.

Every video of the evaluation rows gives **one clip**, centred in the video (:func:`mmalign.data.av_clips.
clip_starts` with one clip), scored with the reward form of :func:`mmalign.adapters.av.cavp_scores`:
r(v, a) = w_s·cos(slow) + w_f·mean_t cos(fast_t).

- ``v2a_recall@k``: the video's own audio is among the k best-scored audios of all N clips; ``a2v_recall@k`` the
  other way (hit@k per query, as CLIP-benchmark's "recall").
- ``offset_acc@k`` (sync): the clip's audio is also read shifted by ±k fast frames (k / fast_fps seconds, zero
  padded where it leaves the file); a clip counts as correct when the aligned audio scores strictly above both
  shifted ones, i.e. the model tells "in sync" from "shifted by ±k frames" (chance 1/3 with random scores).
  A stand-in for Diff-Foley's "Align Acc" classifier (arXiv 2306.17203; its training code is unreleased, research
  note §2.6) and Synchformer's DeSync [inferred design, not either metric].

The reward model must not double as the evaluator of a generator it ranked (§2.7): these metrics evaluate the
SF-CAVP model itself.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from ..adapters.av import embed_audio, embed_video
from ..data.av_clips import AVDataset, AVOptions, load_av_records
from ..data.av_ranking import av_reward
from .clip import format_table, write_json

__all__ = ["KS", "evaluate_av", "format_table", "offset_accuracy", "pair_scores", "retrieval_metrics", "write_json"]

KS = (1, 5, 10)


def pair_scores(video: tuple[Tensor, Tensor], audio: tuple[Tensor, Tensor], *, weights=(1.0, 1.0),
                chunk: int = 64) -> Tensor:
    """``[N, M]`` rewards of every video (slow ``[N, D]``, fast ``[N, T, D]``) against every audio (``[M, D]``,
    ``[M, T, D]``), ``chunk`` videos at a time (the fast term holds ``chunk·M·T·D`` values)."""
    vs, vf = video
    as_, af = audio
    rows = [av_reward(vs[i:i + chunk, None], as_[None], vf[i:i + chunk, None], af[None], weights=weights)
            for i in range(0, vs.shape[0], chunk)]
    return torch.cat(rows).float()


def retrieval_metrics(sims: Tensor, ks=KS) -> dict[str, float]:
    """Recall@k both ways of a square ``[N, N]`` score table whose diagonal holds the true pairs (rows: videos)."""
    n = sims.shape[0]
    if sims.dim() != 2 or sims.shape[1] != n:
        raise ValueError(f"sims must be square [N, N], got {tuple(sims.shape)}")
    target = torch.arange(n)[:, None]
    out = {}
    for k in ks:
        kk = min(k, n)
        out[f"v2a_recall@{k}"] = float((sims.topk(kk, dim=1).indices == target).any(1).float().mean())
        out[f"a2v_recall@{k}"] = float((sims.T.topk(kk, dim=1).indices == target).any(1).float().mean())
    return out


def offset_accuracy(scores: Tensor, aligned: int = 1) -> float:
    """Fraction of rows of ``[N, K]`` candidate scores whose column ``aligned`` is strictly the largest (a tie
    counts as a miss: a model that cannot tell the offsets apart gets no credit)."""
    others = torch.cat([scores[:, :aligned], scores[:, aligned + 1:]], dim=1)
    return float((scores[:, aligned] > others.max(1).values).float().mean())


@torch.no_grad()
def evaluate_av(model: nn.Module, sources, *, offsets=(1, 2, 4), weights=(1.0, 1.0), options: AVOptions | None = None,
                max_videos: int | None = None, batch_size: int = 16, device="cpu", ks=KS) -> dict[str, float]:
    """Retrieval and offset metrics (module docstring) of ``model`` on the rows of ``sources``."""
    model = model.to(device).eval()
    media = model.media
    opts = replace(options or AVOptions(), clips_per_video=1, limit=max_videos)
    records, stats = load_av_records(sources, media, opts)
    ds = AVDataset(records, media, opts, random_starts=False)
    shifts = [0.0] + [s * k / media.fast_fps for k in offsets for s in (-1, 1)]
    vid, aud, cand = [], [], []  # per video: embeddings, aligned audio, and the [1 + 2·len(offsets)] shifted ones
    for start in range(0, len(ds), batch_size):
        items = []
        for i in range(start, min(len(ds), start + batch_size)):
            s = ds.starts(i)[0]
            items.append(ds.read(records[i], [s], audio_starts=[s + d for d in shifts]))
        slow = torch.cat([it["slow"] for it in items]).to(device)
        fast = torch.cat([it["fast"] for it in items]).to(device)
        vs, vf = embed_video(model, slow, fast)
        as_, af = embed_audio(model, torch.cat([it["mel"] for it in items]).to(device))
        k = len(shifts)
        as_, af = as_.view(len(items), k, -1), af.view(len(items), k, *af.shape[1:])
        vid.append((vs.float().cpu(), vf.float().cpu()))
        aud.append((as_[:, 0].float().cpu(), af[:, 0].float().cpu()))
        cand.append(av_reward(vs[:, None], as_, vf[:, None], af, weights=weights).float().cpu())
    video = (torch.cat([v[0] for v in vid]), torch.cat([v[1] for v in vid]))
    audio = (torch.cat([a[0] for a in aud]), torch.cat([a[1] for a in aud]))
    out = retrieval_metrics(pair_scores(video, audio, weights=weights), ks)
    table = torch.cat(cand)  # columns: aligned, then (−k, +k) per offset
    for j, k in enumerate(offsets):
        out[f"offset_acc@{k}"] = offset_accuracy(table[:, [1 + 2 * j, 0, 2 + 2 * j]])
    out["videos"] = float(len(ds))
    out.update({f"data/{k}": v for k, v in stats.items() if k.startswith("skipped/")})
    return out

