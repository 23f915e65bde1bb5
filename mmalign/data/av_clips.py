"""Audio-visual rows → clips of one video → :class:`AVBatch` (``modality: av``, the SF-CAVP-style model).

Rows (``.jsonl`` / ``.json`` / ``.parquet``): ``{"video": path, "audio": path}``; ``audio`` is optional (absent:
the video file's own audio stream). Relative paths resolve against ``av.media_root``, else the data file's folder.

One **example is one video**: :class:`AVDataset` cuts ``clips_per_video`` clips of ``clip_seconds`` from it, their
starts at least ``min_shift`` seconds apart (Diff-Foley's ``--intra_clip_num 3 --shift_lb 8``, research note
§2.3, cuts time-shifted clips of the same video for its intra-video term). Because a video is one example, the
loop's :class:`~mmalign.train.data_order.BatchOrder` hands all its clips to one rank: the block-diagonal intra term
never sees a video split across ranks (the §2.3 distributed pitfall), whatever the world size. Clip starts are
drawn from ``(seed, index)``, so a resumed run sees exactly the same clips.

Bad input, checked when the data is loaded (``check_media=True``, the default: every file is decoded once), each a
:class:`DataError` naming file, row and fix, or with ``data.skip_bad_rows=true`` a skip counted under its reason:
a missing file [``missing_file``], a video without frames or that cannot be decoded [``bad_video``], no audio file
and no audio stream [``no_audio``], silent audio (peak < ``silence_peak``) [``silent_audio``], clipped audio (more
than ``max_clipped`` of the samples at full scale) [``clipped_audio``], too short for the clips [``too_short``].
A sample rate other than the model's and multi-channel audio are **converted** (resampled with torchaudio's sinc
resampler, channels averaged) and counted (``data/resampled``, ``data/downmixed``); with ``convert_audio=false``
they are refused instead [``wrong_sample_rate``, ``not_mono``].
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..types import CandidateBatch
from .audio import read_audio
from .av_media import AVMedia, frame_indices, stream_times
from .row_files import DataError, load_rows
from .video import read_frames, video_info

__all__ = ["AVBatch", "AVCollator", "AVDataset", "AVOptions", "AVRecord", "clip_starts", "load_av_records"]


@dataclass(frozen=True)
class AVOptions:
    """How rows become clips (the ``av:`` section's data keys)."""

    clips_per_video: int = 3
    min_shift: float = 0.25
    media_root: str | None = None
    convert_audio: bool = True
    check_media: bool = True
    silence_peak: float = 1e-3
    max_clipped: float = 0.01
    skip_bad_rows: bool = False
    limit: int | None = None


@dataclass
class AVRecord:
    """One usable video: paths, its frame count and rate, and the usable duration (min of video and audio)."""

    video: str
    audio: str
    num_frames: int
    fps: float
    duration: float
    origin: str


@dataclass
class AVBatch(CandidateBatch):
    """B videos × C clips. ``slow``: ``[B, C, Ts, 3, S, S]`` normalised frames; ``fast``: ``[B, C, Tf, 3, s, s]`` in
    [0, 1]; ``mel``: ``[B, C, n_mels, F]`` log-mel; ``extras["starts"]``: ``[B, C]`` clip starts (s)."""

    slow: Tensor
    fast: Tensor
    mel: Tensor
    candidate_mask: Tensor | None = None
    labels: Tensor | None = None
    meta: list[dict] = field(default_factory=list)
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.slow.shape[0]

    @property
    def num_candidates(self) -> int:
        return 1


def clip_starts(duration: float, clip_seconds: float, n: int, min_shift: float, *,
                generator: torch.Generator | None = None) -> list[float]:
    """``n`` sorted clip starts in ``[0, duration − clip_seconds]``, consecutive ones ≥ ``min_shift`` apart: the
    slack is split at ``n`` uniform points (random with ``generator``, else evenly spread)."""
    slack = duration - clip_seconds - (n - 1) * min_shift
    if slack < -1e-9:
        raise ValueError(f"{n} clips of {clip_seconds} s at least {min_shift} s apart need "
                         f"{clip_seconds + (n - 1) * min_shift:.3f} s, the video has {duration:.3f} s")
    slack = max(0.0, slack)
    if generator is None:
        u = [0.5] if n == 1 else [i / (n - 1) for i in range(n)]
    else:
        u = sorted(torch.rand(n, generator=generator, dtype=torch.float64).tolist())
    return [round(slack * x + i * min_shift, 6) for i, x in enumerate(u)]


def _resolve(value, key: str, base: Path, file: str, number: int) -> Path:
    if not isinstance(value, str) or not value:
        raise DataError(f"{file}:{number}: field {key!r} must be a non-empty path string (got {value!r}); fix: "
                        f'write rows as {{"video": "clips/a.mp4", "audio": "clips/a.wav"}} (audio optional)')
    p = Path(value)
    return p if p.is_absolute() else base / p


def _read_checked_audio(path: Path, media: AVMedia, opts: AVOptions, counts: Counter | None) -> Tensor:
    """``[N]`` mono audio at the model's rate, with the conversions / refusals of the module docstring."""
    wave, sr = read_audio(path, mono=False)
    if wave.shape[0] > 1:
        if not opts.convert_audio:
            raise DataError(f"{path}: {wave.shape[0]} audio channels, the model takes mono [not_mono]; fix: "
                            "av.convert_audio=true (channels averaged) or `ffmpeg -i IN -ac 1 OUT.wav`")
        wave = wave.mean(0, keepdim=True)
        if counts is not None:
            counts["downmixed"] += 1
    if sr != media.sample_rate:
        if not opts.convert_audio:
            raise DataError(f"{path}: sample rate {sr} Hz, the model takes {media.sample_rate} Hz "
                            f"[wrong_sample_rate]; fix: av.convert_audio=true (resampled) or `ffmpeg -i IN -ar "
                            f"{media.sample_rate} OUT.wav`")
        import torchaudio.functional as AF

        wave = AF.resample(wave, orig_freq=sr, new_freq=media.sample_rate)
        if counts is not None:
            counts["resampled"] += 1
    x = wave[0]
    peak = float(x.abs().max())
    if peak < opts.silence_peak:
        raise DataError(f"{path}: the audio is silent (peak {peak:.2e} < av.silence_peak={opts.silence_peak}) "
                        "[silent_audio]; fix: drop the row (a silent clip has nothing to align) or lower "
                        "av.silence_peak")
    clipped = float((x.abs() >= 0.999).float().mean())
    if clipped > opts.max_clipped:
        raise DataError(f"{path}: {clipped:.1%} of the samples are at full scale (clipped; av.max_clipped="
                        f"{opts.max_clipped}) [clipped_audio]; fix: re-record or lower the gain, drop the row, or "
                        "raise av.max_clipped")
    return x


def _reason(err: DataError) -> str:
    text = str(err)
    return text[text.rindex("[") + 1:text.rindex("]")] if "[" in text and "]" in text else "bad_media"


def _record(row: dict, file: str, number: int, media: AVMedia, opts: AVOptions, counts: Counter) -> AVRecord:
    base = Path(opts.media_root) if opts.media_root else Path(file).parent
    if "video" not in row:
        raise DataError(f"{file}:{number}: no 'video' field (keys: {sorted(row)}) [missing_field]; fix: add "
                        '"video": "path.mp4"')
    video = _resolve(row["video"], "video", base, file, number)
    audio = _resolve(row["audio"], "audio", base, file, number) if row.get("audio") is not None else video
    for p, key in ((video, "video"), (audio, "audio")):
        if not p.is_file():
            raise DataError(f"{file}:{number}: {key} file {p} does not exist [missing_file]; fix: correct the path "
                            f"(relative paths start at {base}; set av.media_root to change that) or drop the row")
    try:
        info = video_info(video)
        if opts.check_media and info.num_frames > 0:
            # The header's frame count is a promise: a truncated download keeps its index but lost the frames at
            # the end, which would fail only mid-training. Decoding the last frame checks it at load.
            read_frames(video, [info.num_frames - 1])
    except DataError as e:
        raise DataError(f"{file}:{number}: {e} [bad_video]") from e
    if info.num_frames < 1 or not info.fps > 0:
        raise DataError(f"{file}:{number}: {video} has {info.num_frames} frames at {info.fps} fps [bad_video]; "
                        "fix: re-encode it or drop the row")
    duration = info.num_frames / info.fps
    if opts.check_media:
        try:
            wave = _read_checked_audio(audio, media, opts, counts)
        except DataError as e:
            msg = str(e)
            if "no audio stream" in msg:
                msg += " [no_audio]"
            raise DataError(f"{file}:{number}: {msg}") from e
        duration = min(duration, wave.shape[0] / media.sample_rate)
    need = media.clip_seconds + (opts.clips_per_video - 1) * opts.min_shift
    if duration + 1e-6 < need:
        raise DataError(f"{file}:{number}: {video} with audio {audio} lasts {duration:.3f} s (the shorter of the "
                        f"two), {opts.clips_per_video} clips of {media.clip_seconds} s at least {opts.min_shift} s "
                        f"apart need {need:.3f} s [too_short]; "
                        "fix: drop the row, or lower av.clips_per_video / av.min_shift / av.clip_seconds")
    return AVRecord(str(video), str(audio), info.num_frames, info.fps, duration, f"{file}:{number}")


def load_av_records(sources, media: AVMedia, opts: AVOptions) -> tuple[list[AVRecord], dict[str, float]]:
    """Usable records of the row files ``sources`` and data stats (rows, used, ``skipped/<reason>``, resampled,
    downmixed). Without ``skip_bad_rows`` every bad row is reported in one :class:`DataError`."""
    skipped, counts = Counter(), Counter()
    rows = load_rows(sources, limit=opts.limit, skip_bad_rows=opts.skip_bad_rows, skipped=skipped)
    records, problems = [], []
    for file, number, row in rows:
        try:
            records.append(_record(row, file, number, media, opts, counts))
        except DataError as e:
            if not opts.skip_bad_rows:
                problems.append(str(e))
            skipped[_reason(e)] += 1
    if problems:
        shown = problems[:10]
        raise DataError(f"{len(problems)} bad audio-visual row(s) (first {len(shown)} shown); fix them, or set "
                        "data.skip_bad_rows=true to skip and count them:\n" + "\n".join(f"  - {p}" for p in shown))
    if not records:
        raise DataError(f"no usable audio-visual rows in {sources} (skipped: {dict(skipped)}); fix: check the paths "
                        "and the media files")
    stats = {"rows": float(len(rows)), "used": float(len(records)), **{f"skipped/{k}": float(v)
                                                                          for k, v in skipped.items()}}
    stats.update({k: float(v) for k, v in counts.items()})
    return records, stats


class AVDataset(torch.utils.data.Dataset):
    """One example per :class:`AVRecord`: ``clips_per_video`` clips (see the module docstring)."""

    def __init__(self, records: list[AVRecord], media: AVMedia, opts: AVOptions, *, seed: int = 0,
                 random_starts: bool = True):
        self.records, self.media, self.opts = records, media, opts
        self.seed, self.random_starts = seed, random_starts

    def __len__(self) -> int:
        return len(self.records)

    def starts(self, index: int) -> list[float]:
        rec = self.records[index]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index) if self.random_starts else None
        return clip_starts(rec.duration, self.media.clip_seconds, self.opts.clips_per_video, self.opts.min_shift,
                           generator=gen)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        starts = self.starts(index)
        return {**self.read(rec, starts), "starts": torch.tensor(starts), "origin": rec.origin}

    def read(self, rec: AVRecord, starts: list[float], audio_starts: list[float] | None = None) -> dict:
        """Slow/fast frames and mel of the clips at ``starts`` (audio windows at ``audio_starts``, default the
        same: a shifted window gives a misaligned pair, as the offset evaluation uses)."""
        m = self.media
        slow_t = [stream_times(s, m.clip_seconds, m.slow_fps, m.num_slow) for s in starts]
        fast_t = [stream_times(s, m.clip_seconds, m.fast_fps, m.num_fast) for s in starts]
        idx = [frame_indices(t, rec.fps, rec.num_frames) for t in (*slow_t, *fast_t)]
        unique = sorted({i for ids in idx for i in ids})
        try:
            frames = read_frames(rec.video, unique)
        except DataError as e:
            raise DataError(f"{rec.origin}: {e}") from e
        pos = {f: k for k, f in enumerate(unique)}
        pick = [frames[[pos[i] for i in ids]] for ids in idx]
        c = len(starts)
        slow = torch.stack([m.slow_pixels(p) for p in pick[:c]])
        fast = torch.stack([m.fast_pixels(p) for p in pick[c:]])
        try:
            wave = _read_checked_audio(Path(rec.audio), m, self.opts, None)
        except DataError as e:
            raise DataError(f"{rec.origin}: {e}") from e
        windows = []
        for s in audio_starts if audio_starts is not None else starts:
            a = round(s * m.sample_rate)
            seg = wave[max(0, a):max(0, a + m.num_samples)]
            lead = max(0, -a)  # a window shifted before 0 s is zero-padded at the front
            seg = torch.cat([seg.new_zeros(lead), seg])
            windows.append(seg)
        mel = torch.stack([m.mel_of(w) for w in windows])
        return {"slow": slow, "fast": fast, "mel": mel}


class AVCollator:
    """Examples of :class:`AVDataset` → :class:`AVBatch`."""

    def __call__(self, examples: list[dict]) -> AVBatch:
        extras = {"starts": torch.stack([ex["starts"] for ex in examples])}
        return AVBatch(torch.stack([ex["slow"] for ex in examples]), torch.stack([ex["fast"] for ex in examples]),
                       torch.stack([ex["mel"] for ex in examples]), meta=[{"origin": ex["origin"]} for ex in examples],
                       extras=extras)

