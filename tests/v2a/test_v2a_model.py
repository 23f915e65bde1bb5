"""The generator: MMAudio's sequence arithmetic on the real diffusers classes, save/load round trips, and the
MMAudio-small config's shapes (random init, built on the meta device: validated, not trained)."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.data.audio import MEL_PRESETS, SEQUENCE_PRESETS, MelConfig
from mmalign.models.v2a import CONFIG_NAME, V2AComponents, build_tiny_v2a, load_v2a, save_v2a

from . import REPO

TINY_MEL = MelConfig(8000, 256, 64, 256, 16, 0.0, 4000.0, padding="hifigan")


def test_mmaudio_sequence_asserts():
    """research/video_audio_clip_prior.md §2.4: 8 s clips, 64 CLIP frames, 192 sync tokens, 250 / 345 latents,
    128 000 / 353 280 samples — and a V2ASpec at MMAudio's 16k settings reproduces them."""
    s16, s44 = SEQUENCE_PRESETS["mmaudio_16k"], SEQUENCE_PRESETS["mmaudio_44k"]
    assert (s16.latent_seq_len, s16.clip_seq_len, s16.sync_seq_len, s16.num_audio_samples) == (250, 64, 192, 128000)
    assert (s44.latent_seq_len, s44.clip_seq_len, s44.sync_seq_len, s44.num_audio_samples) == (345, 64, 192, 353280)
    comps = build_tiny_v2a(latent="vae", sample_rate=16000, duration=8.0, mel=MEL_PRESETS["mmaudio_16k"],
                           latent_channels=20, hidden=16, layers=1, vae_hidden=8, vocoder_channels=8)
    spec = comps.spec
    assert (spec.latent_shape, spec.num_frames, spec.num_samples) == ((20, 250), 64, 128000)
    # The diffusers MMAudioVAE at those mel settings turns 128 000 samples into exactly 250 latent frames.
    params = comps.encode_audio(0.1 * torch.randn(1, spec.num_samples))
    assert params.shape == (1, 40, 250)


@pytest.mark.parametrize("latent,encoder", [("mel", "pixels"), ("vae", "clip")])
def test_save_load_round_trip(tmp_path, latent, encoder):
    """Spec (sample rate, mel settings, latent shape, frames) and every weight survive save -> from_pretrained."""
    comps = build_tiny_v2a(latent=latent, mel=TINY_MEL, frame_encoder=encoder, hidden=16, layers=1)
    torch.nn.init.normal_(comps.denoiser.transformer.proj_out.weight)  # diffusers zero-inits the output layer
    save_v2a(comps, tmp_path / "m", info={"method": "sft"})
    data = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert data["sample_rate"] == 8000 and data["mel"]["hop_length"] == 64 and data["latent"] == latent
    back = load_v2a(tmp_path / "m")
    assert isinstance(back, V2AComponents) and back.spec == comps.spec and back.source == str(tmp_path / "m")
    for a, b in [(comps.denoiser, back.denoiser), *zip(comps.frozen(), back.frozen(), strict=True)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(2, *comps.spec.latent_shape)
    frames = torch.randint(0, 256, (2, comps.spec.num_frames, 16, 16, 3), dtype=torch.uint8)
    feats = comps.encode_frames(frames)
    assert torch.equal(feats, back.encode_frames(frames))
    t = torch.tensor([0.2, 0.7])
    assert torch.equal(comps.denoiser(x, t, feats), back.denoiser(x, t, feats))
    wave = back.decode(x)
    assert wave.shape == (2, comps.spec.num_samples) and wave.abs().max() <= 1


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="v2a_config.json"):
        load_v2a(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an mmalign v2a config"):
        load_v2a(tmp_path)


def test_mmaudio_small_config_shapes():
    """configs/v2a/mmaudio_small_dpo.yaml validates and builds MMAudio-small-scale shapes at 16 kHz."""
    from mmalign.adapters.v2a_family import build_v2a_components
    from mmalign.api import load_train_config
    from mmalign.methods.v2a import V2ATask

    cfg = load_train_config(REPO / "configs" / "v2a" / "mmaudio_small_dpo.yaml")
    uses = V2ATask.validate(cfg)
    assert [u.method.name for u in uses] == ["dpo"] and uses[0].kwargs["beta"] == 100
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device: shapes only, no memory, no init cost
        comps = build_v2a_components(cfg)
    s = comps.spec
    assert (s.latent, s.latent_shape, s.num_samples, s.num_frames, s.feature_dim) == ("vae", (20, 250), 128000, 64,
                                                                                       1024)
    assert comps.vae.config.mel_bins == 80 and comps.vae.config.hop_length == 256
    assert comps.denoiser.transformer.config.dit_dim == 448 and comps.denoiser.transformer.config.dit_depth == 12
    n = sum(p.numel() for p in comps.denoiser.parameters())
    assert 30e6 < n < 60e6, n
