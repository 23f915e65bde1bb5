"""Deterministic synthetic audio-visual clips: tone bursts and the matching per-frame visual event signal.

A clip is an *event sequence* — non-overlapping ``(onset, duration, pitch)`` events — rendered twice:

- audio (:func:`tone_bursts`): one sine burst per event, with raised-cosine fades so that onsets do not click;
- vision (:func:`visual_signal`): per video frame, the fraction of the frame interval covered by an event
  (1 = an event for the whole frame), and :func:`visual_frames`, tiny RGB frames whose brightness follows that
  signal and whose hue encodes the pitch.

So temporal alignment is measurable without any model: :func:`frame_envelope` turns audio into a per-frame
RMS envelope and :func:`best_lag` finds the frame shift that best matches it to the visual signal (0 for a
synchronised pair, k for audio delayed by k frames). This is the stand-in for the multi-event scenes of
MultiSoundGen (arXiv 2509.19999, §2 of research/video_audio_clip_prior.md) in tests and demos; it reproduces
nothing from the paper, whose multi-event selection rule is unknown (§2.7).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .audio import write_audio

PITCHES = (220.0, 330.0, 440.0, 660.0, 880.0)  # Hz; well apart in mel, all below 8 kHz / 2
FADE = 0.005  # seconds of raised-cosine fade at each end of a burst


@dataclass(frozen=True)
class Event:
    """One sound event: ``onset`` and ``duration`` in seconds, ``pitch`` in Hz."""

    onset: float
    duration: float
    pitch: float

    @property
    def end(self) -> float:
        return self.onset + self.duration


@dataclass(frozen=True)
class AVClip:
    """One synthetic clip: its events, the ``[1, N]`` wave at ``sample_rate`` and the ``[T]`` visual signal."""

    events: tuple[Event, ...]
    wave: Tensor
    sample_rate: int
    visual: Tensor
    fps: float
    duration: float


def _check_events(events: Sequence[Event], duration: float) -> None:
    prev_end = 0.0
    for i, e in enumerate(sorted(events, key=lambda e: e.onset)):
        # 1e-6 tolerance: random_events rounds times to microseconds
        if e.onset < 0 or e.duration <= 0 or e.end > duration + 1e-6 or e.pitch <= 0:
            raise ValueError(f"event {i} {e} must have onset >= 0, duration > 0, end <= {duration} s, pitch > 0")
        if e.onset < prev_end - 1e-6:
            raise ValueError(f"event {i} {e} overlaps the previous event (ends at {prev_end} s)")
        prev_end = e.end


def random_events(n_events: int, *, duration: float = 2.0, seed: int = 0, min_len: float = 0.1,
                  max_len: float = 0.3, min_gap: float = 0.1, pitches: Sequence[float] = PITCHES) -> list[Event]:
    """``n_events`` non-overlapping events in ``[0, duration]``, gaps >= ``min_gap`` (same seed → same events).

    Lengths are uniform in [min_len, max_len]; the free time is split into random gaps (a Dirichlet draw), so
    onsets are irregular — a model must follow the picture, not a rhythm.
    """
    if n_events < 0 or not 0 < min_len <= max_len or min_gap < 0:
        raise ValueError(f"need n_events >= 0, 0 < min_len <= max_len, min_gap >= 0; got {n_events}, "
                         f"{min_len}, {max_len}, {min_gap}")
    rng = np.random.default_rng(seed)
    lengths = rng.uniform(min_len, max_len, n_events)
    free = duration - lengths.sum() - min_gap * (n_events + 1)
    if free < 0:
        raise ValueError(f"{n_events} events of up to {max_len} s with gaps of {min_gap} s do not fit in "
                         f"{duration} s; fix: fewer or shorter events, or a longer duration")
    extra = rng.dirichlet(np.ones(n_events + 1)) * free
    out, t = [], 0.0
    for i in range(n_events):
        t += min_gap + extra[i]
        out.append(Event(round(float(t), 6), round(float(lengths[i]), 6), float(pitches[rng.integers(len(pitches))])))
        t += lengths[i]
    return out


def tone_bursts(events: Sequence[Event], *, duration: float, sample_rate: int = 16000,
                amplitude: float = 0.5) -> Tensor:
    """``[1, round(duration·sr)]`` float32 wave: a faded sine burst per event, silence elsewhere."""
    _check_events(events, duration)
    n = round(duration * sample_rate)
    wave = torch.zeros(n, dtype=torch.float64)
    for e in events:
        a, b = round(e.onset * sample_rate), min(n, round(e.end * sample_rate))
        t = torch.arange(b - a, dtype=torch.float64) / sample_rate
        env = torch.ones_like(t)
        k = min(round(FADE * sample_rate), (b - a) // 2)
        if k > 0:
            ramp = 0.5 - 0.5 * torch.cos(torch.linspace(0, math.pi, k, dtype=torch.float64))
            env[:k], env[-k:] = ramp, ramp.flip(0)
        wave[a:b] += amplitude * env * torch.sin(2 * math.pi * e.pitch * t)
    return wave.float()[None]


def visual_signal(events: Sequence[Event], *, duration: float, fps: float = 8.0) -> Tensor:
    """``[floor(duration·fps)]`` float32: the fraction of frame i's interval [i/fps, (i+1)/fps) inside an event."""
    _check_events(events, duration)
    frames = math.floor(duration * fps + 1e-9)
    starts = torch.arange(frames, dtype=torch.float64) / fps
    ends = starts + 1.0 / fps
    cover = torch.zeros(frames, dtype=torch.float64)
    for e in events:
        cover += (torch.minimum(ends, torch.tensor(e.end)) - torch.maximum(starts, torch.tensor(e.onset))).clamp_min(0)
    return (cover * fps).clamp(0, 1).float()


def visual_frames(events: Sequence[Event], *, duration: float, fps: float = 8.0, size: int = 16,
                  pitches: Sequence[float] = PITCHES) -> np.ndarray:
    """``[T, size, size, 3]`` uint8 frames: a centred square whose brightness is :func:`visual_signal` and whose
    hue is the active event's pitch (its index in ``pitches``, or grey for other pitches)."""
    signal = visual_signal(events, duration=duration, fps=fps).numpy()
    frames = np.zeros((len(signal), size, size, 3), np.uint8)
    lo, hi = size // 4, size - size // 4
    for i, s in enumerate(signal):
        a, b = i / fps, (i + 1) / fps
        overlap = [(min(b, e.end) - max(a, e.onset), e) for e in events]
        cover, event = max(overlap, key=lambda o: o[0], default=(0.0, None))
        colour = np.ones(3)
        if event is not None and cover > 0 and event.pitch in pitches:
            hue = list(pitches).index(event.pitch) / len(pitches)
            colour = np.array([abs(math.cos(math.pi * (hue + k / 3))) for k in range(3)])
        frames[i, lo:hi, lo:hi] = np.round(255 * s * colour).astype(np.uint8)
    return frames


def frame_envelope(wave: Tensor, sample_rate: int, fps: float, num_frames: int | None = None) -> Tensor:
    """``[T]`` RMS of the (channel-mean) wave over each video frame's interval, T = floor(N·fps/sr)."""
    x = wave.float().reshape(-1, wave.shape[-1]).mean(0)
    total = math.floor(x.shape[0] * fps / sample_rate + 1e-9)
    t = total if num_frames is None else min(num_frames, total)
    if t < 1:
        raise ValueError(f"a wave of {x.shape[0]} samples at {sample_rate} Hz is shorter than one frame at {fps} fps")
    bounds = [round(i * sample_rate / fps) for i in range(t + 1)]
    return torch.stack([x[a:b].pow(2).mean().sqrt() for a, b in zip(bounds[:-1], bounds[1:], strict=True)])


def best_lag(reference: Tensor, signal: Tensor, *, max_lag: int) -> tuple[int, float]:
    """``(lag, corr)``: the shift k in [-max_lag, max_lag] maximising the Pearson correlation of
    ``reference[t]`` with ``signal[t + k]`` (k > 0: ``signal`` is late), over the overlapping frames."""
    a, b = reference.double().flatten(), signal.double().flatten()
    n = min(len(a), len(b))
    if max_lag < 0 or n - max_lag < 2:
        raise ValueError(f"signals of {n} frames are too short for max_lag={max_lag}")
    best = (0, -math.inf)
    for k in range(-max_lag, max_lag + 1):
        x, y = (a[: n - k], b[k:n]) if k >= 0 else (a[-k:n], b[: n + k])
        x, y = x - x.mean(), y - y.mean()
        denom = float(x.norm() * y.norm())
        corr = float((x * y).sum()) / denom if denom > 0 else 0.0
        if corr > best[1] + 1e-12:
            best = (k, corr)
    return best


def shift_events(events: Sequence[Event], offset: float, *, duration: float) -> list[Event]:
    """Events moved by ``offset`` seconds (clipped to the clip; events pushed out entirely are dropped): a
    temporally misaligned candidate for ranking tests."""
    out = []
    for e in events:
        a, b = max(0.0, e.onset + offset), min(duration, e.end + offset)
        if b - a > 1e-6:
            out.append(Event(a, b - a, e.pitch))
    return out


def make_clip(n_events: int = 4, *, duration: float = 2.0, sample_rate: int = 16000, fps: float = 8.0,
              seed: int = 0, **event_kwargs) -> AVClip:
    """One deterministic :class:`AVClip` (see :func:`random_events` for ``event_kwargs``)."""
    events = tuple(random_events(n_events, duration=duration, seed=seed, **event_kwargs))
    wave = tone_bursts(events, duration=duration, sample_rate=sample_rate)
    return AVClip(events, wave, sample_rate, visual_signal(events, duration=duration, fps=fps), fps, duration)


def write_clips(clips: Sequence[AVClip], out_dir: str | Path, *, prefix: str = "clip") -> Path:
    """Write each clip's wave to ``<prefix>_<i>.wav`` and a ``<prefix>s.jsonl`` manifest (audio path relative
    to ``out_dir``, events, fps, visual signal); returns the manifest path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, c in enumerate(clips):
        name = f"{prefix}_{i:05d}.wav"
        write_audio(out_dir / name, c.wave, c.sample_rate)
        lines.append(json.dumps({"audio": name, "video": f"{prefix}_{i:05d}", "duration": c.duration,
                                 "sample_rate": c.sample_rate, "fps": c.fps,
                                 "events": [asdict(e) for e in c.events],
                                 "visual": [round(float(v), 6) for v in c.visual]}))
    manifest = out_dir / f"{prefix}s.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
