"""Audio-visual rows → clips: clip starts, the video's own audio stream, and every bad input (missing file, video
without frames, wrong sample rate / channels, silent, clipped, too short) as a DataError naming file and fix, or a
counted skip; conversions are counted."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmalign.data.audio import write_audio
from mmalign.data.av_clips import AVCollator, AVDataset, AVOptions, clip_starts, load_av_records
from mmalign.data.av_media import AVMedia
from mmalign.data.rows import DataError
from mmalign.data.synthetic_audio import Event, random_events, tone_bursts, visual_frames
from mmalign.data.synthetic_video import write_video

MEDIA = AVMedia()


def test_clip_starts_are_spread_and_at_least_min_shift_apart():
    even = clip_starts(3.0, 1.0, 3, 0.25)
    assert even == [0.0, 1.0, 2.0]
    assert clip_starts(3.0, 1.0, 1, 0.25) == [1.0]  # one clip: the middle
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = clip_starts(2.0, 1.0, 3, 0.3, generator=g)
        assert all(b - a >= 0.3 - 1e-6 for a, b in zip(s, s[1:], strict=False)) and s[-1] <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="need 1.500 s"):
        clip_starts(1.2, 1.0, 3, 0.25)


def test_dataset_cuts_clips_of_one_video_and_reads_a_muxed_audio_stream(av_rows):
    records, stats = load_av_records([av_rows], MEDIA, AVOptions())
    assert stats["rows"] == stats["used"] == 8
    muxed = [r for r in records if r.video.endswith(".mkv")]
    assert len(muxed) == 2 and all(r.audio == r.video for r in muxed)  # no "audio" key: the video's own stream
    ds = AVDataset(records, MEDIA, AVOptions(), seed=0)
    ex = ds[3]
    m = MEDIA
    assert ex["slow"].shape == (3, m.num_slow, 3, 32, 32) and ex["fast"].shape == (3, m.num_fast, 3, 16, 16)
    assert ex["mel"].shape == (3, 32, m.num_mel_frames)
    assert torch.equal(ds[3]["starts"], ex["starts"])  # deterministic in (seed, index): exact resume
    batch = AVCollator()([ds[0], ds[3]])
    assert batch.batch_size == 2 and batch.slow.shape[:2] == (2, 3) and batch.extras["starts"].shape == (2, 3)


def _video(tmp_path, name="v.mp4", seconds=2.0):
    events = random_events(3, duration=seconds, seed=1, min_len=0.1, max_len=0.2)
    write_video(tmp_path / name, visual_frames(events, duration=seconds, fps=16, size=32), 16)
    return events


def _rows(tmp_path, rows):
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _bad_inputs(tmp_path):
    """One row per kind of bad input (and two convertible ones); returns the rows file."""
    events = _video(tmp_path)
    wave = tone_bursts(events, duration=2.0, sample_rate=16000)
    write_audio(tmp_path / "ok.wav", wave, 16000)
    write_audio(tmp_path / "at_8k.wav", tone_bursts(events, duration=2.0, sample_rate=8000), 8000)
    write_audio(tmp_path / "stereo.wav", wave.repeat(2, 1), 16000)
    write_audio(tmp_path / "silent.wav", torch.zeros(1, 32000), 16000)
    write_audio(tmp_path / "clipped.wav", (wave * 50).clamp(-1, 1), 16000)
    write_audio(tmp_path / "short.wav", tone_bursts([Event(0.1, 0.2, 440.0)], duration=0.5), 16000)
    (tmp_path / "empty.mp4").write_bytes(b"")
    return _rows(tmp_path, [
        {"video": "v.mp4", "audio": "ok.wav"},
        {"video": "v.mp4", "audio": "at_8k.wav"},
        {"video": "v.mp4", "audio": "stereo.wav"},
        {"video": "v.mp4", "audio": "silent.wav"},
        {"video": "v.mp4", "audio": "clipped.wav"},
        {"video": "v.mp4", "audio": "short.wav"},
        {"video": "missing.mp4", "audio": "ok.wav"},
        {"video": "empty.mp4", "audio": "ok.wav"},
        {"video": "ok.wav", "audio": "ok.wav"},  # an audio file as video: no video stream
        {"video": "v.mp4"},  # an mp4 without an audio stream, and no audio file
    ])


def test_bad_rows_are_one_error_naming_files_and_fixes(tmp_path):
    rows = _bad_inputs(tmp_path)
    with pytest.raises(DataError) as err:
        load_av_records([rows], MEDIA, AVOptions())
    text = str(err.value)
    assert "7 bad audio-visual row(s)" in text and "data.skip_bad_rows=true" in text
    for needle in ("silent.wav: the audio is silent", "clipped.wav: ", "% of the samples are at full scale",
                   "short.wav", "[too_short]", "missing.mp4 does not exist", "empty.mp4", "[bad_video]",
                   "no audio stream", "rows.jsonl:4:", "fix:"):
        assert needle in text, needle


def test_skip_bad_rows_counts_each_reason_and_conversions(tmp_path):
    rows = _bad_inputs(tmp_path)
    records, stats = load_av_records([rows], MEDIA, AVOptions(skip_bad_rows=True))
    assert [r.audio.rsplit("/", 1)[1] for r in records] == ["ok.wav", "at_8k.wav", "stereo.wav"]
    assert stats["resampled"] == 1 and stats["downmixed"] == 1 and stats["used"] == 3 and stats["rows"] == 10
    assert {k: v for k, v in stats.items() if k.startswith("skipped/")} == {
        "skipped/silent_audio": 1, "skipped/clipped_audio": 1, "skipped/too_short": 1, "skipped/missing_file": 1,
        "skipped/bad_video": 2, "skipped/no_audio": 1}
    ex = AVDataset(records, MEDIA, AVOptions(), seed=0)[1]  # the resampled file gives the same shapes
    assert ex["mel"].shape == (3, 32, MEDIA.num_mel_frames) and math.isfinite(float(ex["mel"].sum()))


def test_convert_audio_false_refuses_other_rates_and_channels(tmp_path):
    rows = _bad_inputs(tmp_path)
    _, stats = load_av_records([rows], MEDIA, AVOptions(skip_bad_rows=True, convert_audio=False))
    assert stats["skipped/wrong_sample_rate"] == 1 and stats["skipped/not_mono"] == 1 and stats["used"] == 1
    with pytest.raises(DataError, match=r"sample rate 8000 Hz, the model takes 16000 Hz.*av.convert_audio=true"):
        load_av_records([_rows(tmp_path, [{"video": "v.mp4", "audio": "at_8k.wav"}])], MEDIA,
                        AVOptions(convert_audio=False))


def test_a_missing_video_field_names_the_row(tmp_path):
    _video(tmp_path)
    with pytest.raises(DataError, match=r"rows.jsonl:1: no 'video' field"):
        load_av_records([_rows(tmp_path, [{"clip": "v.mp4"}])], MEDIA, AVOptions())
