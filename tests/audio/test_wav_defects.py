"""Malformed WAV files (issue 18 item 8): an unknown format code and a truncated data chunk raise the module's
clean :class:`DataError` naming the file and the fix, never an ``AttributeError`` or a silently short wave."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import soundfile as sf

from mmalign.data.audio import _read_pyav, read_audio
from mmalign.data.rows import DataError

SR = 16000


def _wav(tmp_path, name="ok.wav", n=SR) -> bytes:
    path = tmp_path / name
    sf.write(str(path), (0.3 * np.sin(np.arange(n) / 5)).astype(np.float32), SR, subtype="PCM_16")
    data = path.read_bytes()
    assert data[12:16] == b"fmt " and data[36:40] == b"data"  # the canonical 44-byte header
    return data


def test_unknown_format_code(tmp_path):
    data = bytearray(_wav(tmp_path))
    data[20:22] = struct.pack("<H", 0x1234)
    bad = tmp_path / "odd_codec.wav"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"odd_codec\.wav: unsupported WAV format code 0x1234.*fix: re-encode"):
        read_audio(bad)
    # The PyAV fallback on its own also answers cleanly (it used to raise AttributeError: no attribute 'rate').
    with pytest.raises(DataError, match=r"odd_codec\.wav: .*fix"):
        _read_pyav(bad, None, None)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_data_chunk(tmp_path, keep):
    data = _wav(tmp_path)
    declared = struct.unpack("<I", data[40:44])[0]
    cut = tmp_path / "half.wav"
    cut.write_bytes(data[:44 + int(declared * keep)])
    with pytest.raises(DataError, match=rf"half\.wav: truncated WAV: the header declares {declared} bytes.*"
                                        r"fix: copy or download the file again"):
        read_audio(cut)


def test_complete_and_streamed_wavs_still_read(tmp_path):
    data = _wav(tmp_path, n=SR // 2)
    wave, sr = read_audio(tmp_path / "ok.wav")
    assert sr == SR and wave.shape == (1, SR // 2)
    # A streamed WAV whose writer left the sizes unknown (0xFFFFFFFF) is not "truncated".
    streamed = bytearray(data)
    streamed[40:44] = b"\xff\xff\xff\xff"
    (tmp_path / "streamed.wav").write_bytes(bytes(streamed))
    try:
        wave, _ = read_audio(tmp_path / "streamed.wav")
    except DataError as e:  # a decoder may refuse the size, but never with the truncation message
        assert "truncated" not in str(e)
    else:
        assert wave.shape[1] == SR // 2
    # Float and extensible (multi-channel) WAVs pass the header check.
    sf.write(str(tmp_path / "float.wav"), np.zeros((100, 3), np.float32), SR, subtype="FLOAT")
    assert read_audio(tmp_path / "float.wav", mono=False)[0].shape == (3, 100)
