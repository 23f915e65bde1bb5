"""Audio I/O, mel-spectrogram presets and MMAudio's sequence arithmetic, for video-to-audio alignment.

Follows research/video_audio_clip_prior.md §2.4 (MultiSoundGen, arXiv 2509.19999; Diff-Foley, arXiv 2306.17203;
MMAudio, arXiv 2412.15322). The pitfall this module guards against (§2.7): the generator (16k/44k), the reward
model (Diff-Foley's 16k/128-mel) and the evaluators use different sample rates and mel settings, so every
component names its :class:`MelConfig` and resamples explicitly.

- :func:`read_audio` reads with soundfile (wav, flac, ogg, mp3) and falls back to PyAV for containers libsndfile
  cannot open (the audio track of an mp4/m4a/mkv/mov). torchaudio is used only for transforms: its
  ``load``/``save`` need torchcodec + FFmpeg, which this environment does not have.
- :data:`MEL_PRESETS` / :func:`mel_spectrogram`: the three settings of §2.4 on ``torchaudio.transforms``.
- :class:`SequenceConfig`: MMAudio's ``SequenceConfig`` (clip, Synchformer and latent sequence lengths), derived
  from the rates, not hard-coded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError
from .rows import DataError

WRITE_SUFFIXES = (".wav", ".flac")
_DECODE_FIX = ("re-encode it, e.g. `ffmpeg -i IN -vn -ac 1 -ar 16000 OUT.wav`, or drop the row "
               "(skip-and-count in the dataset that calls read_audio)")


# ------------------------------------------------------------------------------------------------- reading


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int (samples per second)")


def _read_soundfile(path: Path, start: float | None, duration: float | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        sr = f.samplerate
        first = 0 if start is None else round(start * sr)
        count = -1 if duration is None else round(duration * sr)
        if first:
            f.seek(min(first, f.frames))
        data = f.read(frames=count, dtype="float32", always_2d=True)  # [N, C]
    return data.T, sr


# WAVE format codes (RFC 2361 / mmreg.h) that libsndfile or FFmpeg decode; anything else is refused up front.
_WAV_FORMATS = {0x0001: "PCM", 0x0002: "MS ADPCM", 0x0003: "IEEE float", 0x0006: "A-law", 0x0007: "mu-law",
                0x0011: "IMA ADPCM", 0x0031: "GSM 6.10", 0x0050: "MPEG", 0x0055: "MP3", 0xFFFE: "extensible"}


def _check_wav(path: Path) -> None:
    """For a RIFF/WAVE file: refuse an unknown format code and a data chunk shorter than its header declares
    (a truncated copy or download), which decoders would otherwise read as a shorter sound without a word."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        size = path.stat().st_size
        pos, fmt = 12, None
        while pos + 8 <= size:
            f.seek(pos)
            chunk = f.read(8)
            cid, length = chunk[:4], int.from_bytes(chunk[4:], "little")
            if cid == b"fmt " and length >= 2:
                fmt = int.from_bytes(f.read(2), "little")
                if fmt not in _WAV_FORMATS:
                    raise DataError(f"{path}: unsupported WAV format code 0x{fmt:04X} (known: "
                                    f"{', '.join(f'0x{k:04X} {v}' for k, v in _WAV_FORMATS.items())}); fix: "
                                    f"{_DECODE_FIX}")
            elif cid == b"data":
                have = size - pos - 8
                # 0 and 0xFFFFFFFF mark a length the writer did not know (streamed WAV); nothing to check.
                if length not in (0, 0xFFFFFFFF) and have < length:
                    raise DataError(f"{path}: truncated WAV: the header declares {length} bytes of audio but the "
                                    f"file holds {have} ({have / length:.0%}); fix: copy or download the file "
                                    f"again, or {_DECODE_FIX}")
                return
            pos += 8 + length + (length & 1)


def _read_pyav(path: Path, start: float | None, duration: float | None) -> tuple[np.ndarray, int]:
    import av

    try:
        container = av.open(str(path))
    except Exception as e:  # PyAV raises many FFmpeg error types; all mean "cannot read"
        raise DataError(f"{path}: cannot read audio: neither libsndfile nor FFmpeg (PyAV) can open it ({e}); "
                        f"fix: check that the file is complete and a media file, or {_DECODE_FIX}") from e
    with container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise DataError(f"{path}: the file has no audio stream (streams: {kinds}); fix: point the row at "
                            "a file with sound, or drop the row")
        stream = container.streams.audio[0]
        # A stream FFmpeg cannot identify has no ``rate`` attribute and no codec sample rate.
        sr = int(getattr(stream, "rate", None) or getattr(stream.codec_context, "sample_rate", 0) or 0)
        if sr <= 0:
            raise DataError(f"{path}: the audio stream has an unknown codec or no sample rate; fix: {_DECODE_FIX}")
        # Decode from the start and cut by sample count: container seeking lands on packet boundaries, and
        # compressed codecs would make the offset inexact.
        first = 0 if start is None else round(start * sr)
        last = None if duration is None else first + round(duration * sr)
        resampler = av.AudioResampler(format="fltp")  # planar float, channel layout and rate unchanged
        chunks, seen = [], 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
                    seen += chunks[-1].shape[1]
                if last is not None and seen >= last:
                    break
            else:
                chunks.extend(out.to_ndarray() for out in resampler.resample(None))
        except DataError:
            raise
        except Exception as e:  # a corrupt stream surfaces as an FFmpeg error mid-decode
            raise DataError(f"{path}: the audio stream cannot be decoded ({e}); fix: {_DECODE_FIX}") from e
    if not chunks:
        return np.zeros((max(stream.channels or 1, 1), 0), np.float32), sr
    wave = np.concatenate([c.reshape(c.shape[0], -1) for c in chunks], axis=1)
    return wave[:, first:last], sr


def read_audio(path: str | Path, *, sample_rate: int | None = None, mono: bool = True, start: float | None = None,
               duration: float | None = None) -> tuple[Tensor, int]:
    """``(wave, sr)``: float32 ``[C, N]`` in [-1, 1] (``C = 1`` when ``mono``) and its sample rate.

    ``start``/``duration`` (seconds) cut a window before resampling; ``sample_rate`` resamples with
    ``torchaudio.functional.resample`` (band-limited sinc, its defaults). Raises :class:`DataError` naming the
    file and the fix for a missing, unreadable or corrupt file, a WAV with an unknown format code or a data
    chunk shorter than its header declares (truncated), a file with no audio stream, an empty window, or
    non-finite samples. PyAV decodes compressed tracks as stored: an AAC encoder's priming delay
    (typically 1024 samples) is not trimmed, so ``start`` is relative to the decoded stream.
    """
    path = Path(path)
    if sample_rate is not None:
        _check_positive_int("sample_rate", sample_rate)
    if start is not None and not (math.isfinite(start) and start >= 0):
        raise ValueError(f"start={start!r} must be a finite number of seconds >= 0")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration={duration!r} must be a finite number of seconds > 0")
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"audio file {path} {what}; fix: correct the path (relative paths are resolved against "
                        "the working directory or the data file's folder), or drop the row")
    import soundfile as sf

    _check_wav(path)
    try:
        data, sr = _read_soundfile(path, start, duration)
    except (sf.SoundFileError, RuntimeError):
        # libsndfile cannot open containers such as mp4/m4a/mkv; FFmpeg can.
        data, sr = _read_pyav(path, start, duration)
    if data.shape[1] == 0:
        where = f" from start={start} s" if start else ""
        raise DataError(f"{path}: no audio samples{where} (the file is empty or shorter than the window); "
                        "fix: use a non-empty file, a start inside the file, or drop the row")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: the audio contains NaN or infinite samples; fix: re-encode it, or drop the row")
    wave = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    if mono and wave.shape[0] > 1:
        wave = wave.mean(0, keepdim=True)
    if sample_rate is not None and sample_rate != sr:
        import torchaudio.functional as AF

        wave = AF.resample(wave, orig_freq=sr, new_freq=sample_rate)
        sr = sample_rate
    return wave, sr


def write_audio(path: str | Path, wave: Tensor | np.ndarray, sample_rate: int, *, subtype: str | None = None) -> Path:
    """Write ``[C, N]`` (or ``[N]``) samples in [-1, 1] to a ``.wav``/``.flac`` file with soundfile.

    ``subtype``: soundfile's (default PCM_16 for both; ``"FLOAT"`` keeps wav lossless). Values outside [-1, 1]
    would be clipped silently by a PCM subtype, so they raise instead.
    """
    import soundfile as sf

    path = Path(path)
    if path.suffix.lower() not in WRITE_SUFFIXES:
        raise ValueError(f"{path}: write_audio writes {list(WRITE_SUFFIXES)} files; got suffix {path.suffix!r}")
    _check_positive_int("sample_rate", sample_rate)
    x = wave.detach().float().cpu().numpy() if isinstance(wave, Tensor) else np.asarray(wave, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{path}: wave must be [channels, samples] or [samples] and non-empty; got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: wave has NaN or infinite samples")
    peak = float(np.abs(x).max())
    if peak > 1.0 and (subtype or "PCM_16").upper() != "FLOAT":
        raise ValueError(f"{path}: peak {peak:.3f} > 1 would clip in {subtype or 'PCM_16'}; fix: normalise the "
                         "wave (wave / wave.abs().max()) or write a .wav with subtype='FLOAT'")
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x.T, sample_rate, subtype=subtype)
    return path


# ---------------------------------------------------------------------------------------------------- mel

PADDINGS = ("center", "hifigan")
LOGS = ("log10", "ln")


@dataclass(frozen=True)
class MelConfig:
    """One mel-spectrogram setting; ``padding``/``log``/``log_floor``/``mel_scale``/``norm`` choose the details.

    ``padding="center"``: torchaudio's centred STFT (reflect pad n_fft/2), frames = 1 + N // hop.
    ``padding="hifigan"``: reflect pad (n_fft − hop)/2 on each side, no centring (HiFi-GAN/BigVGAN mel code),
    frames = 1 + (N + 2·((n_fft − hop)//2) − n_fft) // hop = N / hop for N a multiple of hop.
    """

    sample_rate: int
    n_fft: int
    hop_length: int
    win_length: int
    n_mels: int
    f_min: float
    f_max: float
    power: float = 1.0
    log: str = "ln"
    log_floor: float = 1e-5
    mel_scale: str = "slaney"
    norm: str | None = "slaney"
    padding: str = "center"

    def __post_init__(self) -> None:
        errors = []
        for name in ("sample_rate", "n_fft", "hop_length", "win_length", "n_mels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                errors.append(f"mel.{name}={v!r} must be a positive int")
        if not errors and self.win_length > self.n_fft:
            errors.append(f"mel.win_length={self.win_length} must be <= n_fft={self.n_fft}")
        if not 0 <= self.f_min < self.f_max:
            errors.append(f"mel.f_min={self.f_min}, f_max={self.f_max}: need 0 <= f_min < f_max")
        if isinstance(self.sample_rate, int) and self.f_max > self.sample_rate / 2:
            errors.append(f"mel.f_max={self.f_max} is above the Nyquist frequency {self.sample_rate / 2}")
        if self.power not in (1.0, 2.0):
            errors.append(f"mel.power={self.power} must be 1 (magnitude) or 2 (power)")
        for name, value, allowed in (("log", self.log, LOGS), ("padding", self.padding, PADDINGS),
                                     ("mel_scale", self.mel_scale, ("htk", "slaney")),
                                     ("norm", self.norm, (None, "slaney"))):
            if value not in allowed:
                errors.append(f"mel.{name}={value!r} is not one of {list(allowed)}")
        if not self.log_floor > 0:
            errors.append(f"mel.log_floor={self.log_floor} must be > 0")
        if errors:
            raise ConfigError(errors)

    def num_frames(self, num_samples: int) -> int:
        if self.padding == "center":
            return 1 + num_samples // self.hop_length
        pad = (self.n_fft - self.hop_length) // 2
        return 1 + (num_samples + 2 * pad - self.n_fft) // self.hop_length


# §2.4. Filter banks: librosa's defaults (Slaney scale and area norm), which the Diff-Foley and BigVGAN mel code
# call [unverified for both]. Log: Diff-Foley's log10 is in the note; the floor 1e-5 is the common HiFi-GAN
# clamp [unverified]. MMAudio's magnitude, log and padding are not in the note: the BigVGAN convention
# (magnitude, natural log of clamp(x, 1e-5), "hifigan" padding) is assumed [unverified]; with it an 8 s clip
# gives exactly 2 × latent_seq_len frames (500 at 16k, 690 at 44.1k), which is consistent with SequenceConfig.
MEL_PRESETS: dict[str, MelConfig] = {
    "diff_foley_16k": MelConfig(16000, 1024, 256, 1024, 128, 125.0, 7600.0, power=1.0, log="log10"),
    "mmaudio_16k": MelConfig(16000, 1024, 256, 1024, 80, 0.0, 8000.0, power=1.0, log="ln", padding="hifigan"),
    "mmaudio_44k": MelConfig(44100, 2048, 512, 2048, 128, 0.0, 22050.0, power=1.0, log="ln", padding="hifigan"),
}


def mel_config(cfg: MelConfig | str) -> MelConfig:
    """A :class:`MelConfig` itself, or the preset of that name (unknown names raise with the valid ones)."""
    if isinstance(cfg, MelConfig):
        return cfg
    if cfg not in MEL_PRESETS:
        raise ConfigError(f"mel preset {cfg!r} is not one of {sorted(MEL_PRESETS)}")
    return MEL_PRESETS[cfg]


@lru_cache(maxsize=8)
def _mel_transform(cfg: MelConfig, device: str):
    import torchaudio.transforms as T

    return T.MelSpectrogram(
        sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
        f_min=cfg.f_min, f_max=cfg.f_max, n_mels=cfg.n_mels, power=cfg.power, center=cfg.padding == "center",
        pad_mode="reflect", norm=cfg.norm, mel_scale=cfg.mel_scale,
    ).to(device)


def mel_spectrogram(wave: Tensor, cfg: MelConfig | str, *, sample_rate: int | None = None) -> Tensor:
    """Log-mel ``[..., n_mels, frames]`` of ``wave`` ``[..., N]`` (so a 1-D wave gives ``[n_mels, frames]``).

    ``sample_rate``, when given, must equal the config's: a mismatch means the caller forgot to resample.
    Computed in float32; frames = ``cfg.num_frames(N)``.
    """
    cfg = mel_config(cfg)
    if sample_rate is not None and sample_rate != cfg.sample_rate:
        raise ValueError(f"wave is at {sample_rate} Hz but the mel config expects {cfg.sample_rate} Hz; fix: "
                         f"read_audio(path, sample_rate={cfg.sample_rate})")
    x = wave.float()
    if x.shape[-1] == 0:
        raise ValueError("mel_spectrogram got an empty wave")
    if cfg.padding == "hifigan":
        pad = (cfg.n_fft - cfg.hop_length) // 2
        if x.shape[-1] <= pad:
            raise ValueError(f"wave of {x.shape[-1]} samples is too short for reflect padding of {pad}")
        lead = x.shape[:-1]
        x = F.pad(x.reshape(-1, 1, x.shape[-1]), (pad, pad), mode="reflect").reshape(*lead, -1)
    mel = _mel_transform(cfg, str(x.device))(x)
    mel = mel.clamp_min(cfg.log_floor)
    return mel.log10() if cfg.log == "log10" else mel.log()


# ----------------------------------------------------------------------------------------------- sequence


@dataclass(frozen=True)
class SequenceConfig:
    """MMAudio's sequence arithmetic (``mmaudio/model/sequence_config.py``, structure seen in the public code).

    ``hop_length`` is MMAudio's ``spectrogram_frame_rate`` (samples per spectrogram frame, a misnomer there).
    - latent_seq_len = ceil(duration · sr / hop / latent_downsample): one latent per 2 mel frames;
    - num_audio_samples = latent_seq_len · hop · latent_downsample: rounded *up* to whole latents, so at
      44.1 kHz an "8 s" clip is 353 280 samples (8.011 s), not 352 800;
    - clip_seq_len = floor(duration · clip_fps) CLIP frames;
    - sync_seq_len = segments · sync_segment / sync_downsample, segments = (frames − segment) // stride + 1 with
      frames = floor(duration · sync_fps): Synchformer emits segment/2 tokens per 16-frame segment. The
      ``sync_downsample = 2`` factor is not in the note (§2.4 names only 25 fps, 16-frame segments, stride 8);
      it is MMAudio's ``sync_downsample_rate`` default and is needed to reach the published 192.
    """

    duration: float = 8.0
    sample_rate: int = 16000
    hop_length: int = 256
    latent_downsample: int = 2
    clip_fps: float = 8.0
    sync_fps: float = 25.0
    sync_segment: int = 16
    sync_stride: int = 8
    sync_downsample: int = 2

    def __post_init__(self) -> None:
        errors = [f"sequence.{f.name}={getattr(self, f.name)!r} must be > 0" for f in fields(self)
                  if not getattr(self, f.name) > 0]
        if not errors and self.duration * self.sync_fps < self.sync_segment:
            errors.append(f"sequence.duration={self.duration} s at {self.sync_fps} fps is shorter than one "
                          f"Synchformer segment of {self.sync_segment} frames")
        if errors:
            raise ConfigError(errors)

    @property
    def latent_seq_len(self) -> int:
        return math.ceil(self.duration * self.sample_rate / self.hop_length / self.latent_downsample)

    @property
    def num_spec_frames(self) -> int:
        return self.latent_seq_len * self.latent_downsample

    @property
    def num_audio_samples(self) -> int:
        return self.num_spec_frames * self.hop_length

    @property
    def clip_seq_len(self) -> int:
        return math.floor(self.duration * self.clip_fps)

    @property
    def sync_num_segments(self) -> int:
        frames = math.floor(self.duration * self.sync_fps)
        return (frames - self.sync_segment) // self.sync_stride + 1

    @property
    def sync_seq_len(self) -> int:
        return self.sync_num_segments * self.sync_segment // self.sync_downsample

    def mel(self, name: str) -> MelConfig:
        """The mel preset ``name`` after checking that it shares this config's sample rate and hop."""
        cfg = mel_config(name)
        if (cfg.sample_rate, cfg.hop_length) != (self.sample_rate, self.hop_length):
            raise ConfigError(f"mel preset {name!r} (sr {cfg.sample_rate}, hop {cfg.hop_length}) does not match "
                              f"the sequence config (sr {self.sample_rate}, hop {self.hop_length})")
        return cfg


SEQUENCE_PRESETS: dict[str, SequenceConfig] = {
    "mmaudio_16k": SequenceConfig(8.0, 16000, 256),
    "mmaudio_44k": SequenceConfig(8.0, 44100, 512),
}


def fit_length(wave: Tensor, num_samples: int) -> Tensor:
    """Crop or zero-pad the last dim to ``num_samples`` (e.g. ``SequenceConfig.num_audio_samples``)."""
    if num_samples <= 0:
        raise ValueError(f"num_samples={num_samples} must be > 0")
    n = wave.shape[-1]
    return wave[..., :num_samples] if n >= num_samples else F.pad(wave, (0, num_samples - n))
