"""The batched seeded sampler and ``mmalign sample v2a``: per video and seed a wav, a spectrogram PNG and an mp4
whose audio track PyAV reads back with the clip's duration."""

from __future__ import annotations

import json

import soundfile as sf
import torch
from typer.testing import CliRunner

from mmalign.data.audio import MelConfig
from mmalign.models.v2a import build_tiny_v2a, save_v2a
from mmalign.sample.v2a import generate


def _model(tmp_path):
    comps = build_tiny_v2a(mel=MelConfig(8000, 256, 64, 256, 16, 0.0, 4000.0, padding="hifigan"), hidden=16,
                           layers=1)
    torch.nn.init.normal_(comps.denoiser.transformer.proj_out.weight, std=0.1)
    return comps, save_v2a(comps, tmp_path / "model")


def test_generate_is_batched_and_seeded(tmp_path):
    comps, _ = _model(tmp_path)
    frames = torch.randint(0, 256, (2, comps.spec.num_frames, 8, 8, 3), dtype=torch.uint8)
    a = generate(comps, None, frames, [0, 1, 2], steps=2, guidance_scale=2.0, batch_size=4)
    assert a.shape == (2, 3, comps.spec.num_samples) and a.abs().max() <= 1
    b = generate(comps, None, frames[:1], [1], steps=2, guidance_scale=2.0)
    assert torch.allclose(a[0, 1], b[0, 0], atol=1e-5)  # a candidate depends on its video and seed only
    assert not torch.allclose(a[0, 0], a[0, 1])


def test_sample_command_writes_wav_png_and_mp4(tmp_path, v2a_data):
    import av

    from mmalign.cli import app

    comps, model = _model(tmp_path)
    video = str(v2a_data["sft"].parent / "clip_000.mp4")
    out = tmp_path / "samples"
    res = CliRunner().invoke(app, ["sample", "v2a", "--model", str(model), "--video", video, "--seeds", "3",
                                   "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    stem = out / "clip_000_seed3"
    wave, sr = sf.read(stem.with_suffix(".wav"))
    assert sr == 8000 and len(wave) == comps.spec.num_samples
    assert stem.with_suffix(".png").stat().st_size > 1000
    with av.open(str(stem.with_suffix(".mp4"))) as c:
        assert c.streams.video and c.streams.audio
        a = c.streams.audio[0]
        assert a.sample_rate == 8000 and a.channels == 1
        v = c.streams.video[0]
        assert abs(float(v.duration * v.time_base) - 1.0) < 0.15
        samples = sum(f.samples for f in c.decode(audio=0))
    # AAC adds its priming delay (1024 samples) and pads the last frame
    assert 8000 <= samples <= 8000 + 2 * 1024, samples
    listed = json.loads((out / "samples.json").read_text())
    assert listed["samples"][0]["seed"] == 3 and listed["settings"]["steps"] == 2
    res = CliRunner().invoke(app, ["sample", "v2a", "--model", str(tmp_path / "nope"), "--video", video])
    assert res.exit_code == 2 and "v2a_config.json" in res.output
