"""Video-to-audio rows: validate them, load a clip's frames and audio, and collate :class:`V2ABatch` es.

Formats, detected from the keys (all rows of a run share one; paths are relative to the working directory or, if
not found there, to the data file's folder):

=========  ==========================================  =========================================================
format     keys                                        candidates
=========  ==========================================  =========================================================
sft        video, audio                                K = 1 (conditional flow matching: the SFT row)
pairs      video, chosen, rejected                     K = 2 (0 = chosen); flow DPO, NPO, …
unpaired   video, audio, label                         K = 1, label bool (KTO, BCO)
ranked     video, audios, ranking | scores             K ≥ 2; ranking[i] = rank of audios[i], 0 = best; or scores,
                                                       higher = better (Plackett–Luce)
=========  ==========================================  =========================================================

Media problems are row problems, named with file, row, field, value and fix (or skipped and counted under
``skipped/<reason>`` with ``data.skip_bad_rows``): a missing file (``missing_file``), a video that cannot be read or
has no frames (``bad_video``), audio that cannot be read (``bad_audio``), at another sample rate
(``wrong_sample_rate``, unless ``resample``), with several channels (``wrong_channels``, unless ``downmix``), silent
(``silent``: RMS below ``min_rms``) or clipped (``clipped``: more than ``max_clipped`` of the samples at
``|x| >= 0.999``). Audio is cut or zero-padded to the clip length; frames are taken at ``fps`` from the start (frame
``i`` at time ``(i + ½)/fps``; a video shorter than the clip repeats its last frame).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..types import CandidateBatch
from .audio import fit_length, read_audio
from .noise import NoiseSampler
from .row_files import RowProblem, load_rows
from .rows import DataError
from .video import read_frames, video_info

__all__ = ["V2A_FORMATS", "MediaOptions", "V2ABatch", "V2ADataset", "V2ARecord", "load_v2a_records"]

V2A_FORMATS = ("sft", "pairs", "unpaired", "ranked")
_SIGNATURES = {"pairs": ("video", "chosen", "rejected"), "ranked": ("video", "audios"),
               "unpaired": ("video", "audio", "label"), "sft": ("video", "audio")}
CLIPPED = 0.999


class MediaError(DataError):
    """A media file that cannot be used; ``reason`` is the skip counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class MediaOptions:
    """How clips are read (from the ``v2a:`` section and the model's spec)."""

    sample_rate: int
    num_samples: int
    fps: float
    num_frames: int
    frame_size: int
    resample: bool = False
    downmix: bool = False
    min_rms: float = 1e-4
    max_clipped: float = 0.01
    backend: str = "auto"


@dataclass
class V2ARecord:
    video: Path
    audios: list[Path]
    labels: list[float]
    origin: tuple[str, int]
    fields: list[str] = field(default_factory=list)  # the row key of each audio (for messages)


@dataclass
class V2ABatch(CandidateBatch):
    """B videos with K candidate audios each.

    Attributes:
        frames: ``[B, T, S, S, 3]`` uint8 frames (None once ``features`` are set).
        waves: ``[B, K, N]`` float waves in [-1, 1] (None once ``latent_params`` are set).
        features: ``[B, T, F]`` frame features, filled by the adapter on first use (shared by the passes).
        latent_params: ``[B, K, ...]`` VAE posterior parameters or mel latents, filled on first use.
        extras: ``noise [B, C, L]``, ``timesteps [B]``, ``sigmas [B]``, ``vae_noise [B, C, L]``, ``null [B]`` (the
            example trains with the learned null condition), ``index [B]`` (the loop).
    """

    frames: Tensor | None = None
    waves: Tensor | None = None
    features: Tensor | None = None
    latent_params: Tensor | None = None
    candidate_mask: Tensor | None = None
    labels: Tensor | None = None
    meta: list[dict] = field(default_factory=list)
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.extras["noise"].shape[0])

    @property
    def num_candidates(self) -> int:
        src = self.latent_params if self.latent_params is not None else self.waves
        return int(src.shape[1])

    @property
    def device(self) -> torch.device:
        return self.extras["noise"].device


# ------------------------------------------------------------------------------------------------ media


def load_clip_audio(path: Path, opts: MediaOptions) -> Tensor:
    """``[num_samples]`` mono wave at ``opts.sample_rate``, checked (see the module docstring)."""
    if not path.is_file():
        raise MediaError("missing_file", f"audio file {path} does not exist; fix: correct the path or drop the row")
    try:
        wave, sr = read_audio(path, mono=False)
    except DataError as e:
        raise MediaError("bad_audio", str(e)) from e
    if wave.shape[0] > 1:
        if not opts.downmix:
            raise MediaError("wrong_channels", f"{path}: {wave.shape[0]} channels, the generator makes mono audio; "
                             "fix: set v2a.downmix=true to average the channels, or re-encode with `-ac 1`")
        wave = wave.mean(0, keepdim=True)
    if sr != opts.sample_rate:
        if not opts.resample:
            raise MediaError("wrong_sample_rate", f"{path}: sample rate {sr} Hz, the generator works at "
                             f"{opts.sample_rate} Hz; fix: set v2a.resample=true, or re-encode with "
                             f"`-ar {opts.sample_rate}`")
        import torchaudio.functional as AF

        wave = AF.resample(wave, orig_freq=sr, new_freq=opts.sample_rate)
    x = fit_length(wave[0], opts.num_samples)
    rms = float(x.pow(2).mean().sqrt())
    if rms < opts.min_rms:
        raise MediaError("silent", f"{path}: silent in the first {opts.num_samples / opts.sample_rate:g} s (RMS "
                         f"{rms:.2e} < v2a.min_rms={opts.min_rms:g}); fix: drop the row or lower v2a.min_rms")
    clipped = float((x.abs() >= CLIPPED).float().mean())
    if clipped > opts.max_clipped:
        raise MediaError("clipped", f"{path}: {clipped:.1%} of the samples are clipped (|x| >= {CLIPPED}), more than "
                         f"v2a.max_clipped={opts.max_clipped:g}; fix: use an unclipped recording, or raise the limit")
    return x


def frame_indices(num_video_frames: int, video_fps: float, fps: float, n: int) -> list[int]:
    """Frame ``i`` at time ``(i + ½)/fps``: index ``floor(t·video_fps)``, clamped to the last frame."""
    rate = video_fps if video_fps > 0 else fps
    return [min(int(math.floor((i + 0.5) / fps * rate)), num_video_frames - 1) for i in range(n)]


def load_clip_frames(path: Path, opts: MediaOptions) -> Tensor:
    """``[num_frames, S, S, 3]`` uint8 frames at ``opts.fps``, resized to ``frame_size`` (bilinear)."""
    if not path.is_file():
        raise MediaError("missing_file", f"video file {path} does not exist; fix: correct the path or drop the row")
    try:
        info = video_info(path, backend=opts.backend)
        idx = frame_indices(info.num_frames, info.fps, opts.fps, opts.num_frames)
        frames = read_frames(path, idx, backend=opts.backend)
    except DataError as e:
        raise MediaError("bad_video", str(e)) from e
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(opts.frame_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ------------------------------------------------------------------------------------------------ rows


class _Bad(Exception):
    def __init__(self, reason: str, fld: str, value: Any, message: str, fix: str):
        super().__init__(message)
        self.details = (reason, fld, value, message, fix)


def _path(value: Any, fld: str, file: str) -> Path:
    if not isinstance(value, str) or not value:
        raise _Bad("bad_type", fld, value, "must be a non-empty file path string", "give the media file's path")
    p = Path(value).expanduser()
    if not p.is_absolute() and not p.exists():
        alt = Path(file).parent / p
        if alt.exists():
            return alt
    return p


def _detect(keys: set[str]) -> str | None:
    return next((f for f, sig in _SIGNATURES.items() if all(k in keys for k in sig)), None)


def _label(v: Any) -> float:
    if isinstance(v, bool) or v in (0, 1):
        return float(v)
    if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
        return float(v.lower() in ("true", "yes", "1"))
    raise _Bad("bad_label", "label", v, "must be a bool (or 0/1, 'true'/'false')", "label the audio 1 (good) or 0")


def _ranking(row: dict, k: int) -> list[float]:
    if "ranking" in row:
        r = row["ranking"]
        if not isinstance(r, list) or sorted(r) != list(range(k)):
            raise _Bad("bad_ranking", "ranking", r, f"must be a permutation of 0..{k - 1}", "rank every audio once")
        return [float(x) for x in r]
    s = row.get("scores")
    if not isinstance(s, list) or len(s) != k or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in s):
        raise _Bad("bad_ranking", "scores" if "scores" in row else "ranking", s,
                   f"ranked rows need 'ranking' (a permutation of 0..{k - 1}) or {k} finite 'scores'",
                   "add a ranking or scores column")
    order = sorted(range(k), key=lambda i: -s[i])
    ranks = [0.0] * k
    for pos, i in enumerate(order):
        ranks[i] = float(pos)
    return ranks


def _parse(row: dict, fmt: str, file: str) -> V2ARecord:
    video = _path(row.get("video"), "video", file)
    if fmt == "pairs":
        fields, labels = ["chosen", "rejected"], [0.0, 1.0]
    elif fmt in ("sft", "unpaired"):
        fields = ["audio"]
        labels = [_label(row["label"])] if fmt == "unpaired" else [float("nan")]
    else:
        audios = row["audios"]
        if not isinstance(audios, list) or len(audios) < 2:
            raise _Bad("bad_type", "audios", audios, "must be a list of at least 2 audio paths", "give 2+ audios")
        fields, labels = [f"audios.{i}" for i in range(len(audios))], _ranking(row, len(audios))
        row = {**row, **{f: a for f, a in zip(fields, audios, strict=True)}}
    audios = [_path(row[f], f, file) for f in fields]
    if len(audios) > 1 and len({a.resolve() for a in audios}) == 1:
        raise _Bad("identical_candidates", fields[-1], str(audios[-1]), "is the same file as the other candidates, "
                   "so the row holds no preference", "remove the row, or give it different audio")
    return V2ARecord(video, audios, labels, ("", 0), fields)


def load_v2a_records(sources: str | Path | Sequence[str | Path], opts: MediaOptions | None, *, format: str = "auto",
                     skip_bad_rows: bool = False, limit: int | None = None) -> tuple[list[V2ARecord], dict]:
    """Read and validate v2a rows; with ``opts`` every video and audio is opened and checked now. Returns
    ``(records, stats)``; bad rows raise one :class:`DataError` listing them (or are skipped and counted)."""
    if format not in ("auto", *V2A_FORMATS):
        raise ValueError(f"format={format!r} is not one of {['auto', *V2A_FORMATS]}")
    skipped: Counter = Counter()
    rows = load_rows(sources, limit=limit, skip_bad_rows=skip_bad_rows, skipped=skipped)
    fmt = format
    if fmt == "auto":
        found = Counter(_detect(set(r)) for _, _, r in rows)
        found.pop(None, None)
        if not found:
            raise DataError(f"{list(sources) if not isinstance(sources, (str, Path)) else sources}: cannot tell the "
                            "v2a row format; fix: rows need video + audio (sft), video + chosen + rejected (pairs), "
                            "video + audio + label (unpaired) or video + audios + ranking/scores (ranked)")
        fmt = found.most_common(1)[0][0]
    records, problems = [], []
    for file, number, row in rows:
        try:
            missing = [k for k in _SIGNATURES[fmt] if k not in row]
            if missing:
                raise _Bad("missing_field", missing[0], None, f"is missing (a {fmt} row needs {_SIGNATURES[fmt]})",
                           "add the field, or move the row to a file of its own format")
            rec = _parse(row, fmt, file)
            rec.origin = (file, number)
            if opts is not None:
                _check_media(rec, opts)
            records.append(rec)
        except _Bad as bad:
            if skip_bad_rows or bad.details[0] == "identical_candidates":
                skipped[bad.details[0]] += 1
            else:
                problems.append(RowProblem(file, number, *bad.details))
    if problems:
        raise DataError.from_problems(problems)
    stats = {"format": fmt, "rows": len(rows), "examples": len(records),
             **{f"skipped/{k}": v for k, v in skipped.items()}}
    if not records:
        raise DataError(f"no usable v2a examples in {sources} ({stats}); fix: check the rows and media files")
    return records, stats


def _check_media(rec: V2ARecord, opts: MediaOptions) -> None:
    for fld, path, loader in [("video", rec.video, load_clip_frames),
                              *((f, a, load_clip_audio) for f, a in zip(rec.fields, rec.audios, strict=True))]:
        try:
            loader(path, opts)
        except MediaError as e:
            fix = str(e).rpartition("fix: ")[2] or "replace the file or drop the row"
            raise _Bad(e.reason, fld, str(path), str(e).partition("; fix:")[0], fix) from e


# ------------------------------------------------------------------------------------------------ dataset


class V2ADataset(Dataset):
    """Records → examples → :class:`V2ABatch` (``collate``); the noise sampler draws each example's shared noise,
    flow time and null-condition flag (its ``drop_caption``) from ``(seed, index, epoch)``."""

    def __init__(self, records: list[V2ARecord], opts: MediaOptions, noise_sampler: NoiseSampler):
        self.records, self.opts, self.noise_sampler = records, opts, noise_sampler
        self._epoch: int | None = None
        self._visits: Counter = Counter()

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        epoch = self._epoch if self._epoch is not None else self._visits[index]
        self._visits[index] += 1
        rec = self.records[index]
        try:
            frames = load_clip_frames(rec.video, self.opts)
            waves = torch.stack([load_clip_audio(a, self.opts) for a in rec.audios])
        except MediaError as e:
            raise DataError(f"{rec.origin[0]}:{rec.origin[1]}: {e} (set v2a.check_media=true with "
                            "data.skip_bad_rows=true to drop such rows before training)") from e
        return {"index": index, "epoch": epoch, "frames": frames, "waves": waves, "labels": list(rec.labels),
                "meta": {"file": rec.origin[0], "row": rec.origin[1], "video": str(rec.video)}, "source": self}

    def collate(self, examples: Sequence[dict]) -> V2ABatch:
        src = examples[0]["source"]  # eval examples keep their own (fixed) noise sampler
        k = max(len(e["labels"]) for e in examples)
        draws = [src.noise_sampler.draw(e["index"], e["epoch"], k) for e in examples]
        mask = torch.tensor([[j < len(e["labels"]) for j in range(k)] for e in examples])
        labels = torch.tensor([e["labels"] + [float("nan")] * (k - len(e["labels"])) for e in examples])
        waves = torch.stack([torch.cat([e["waves"], e["waves"].new_zeros(k - len(e["waves"]), e["waves"].shape[1])])
                             for e in examples])
        extras = {key: torch.stack([d[key] for d in draws])
                  for key in ("noise", "timesteps", "sigmas", "vae_noise") if key in draws[0]}
        extras["null"] = torch.tensor([bool(d["drop_caption"]) for d in draws])
        return V2ABatch(frames=torch.stack([e["frames"] for e in examples]), waves=waves,
                        candidate_mask=None if bool(mask.all()) else mask, labels=labels,
                        meta=[e["meta"] for e in examples], extras=extras)

    def content_key(self) -> str:
        """Rows, media sizes/mtimes and the noise settings (for reference-score caches)."""
        h = hashlib.sha256()
        for r in self.records:
            for p in (r.video, *r.audios):
                st = p.stat() if p.exists() else None
                h.update(f"{p}:{st.st_size if st else 0}:{st.st_mtime_ns if st else 0}".encode())
            h.update(repr((r.origin, r.labels)).encode())
        h.update(f"{self.opts}:{self.noise_sampler.key()}".encode())
        return h.hexdigest()
