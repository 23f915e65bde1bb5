"""Synthetic audio-visual videos for the SF-CAVP-style model's tests and demo: flashes with matching tone bursts.

Each video is an irregular event sequence (:func:`mmalign.data.synthetic_audio.random_events`) rendered as frames
whose centre square lights up during each event, its hue naming the event's pitch
(:func:`~mmalign.data.synthetic_audio.visual_frames`), and as audio with one tone burst per event
(:func:`~mmalign.data.synthetic_audio.tone_bursts`). So the slow (semantic) stream can learn hue ↔ pitch, and the
fast (dynamic) stream flash onsets ↔ sound onsets; shifting the audio breaks only the latter. Not from any paper:
a stand-in for MultiSoundGen's multi-event scenes (arXiv 2509.19999; research note §2.7: its selection rule is
unknown).

Files: ``video_<i>.mp4`` (no audio stream) + ``video_<i>.wav``, or, every ``mux_every``-th video, one
``video_<i>.mkv`` holding both streams (PCM audio, so no codec delay) and a row without ``audio`` (the loader then
reads the video's own audio stream). ``rows.jsonl`` lists them, paths relative to its folder.

    python -m mmalign.data.synthetic_av outputs/av_synth 32     # 32 videos + rows.jsonl
"""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

from .audio import write_audio
from .synthetic_audio import random_events, tone_bursts, visual_frames
from .synthetic_video import available_codec, write_video

__all__ = ["write_av_video", "write_synthetic_av"]


def write_av_video(path: str | Path, frames: np.ndarray, fps: float, wave, sample_rate: int) -> Path:
    """One ``.mkv`` with an H.264/MPEG-4 video stream and a PCM 16-bit audio stream (``wave``: ``[C, N]`` in
    [-1, 1]) — a video file that carries its own sound."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.asarray(wave, dtype=np.float32)
    x = x[None] if x.ndim == 1 else x
    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)
    layout = {1: "mono", 2: "stereo"}[pcm.shape[0]]
    with av.open(str(path), "w", format="matroska") as container:
        vs = container.add_stream(available_codec(), rate=Fraction(fps).limit_denominator(1001))
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream = container.add_stream("pcm_s16le", rate=sample_rate)
        stream.layout = layout
        for frame in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in vs.encode():
            container.mux(packet)
        # packed s16 is [1, N·C] (interleaved)
        af = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm.T.reshape(1, -1)), format="s16", layout=layout)
        af.sample_rate, af.pts = sample_rate, 0
        for packet in stream.encode(af):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_synthetic_av(out_dir: str | Path, n_videos: int = 16, *, seed: int = 0, duration: float = 3.0,
                       fps: float = 16.0, size: int = 32, sample_rate: int = 16000, n_events: int = 5,
                       mux_every: int = 0, audio_sample_rate: int | None = None, stereo: bool = False) -> Path:
    """Write ``n_videos`` synthetic videos and ``rows.jsonl`` to ``out_dir``; returns the rows file.

    ``audio_sample_rate``/``stereo`` write the ``.wav`` files at another rate / with two (equal) channels, to
    exercise the loader's conversions. Deterministic in ``seed``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sr = audio_sample_rate or sample_rate
    lines = []
    for i in range(n_videos):
        events = random_events(n_events, duration=duration, seed=seed * 10_007 + i, min_len=0.1, max_len=0.25,
                               min_gap=0.12)
        frames = visual_frames(events, duration=duration, fps=fps, size=size)
        wave = tone_bursts(events, duration=duration, sample_rate=sr)
        if stereo:
            wave = wave.repeat(2, 1)
        meta = {"events": [[e.onset, e.duration, e.pitch] for e in events]}
        if mux_every and i % mux_every == mux_every - 1:
            write_av_video(out / f"video_{i:04d}.mkv", frames, fps, wave.numpy(), sr)
            lines.append({"video": f"video_{i:04d}.mkv", **meta})
        else:
            write_video(out / f"video_{i:04d}.mp4", frames, fps)
            write_audio(out / f"video_{i:04d}.wav", wave, sr)
            lines.append({"video": f"video_{i:04d}.mp4", "audio": f"video_{i:04d}.wav", **meta})
    rows = out / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return rows


if __name__ == "__main__":  # python -m mmalign.data.synthetic_av OUT_DIR [N_VIDEOS]
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m mmalign.data.synthetic_av OUT_DIR [N_VIDEOS]")
    print(write_synthetic_av(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 16))
