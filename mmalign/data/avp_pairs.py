"""AVP-RPO's data layer: the per-round candidate cache, reward table → training examples, and the round dataset.

MultiSoundGen-style (arXiv 2509.19999; no code is public, research/video_audio_clip_prior.md §2.2 is the design
followed, inferred): per video, K generated audios are scored by an SF-CAVP-style reward and turned into training
data for flow DPO. Three pairings (``pairing``):

- ``best_worst``: one pair per video, the best vs the worst candidate (§2.2 step 3), if their reward gap exceeds
  ``margin`` (so a tie gives no pair);
- ``margin``: every ordered pair whose gap exceeds ``margin`` (≤ K(K−1)/2 per video; §2.2 "all top-vs-bottom pairs
  with a margin threshold");
- ``ranking``: the full ranking of the K candidates, for a Plackett–Luce loss (DPO paper App. A.3).

Pairs always come from one video's candidates, so chosen and rejected share the video, the CFG scale and (in the
loss) the flow noise and time (§2.7, §2.8); ``chosen`` has the higher reward. :func:`round_examples` builds them
with :func:`mmalign.data.av_ranking.rank_av_pairs` (its strict tie rule: a pair needs gap > margin).

One example = one video with the candidates it trains on (K' = 2 for ``best_worst``, K for the others) and the
pairs among them as index pairs, so each candidate is scored once per step however many pairs it is in.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .av_ranking import rank_av_pairs
from .noise import NoiseSampler
from .v2a import V2ABatch

__all__ = ["PAIRINGS", "CandidateCache", "RoundDataset", "RoundExample", "round_examples", "video_key"]

PAIRINGS = ("best_worst", "margin", "ranking")


def video_key(frames: Tensor) -> str:
    """A content key of one video's frames (``[T, H, W, 3]`` uint8): renamed or moved files still hit the cache."""
    t = frames.detach().cpu().contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:24]


class CandidateCache:
    """Generated waves on disk, one ``.pt`` per (model hash, video key, seed): ``<root>/<model>/<video>_<seed>.pt``.

    Files are written to a temporary name and renamed, so an interrupted write never leaves a truncated entry that
    a resumed round would read. ``hits``/``misses`` count lookups (tests and the benchmark read them)."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None
        self.hits = self.misses = 0

    def path(self, model: str, video: str, seed: int) -> Path | None:
        return None if self.root is None else self.root / model[:24] / f"{video}_{int(seed)}.pt"

    def get(self, model: str, video: str, seed: int) -> Tensor | None:
        p = self.path(model, video, seed)
        if p is not None and p.is_file():
            try:
                wave = torch.load(p, map_location="cpu", weights_only=True)
            except Exception:  # a foreign or damaged file is regenerated, never trusted
                wave = None
            if isinstance(wave, Tensor):
                self.hits += 1
                return wave
        self.misses += 1
        return None

    def put(self, model: str, video: str, seed: int, wave: Tensor) -> None:
        p = self.path(model, video, seed)
        if p is None:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        torch.save(wave.detach().cpu().clone(), tmp)
        os.replace(tmp, p)


@dataclass
class RoundExample:
    """One video's training candidates.

    Attributes:
        video: index of the video in the round's list.
        candidates: indices (into the K generated audios) trained on, best first for ``ranking``.
        pairs: ``(chosen, rejected)`` positions into ``candidates`` (chosen has the higher reward).
        rewards: the reward of each entry of ``candidates``.
        ranks: rank of each entry of ``candidates`` (0 = best; the Plackett–Luce labels).
    """

    video: int
    candidates: list[int]
    pairs: list[tuple[int, int]]
    rewards: list[float]
    ranks: list[float] = field(default_factory=list)


def round_examples(rewards: Tensor, *, pairing: str = "best_worst", margin: float = 0.0,
                   max_pairs_per_video: int | None = None) -> list[RoundExample]:
    """``[V, K]`` rewards → one :class:`RoundExample` per video (``pairs`` may be empty: no gap above ``margin``;
    such a video trains with weight 0 this round)."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r} is not one of {list(PAIRINGS)}")
    r = torch.as_tensor(rewards).detach().float().cpu()
    v, k = r.shape
    rows = rank_av_pairs(r, list(range(v)), strategy="best_worst" if pairing == "best_worst" else "all",
                         min_margin=margin, max_pairs_per_video=max_pairs_per_video)
    by_video: dict[int, list[dict]] = {i: [] for i in range(v)}
    for row in rows:
        by_video[row["video"]].append(row)
    out = []
    for i in range(v):
        order = sorted(range(k), key=lambda j: (-float(r[i, j]), j))  # best first, ties by index
        if pairing == "best_worst":
            cands = [order[0], order[-1]]
            pairs = [(0, 1)] if by_video[i] else []
        else:
            cands = order
            pos = {c: n for n, c in enumerate(cands)}
            pairs = [(pos[row["chosen"]], pos[row["rejected"]]) for row in by_video[i]]
        out.append(RoundExample(i, cands, pairs, [float(r[i, c]) for c in cands],
                                [float(n) for n in range(len(cands))]))
    return out


class RoundDataset(Dataset):
    """The videos of one AVP-RPO round; the candidates are made on first use by ``materialize`` (generation with
    the current policy, reward, pairing), so that a resumed round first restores the recipe's state and then reads
    the round from the cache instead of regenerating it with the restarted weights.

    ``materialize() -> (waves [V, K, S], examples)``. Items carry the frames, the chosen subset of waves, the pair
    indices and rewards; :meth:`collate` draws each example's shared flow noise/time with ``noise_sampler``."""

    def __init__(self, frames: Sequence[Tensor], meta: Sequence[dict], noise_sampler: NoiseSampler,
                 materialize: Callable[[], tuple[Tensor, list[RoundExample]]]):
        self.frames, self.meta, self.noise_sampler = list(frames), list(meta), noise_sampler
        self._materialize = materialize
        self.waves: Tensor | None = None
        self.examples: list[RoundExample] | None = None
        self._epoch: int | None = None
        self._visits: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.frames)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def ready(self) -> None:
        if self.examples is None:
            self.waves, self.examples = self._materialize()

    def reset(self) -> None:
        """Forget the materialized round (the recipe's state changed: e.g. a resume restored the round's model)."""
        self.waves = self.examples = None

    def __getitem__(self, index: int) -> dict:
        self.ready()
        epoch = self._epoch if self._epoch is not None else self._visits.get(index, 0)
        self._visits[index] = self._visits.get(index, 0) + 1
        ex = self.examples[index]
        return {"index": index, "epoch": epoch, "frames": self.frames[index], "waves": self.waves[index, ex.candidates],
                "example": ex, "meta": self.meta[index]}

    def collate(self, items: Sequence[dict]) -> V2ABatch:
        k = max(len(it["example"].candidates) for it in items)
        p = max(1, max(len(it["example"].pairs) for it in items))
        n = len(items)
        draws = [self.noise_sampler.draw(it["index"], it["epoch"], k) for it in items]
        waves = torch.zeros(n, k, items[0]["waves"].shape[-1])
        labels = torch.full((n, k), float("nan"))
        rewards = torch.full((n, k), float("nan"))
        mask = torch.zeros(n, k, dtype=torch.bool)
        pairs = torch.zeros(n, p, 2, dtype=torch.long)
        pair_mask = torch.zeros(n, p)
        for i, it in enumerate(items):
            ex = it["example"]
            m = len(ex.candidates)
            waves[i, :m], mask[i, :m] = it["waves"], True
            rewards[i, :m] = torch.tensor(ex.rewards)
            if ex.pairs:  # a video without a pair this round is not ranked either (weight 0)
                labels[i, :m] = torch.tensor(ex.ranks)
                pairs[i, : len(ex.pairs)] = torch.tensor(ex.pairs)
                pair_mask[i, : len(ex.pairs)] = 1.0
        extras = {key: torch.stack([d[key] for d in draws])
                  for key in ("noise", "timesteps", "sigmas", "vae_noise") if key in draws[0]}
        extras.update(null=torch.tensor([bool(d["drop_caption"]) for d in draws]), pairs=pairs, pair_mask=pair_mask,
                      rewards=rewards)
        return V2ABatch(frames=torch.stack([it["frames"] for it in items]), waves=waves,
                        candidate_mask=None if bool(mask.all()) else mask, labels=labels,
                        meta=[it["meta"] for it in items], extras=extras)
