"""Deterministic synthetic video-to-audio data: videos of a flashing square and the tone bursts they should sound
like, written as the row files of every v2a format (:mod:`mmalign.data.v2a`).

Each clip is an event sequence (:mod:`mmalign.data.synthetic_audio`): the video shows a square whose brightness
follows the events and whose hue encodes the pitch; the matching audio is the tone bursts. Rejected / low-ranked
audios are *misaligned* renderings of the same events: shifted in time by ``shift`` s (the pitch kept) and, for
the worst rank, shifted further with the pitches rotated — so a preference for synchronised, pitch-correct audio
is learnable from the video. Not from any paper: the stand-in for MultiSoundGen's multi-event scenes (arXiv
2509.19999) in tests, configs and demos.

    python -m mmalign.data.synthetic_v2a outputs/v2a/data        # writes sft/pairs/unpaired/ranked .jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .audio import write_audio
from .synthetic_audio import PITCHES, Event, random_events, shift_events, tone_bursts, visual_frames
from .synthetic_video import write_video

__all__ = ["write_v2a_dataset"]


def _rotate(events: list[Event]) -> list[Event]:
    return [Event(e.onset, e.duration, PITCHES[(PITCHES.index(e.pitch) + 2) % len(PITCHES)]) for e in events]


def write_v2a_dataset(out_dir: str | Path, n: int = 8, *, duration: float = 1.0, sample_rate: int = 8000,
                      fps: float = 8.0, size: int = 16, n_events: int = 2, shift: float = 0.25, seed: int = 0,
                      prefix: str = "clip") -> dict[str, Path]:
    """Write ``n`` clips (``<prefix>_<i>.mp4`` + ``_good/_late/_wrong.wav``) and ``sft.jsonl``, ``pairs.jsonl``,
    ``unpaired.jsonl``, ``ranked.jsonl`` with paths relative to ``out_dir``; returns ``{format: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"sft": [], "pairs": [], "unpaired": [], "ranked": []}
    for i in range(n):
        events = random_events(n_events, duration=duration, seed=seed * 1000 + i, min_len=0.1, max_len=0.2,
                               min_gap=0.1)
        name = f"{prefix}_{i:03d}"
        write_video(out / f"{name}.mp4", visual_frames(events, duration=duration, fps=fps, size=size), fps)
        late = shift_events(events, shift, duration=duration) or events
        wrong = _rotate(shift_events(events, -shift, duration=duration) or events)
        audio = {}
        for tag, evs in (("good", events), ("late", late), ("wrong", wrong)):
            audio[tag] = f"{name}_{tag}.wav"
            write_audio(out / audio[tag], tone_bursts(evs, duration=duration, sample_rate=sample_rate), sample_rate)
        video = f"{name}.mp4"
        rows["sft"].append({"video": video, "audio": audio["good"]})
        rows["pairs"].append({"video": video, "chosen": audio["good"], "rejected": audio["late"]})
        rows["unpaired"].append({"video": video, "audio": audio["good" if i % 2 == 0 else "wrong"],
                                 "label": i % 2 == 0})
        rows["ranked"].append({"video": video, "audios": [audio["late"], audio["good"], audio["wrong"]],
                               "ranking": [1, 0, 2]})
    paths = {}
    for fmt, items in rows.items():
        paths[fmt] = out / f"{fmt}.jsonl"
        paths[fmt].write_text("".join(json.dumps(r) + "\n" for r in items))
    return paths


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "outputs/v2a/data"
    for fmt, path in write_v2a_dataset(target, n=int(sys.argv[2]) if len(sys.argv) > 2 else 16).items():
        print(f"{fmt}: {path}")
