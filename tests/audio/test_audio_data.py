"""Audio I/O, mel presets and sequence arithmetic (``mmalign.data.audio``), synthetic AV clips
(``mmalign.data.synthetic_audio``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from mmalign.config import ConfigError
from mmalign.data import synthetic_audio as S
from mmalign.data.audio import (
    MEL_PRESETS,
    SEQUENCE_PRESETS,
    MelConfig,
    SequenceConfig,
    fit_length,
    mel_spectrogram,
    read_audio,
    write_audio,
)
from mmalign.data.rows import DataError

SR = 16000


def tone(freq: float, seconds: float = 0.5, sr: int = SR, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(round(seconds * sr), dtype=torch.float64) / sr
    return (amp * torch.sin(2 * math.pi * freq * t)).float()[None]


def peak_hz(wave: torch.Tensor, sr: int) -> float:
    spec = torch.fft.rfft(wave.double().flatten() * torch.hann_window(wave.shape[-1], dtype=torch.float64))
    return float(spec.abs().argmax()) * sr / wave.shape[-1]


# ------------------------------------------------------------------------------------------------ read/write


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_round_trip_pcm16(tmp_path, suffix):
    wave = torch.cat([tone(440), 0.5 * tone(1000)])  # stereo
    path = write_audio(tmp_path / f"x{suffix}", wave, SR)
    back, sr = read_audio(path, mono=False)
    assert sr == SR and back.dtype == torch.float32 and back.shape == wave.shape
    assert (back - wave).abs().max() <= 1.0 / 32768 + 1e-6  # PCM_16 quantisation only
    mono, _ = read_audio(path)
    assert mono.shape == (1, wave.shape[1])
    torch.testing.assert_close(mono[0], back.mean(0))


def test_float_wav_is_lossless_and_window(tmp_path):
    wave = torch.randn(1, SR) * 0.3
    path = write_audio(tmp_path / "f.wav", wave, SR, subtype="FLOAT")
    back, _ = read_audio(path)
    assert torch.equal(back, wave)
    part, _ = read_audio(path, start=0.25, duration=0.125)
    assert torch.equal(part, wave[:, 4000:6000])


def test_resample_length_and_frequency(tmp_path):
    path = write_audio(tmp_path / "t.wav", tone(1000, seconds=0.3, sr=44100), 44100)
    wave, sr = read_audio(path, sample_rate=SR)
    n = round(0.3 * 44100)
    g = math.gcd(44100, SR)
    assert sr == SR and wave.shape == (1, math.ceil(n * (SR // g) / (44100 // g)))  # torchaudio's length rule
    assert abs(peak_hz(wave, SR) - 1000) <= SR / wave.shape[-1]  # within one FFT bin


def _write_av(path, wave: np.ndarray, sr: int, codec: str) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=sr, layout="mono" if wave.shape[0] == 1 else "stereo")
        if codec == "pcm_s16le":
            frame = av.AudioFrame.from_ndarray((wave.T.reshape(1, -1) * 32767).astype(np.int16), format="s16",
                                               layout=s.layout.name)
        else:
            frame = av.AudioFrame.from_ndarray(wave.astype(np.float32), format="fltp", layout=s.layout.name)
        frame.sample_rate, frame.pts = sr, 0
        for packet in [*s.encode(frame), *s.encode(None)]:
            c.mux(packet)


def test_pyav_reads_pcm_track_of_mkv_and_mov(tmp_path):
    import av

    if "pcm_s16le" not in av.codecs_available:
        pytest.skip("FFmpeg build without a pcm_s16le encoder")
    wave = torch.cat([tone(440), -0.5 * tone(440)]).numpy()
    for suffix in (".mkv", ".mov"):
        path = tmp_path / f"a{suffix}"
        _write_av(path, wave, SR, "pcm_s16le")
        with pytest.raises(sf.LibsndfileError):
            sf.info(str(path))  # so the PyAV path is the one under test
        back, sr = read_audio(path, mono=False)
        assert sr == SR and back.shape == wave.shape
        assert np.abs(back.numpy() - wave).max() < 1e-4
        part, _ = read_audio(path, mono=False, start=0.1, duration=0.2)
        assert np.abs(part.numpy() - wave[:, 1600:4800]).max() < 1e-4


def test_pyav_reads_aac_m4a(tmp_path):
    import av

    if "aac" not in av.codecs_available:
        pytest.skip("FFmpeg build without an aac encoder")
    path = tmp_path / "a.m4a"
    _write_av(path, tone(440).numpy(), SR, "aac")
    back, sr = read_audio(path, sample_rate=8000)
    assert sr == 8000 and back.shape[0] == 1
    assert abs(back.shape[1] - 4000) <= 2048  # encoder delay/padding only (AAC frames of 1024)
    assert abs(peak_hz(back, 8000) - 440) <= 2 * 8000 / back.shape[-1]


def test_read_errors_name_file_and_fix(tmp_path):
    with pytest.raises(DataError, match=r"missing\.wav does not exist; fix"):
        read_audio(tmp_path / "missing.wav")
    with pytest.raises(DataError, match="is a directory"):
        read_audio(tmp_path)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match=r"junk\.wav: cannot read audio.*fix"):
        read_audio(junk)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros((0, 1), np.float32), SR)
    with pytest.raises(DataError, match=r"empty\.wav: no audio samples"):
        read_audio(empty)
    short = write_audio(tmp_path / "short.wav", tone(440, 0.1), SR)
    with pytest.raises(DataError, match="from start=5"):
        read_audio(short, start=5.0)
    nan = tmp_path / "nan.wav"
    sf.write(str(nan), np.array([[0.1], [np.nan]], np.float32), SR, subtype="FLOAT")
    with pytest.raises(DataError, match="NaN"):
        read_audio(nan)
    with pytest.raises(ValueError, match="sample_rate"):
        read_audio(short, sample_rate=0)
    with pytest.raises(ValueError, match="duration"):
        read_audio(short, duration=-1.0)


def test_no_audio_stream(tmp_path):
    import av

    path = tmp_path / "silent_film.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
        frames = [av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24") for _ in range(3)]
        for packet in [p for f in frames for p in s.encode(f)] + list(s.encode(None)):
            c.mux(packet)
    with pytest.raises(DataError, match=r"silent_film\.mp4: the file has no audio stream.*video"):
        read_audio(path)


def test_write_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\.mp3"):
        write_audio(tmp_path / "x.mp3", tone(440), SR)
    with pytest.raises(ValueError, match="would clip"):
        write_audio(tmp_path / "x.wav", 3 * tone(440), SR)
    write_audio(tmp_path / "loud.wav", 3 * tone(440), SR, subtype="FLOAT")  # float wav keeps > 1
    assert read_audio(tmp_path / "loud.wav")[0].abs().max() > 1.4
    with pytest.raises(ValueError, match="NaN"):
        write_audio(tmp_path / "x.wav", torch.tensor([0.0, float("nan")]), SR)


# ------------------------------------------------------------------------------------------------------ mel


def test_mel_presets_follow_the_note():
    d, m16, m44 = MEL_PRESETS["diff_foley_16k"], MEL_PRESETS["mmaudio_16k"], MEL_PRESETS["mmaudio_44k"]
    assert (d.sample_rate, d.n_fft, d.hop_length, d.win_length, d.n_mels, d.f_min, d.f_max, d.power, d.log) == (
        16000, 1024, 256, 1024, 128, 125.0, 7600.0, 1.0, "log10")
    assert (m16.sample_rate, m16.n_fft, m16.hop_length, m16.n_mels, m16.f_min, m16.f_max) == (
        16000, 1024, 256, 80, 0.0, 8000.0)
    assert (m44.sample_rate, m44.n_fft, m44.hop_length, m44.win_length, m44.n_mels, m44.f_max) == (
        44100, 2048, 512, 2048, 128, 22050.0)


@pytest.mark.parametrize("name", sorted(MEL_PRESETS))
def test_tone_peaks_in_its_mel_bin(name):
    import torchaudio.functional as AF

    cfg = MEL_PRESETS[name]
    n_freqs = cfg.n_fft // 2 + 1
    fb = AF.melscale_fbanks(n_freqs, cfg.f_min, cfg.f_max, cfg.n_mels, cfg.sample_rate, cfg.norm, cfg.mel_scale)
    freqs = torch.linspace(0, cfg.sample_rate / 2, n_freqs)
    for target in (cfg.n_mels // 4, cfg.n_mels // 2):
        hz = float(freqs[fb[:, target].argmax()])  # the FFT bin where this mel filter peaks
        mel = mel_spectrogram(tone(hz, 0.25, cfg.sample_rate)[0], cfg, sample_rate=cfg.sample_rate)
        assert mel.shape[0] == cfg.n_mels
        assert int(mel.mean(1).argmax()) == target


@pytest.mark.parametrize("name", sorted(MEL_PRESETS))
@pytest.mark.parametrize("n", [4000, 4096, 4321])
def test_mel_frame_count_exact(name, n):
    cfg = MEL_PRESETS[name]
    mel = mel_spectrogram(torch.randn(2, n) * 0.1, cfg)
    expected = 1 + n // cfg.hop_length if cfg.padding == "center" else \
        1 + (n + 2 * ((cfg.n_fft - cfg.hop_length) // 2) - cfg.n_fft) // cfg.hop_length
    assert mel.shape == (2, cfg.n_mels, expected) and cfg.num_frames(n) == expected
    assert torch.isfinite(mel).all()


def test_mel_log_floor_and_base():
    silence = torch.zeros(2048)
    assert torch.allclose(mel_spectrogram(silence, "diff_foley_16k"), torch.tensor(-5.0))  # log10(1e-5)
    assert torch.allclose(mel_spectrogram(silence, "mmaudio_16k"), torch.tensor(math.log(1e-5)))
    base10 = MEL_PRESETS["mmaudio_16k"].__class__(**{**MEL_PRESETS["mmaudio_16k"].__dict__, "log": "log10"})
    wave = tone(700, 0.2)[0]
    torch.testing.assert_close(mel_spectrogram(wave, base10) * math.log(10), mel_spectrogram(wave, "mmaudio_16k"))


def test_mel_errors():
    with pytest.raises(ConfigError, match="diff_foley_16k"):
        mel_spectrogram(torch.zeros(100), "nope")
    with pytest.raises(ValueError, match="16000 Hz but.*sample_rate=44100"):
        mel_spectrogram(torch.zeros(4000), "mmaudio_44k", sample_rate=16000)
    with pytest.raises(ConfigError) as e:
        MelConfig(16000, 512, 0, 1024, 80, 0.0, 9000.0, log="log2")
    text = str(e.value)
    assert "hop_length=0" in text and "Nyquist" in text and "log2" in text


# ------------------------------------------------------------------------------------------------- sequence


def test_mmaudio_sequence_numbers():
    s16, s44 = SEQUENCE_PRESETS["mmaudio_16k"], SEQUENCE_PRESETS["mmaudio_44k"]
    assert (s16.duration, s16.clip_seq_len, s16.sync_seq_len, s16.latent_seq_len, s16.num_audio_samples) == (
        8.0, 64, 192, 250, 128000)
    assert (s44.clip_seq_len, s44.sync_seq_len, s44.latent_seq_len, s44.num_audio_samples) == (64, 192, 345, 353280)
    assert s16.sync_num_segments == 24
    # 44.1 kHz rounds up to whole latents: slightly longer than 8 s
    assert s44.num_audio_samples > 8 * 44100 and s16.num_audio_samples == 8 * 16000


@pytest.mark.parametrize("name", sorted(SEQUENCE_PRESETS))
def test_sequence_and_mel_agree(name):
    seq = SEQUENCE_PRESETS[name]
    cfg = seq.mel(name)
    mel = mel_spectrogram(torch.zeros(seq.num_audio_samples), cfg)
    assert mel.shape[-1] == seq.num_spec_frames == 2 * seq.latent_seq_len
    with pytest.raises(ConfigError, match="does not match"):
        SEQUENCE_PRESETS["mmaudio_44k"].mel("mmaudio_16k")


def test_sequence_config_derives_other_durations_and_validates():
    s = SequenceConfig(duration=10.0)
    assert (s.clip_seq_len, s.latent_seq_len, s.num_audio_samples) == (80, 313, 313 * 512)
    assert s.sync_seq_len == ((250 - 16) // 8 + 1) * 8
    with pytest.raises(ConfigError, match="hop_length=0"):
        SequenceConfig(hop_length=0)
    with pytest.raises(ConfigError, match="shorter than one"):
        SequenceConfig(duration=0.5)


def test_fit_length():
    x = torch.arange(6.0)[None]
    assert torch.equal(fit_length(x, 4), x[:, :4])
    assert torch.equal(fit_length(x, 8), torch.cat([x, torch.zeros(1, 2)], 1))


# ------------------------------------------------------------------------------------------------ synthetic


def test_events_are_deterministic_and_valid():
    a, b = S.random_events(5, duration=3.0, seed=7), S.random_events(5, duration=3.0, seed=7)
    assert a == b and a != S.random_events(5, duration=3.0, seed=8)
    for prev, nxt in zip(a, a[1:], strict=False):
        assert nxt.onset - prev.end >= 0.1 - 1e-6
    assert a[0].onset >= 0.1 - 1e-6 and a[-1].end <= 3.0 - 0.1 + 1e-6
    with pytest.raises(ValueError, match="do not fit"):
        S.random_events(20, duration=1.0)
    with pytest.raises(ValueError, match="overlaps"):
        S.tone_bursts([S.Event(0.1, 0.3, 440.0), S.Event(0.2, 0.1, 440.0)], duration=1.0)


def test_tone_bursts_and_visual_signal_match():
    events = [S.Event(0.25, 0.25, 440.0), S.Event(1.0, 0.5, 880.0)]
    wave = S.tone_bursts(events, duration=2.0, sample_rate=SR)
    assert wave.shape == (1, 2 * SR)
    assert wave[0, : int(0.25 * SR)].abs().max() == 0 and wave[0, int(0.6 * SR): SR].abs().max() == 0
    assert abs(peak_hz(wave[:, SR: int(1.5 * SR)], SR) - 880) <= 2
    vis = S.visual_signal(events, duration=2.0, fps=8)
    expected = torch.zeros(16)
    expected[2:4], expected[8:12] = 1, 1
    assert torch.equal(vis, expected)
    half = S.visual_signal([S.Event(0.0625, 0.125, 440.0)], duration=1.0, fps=8)
    assert torch.allclose(half[:2], torch.tensor([0.5, 0.5]))  # partial coverage
    frames = S.visual_frames(events, duration=2.0, fps=8, size=8)
    assert frames.shape == (16, 8, 8, 3) and frames[0].max() == 0 and frames[2].max() > 0
    assert not np.array_equal(frames[2, 4, 4], frames[8, 4, 4])  # pitch → hue


def test_alignment_is_measurable():
    clip = S.make_clip(5, duration=3.0, seed=3)
    env = S.frame_envelope(clip.wave, clip.sample_rate, clip.fps)
    assert env.shape == clip.visual.shape
    lag, corr = S.best_lag(clip.visual, env, max_lag=4)
    assert lag == 0 and corr > 0.9
    late = S.tone_bursts(S.shift_events(clip.events, 0.25, duration=3.0), duration=3.0)
    lag, _ = S.best_lag(clip.visual, S.frame_envelope(late, SR, clip.fps), max_lag=4)
    assert lag == 2  # 0.25 s at 8 fps


def test_write_clips_manifest_round_trip(tmp_path):
    clips = [S.make_clip(3, seed=i, duration=1.5) for i in range(2)]
    manifest = S.write_clips(clips, tmp_path)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["video"] for r in rows] == ["clip_00000", "clip_00001"]
    for row, clip in zip(rows, clips, strict=True):
        wave, sr = read_audio(tmp_path / row["audio"])
        assert sr == clip.sample_rate and (wave - clip.wave).abs().max() <= 1 / 32768 + 1e-6
        assert [S.Event(**e) for e in row["events"]] == list(clip.events)
        assert np.allclose(row["visual"], clip.visual.numpy(), atol=1e-6)


def test_pyav_reads_audio_track_next_to_video(tmp_path):
    import av

    if not {"aac", "mpeg4"} <= set(av.codecs_available):
        pytest.skip("FFmpeg build without aac/mpeg4 encoders")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as c:
        vs = c.add_stream("mpeg4", rate=8)
        vs.width, vs.height, vs.pix_fmt = 16, 16, "yuv420p"
        audio = c.add_stream("aac", rate=SR, layout="mono")
        packets = [p for _ in range(4)
                   for p in vs.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24"))]
        frame = av.AudioFrame.from_ndarray(tone(660).numpy(), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = SR, 0
        packets += [*vs.encode(None), *audio.encode(frame), *audio.encode(None)]
        for p in packets:
            c.mux(p)
    wave, sr = read_audio(path)
    assert sr == SR and abs(wave.shape[1] - SR // 2) <= 2048
    assert abs(peak_hz(wave, SR) - 660) <= 2 * SR / wave.shape[-1]


def test_alignment_helpers_reject_bad_sizes():
    with pytest.raises(ValueError, match="shorter than one frame"):
        S.frame_envelope(torch.zeros(1, 100), SR, 8.0)
    with pytest.raises(ValueError, match="max_lag"):
        S.best_lag(torch.zeros(4), torch.zeros(4), max_lag=3)
