"""The SF-CAVP-style model: shapes of both streams, the save/load round trip (media settings included), the
batched reward :func:`cavp_scores`, and the shipped configs (tiny builds; CLIP-ViT-B/16 checked at real shapes on
the meta device, not trained)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmalign.adapters.av import cavp_scores
from mmalign.api import load_train_config
from mmalign.config import ConfigError
from mmalign.models.cavp import CONFIG_NAME, build_sf_cavp, load_sf_cavp, save_sf_cavp

REPO = Path(__file__).resolve().parents[2]


def _inputs(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = model.media
    slow = torch.randn(n, m.num_slow, 3, m.image_size, m.image_size, generator=g)
    fast = torch.rand(n, m.num_fast, 3, m.fast_image_size, m.fast_image_size, generator=g)
    mel = torch.randn(n, m.mel.n_mels, m.num_mel_frames, generator=g)
    return slow, fast, mel


def test_streams_have_the_documented_shapes(tiny_model):
    slow, fast, mel = _inputs(tiny_model)
    vs, vf = tiny_model.encode_video(slow, fast)
    as_, af = tiny_model.encode_audio(mel)
    d, t = tiny_model.config.embed_dim, tiny_model.media.num_fast
    assert vs.shape == as_.shape == (2, d) and vf.shape == af.shape == (2, t, d)
    assert type(tiny_model.vision_tower).__name__ == "CLIPVisionModel"
    assert type(tiny_model.audio_tower).__name__ == "ASTModel"


def test_save_load_round_trip_keeps_weights_outputs_and_media(tmp_path, tiny_model):
    save_sf_cavp(tiny_model, tmp_path / "m")
    back = load_sf_cavp(tmp_path / "m")
    assert back.media == tiny_model.media and back.config.to_dict() == tiny_model.config.to_dict()
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    slow, fast, mel = _inputs(tiny_model)
    tiny_model.eval(), back.eval()
    assert torch.equal(tiny_model.encode_audio(mel)[1], back.encode_audio(mel)[1])
    assert torch.equal(tiny_model.encode_video(slow, fast)[0], back.encode_video(slow, fast)[0])
    text = (tmp_path / "m" / CONFIG_NAME).read_text()
    assert '"sample_rate": 16000' in text and '"fast_fps": 16.0' in text and '"n_mels": 32' in text
    with pytest.raises(ConfigError, match="not an SF-CAVP model directory"):
        load_sf_cavp(tmp_path)


def test_cavp_scores_is_batched(tiny_model):
    """[N, K] in [-2, 2]; chunking does not change it; a K=1 [N, S] input works; another sample rate is resampled."""
    from mmalign.data.synthetic_audio import make_clip, visual_frames

    clips = [make_clip(2, duration=1.0, fps=16.0, seed=s, max_len=0.2) for s in range(3)]
    video = torch.stack([torch.from_numpy(visual_frames(c.events, duration=1.0, fps=16.0, size=32)) for c in clips])
    audio = torch.stack([torch.cat([c.wave for c in clips])] * 3)  # every video gets the 3 audios as candidates
    full = cavp_scores(tiny_model, video, audio, batch_size=3)
    assert full.shape == (3, 3) and full.abs().max() <= 2.0 + 1e-5
    assert torch.allclose(full, cavp_scores(tiny_model, video, audio, batch_size=1), atol=1e-5)
    one = cavp_scores(tiny_model, video, audio[:, 0])
    assert one.shape == (3, 1) and torch.allclose(one[:, 0], full[:, 0], atol=1e-5)
    slow_only = cavp_scores(tiny_model, video, audio, weights=(1.0, 0.0))
    assert not torch.allclose(slow_only, full)
    import torchaudio.functional as AF

    at_8k = AF.resample(audio, 16000, 8000)
    assert cavp_scores(tiny_model, video, at_8k, sample_rate=8000).shape == (3, 3)
    with pytest.raises(ValueError, match="N=3 videos"):
        cavp_scores(tiny_model, video, audio[:2])


def test_tiny_config_builds_through_the_family(tmp_path):
    from mmalign.adapters.av_family import build_model

    cfg = load_train_config(REPO / "configs/av/tiny_cavp.yaml", [f"run.output_dir={tmp_path}"])
    model = build_model(cfg)
    assert model.media.clip_seconds == 1.0 and model.media.num_fast == 16 and model.config.embed_dim == 32


def test_clip_vitb16_config_has_real_shapes():
    """The shipped real config validates, and its towers at published shapes (ViT-B/16 hidden 768, 12 layers,
    224 px / 16 px patches; AST-base on one clip's 126 × 128 mel) run a forward on the meta device."""
    from mmalign.adapters.av_family import AVFamily, media_from_config
    from mmalign.methods.av import AVTask

    cfg = load_train_config(REPO / "configs/av/clip_vitb16_cavp.yaml")
    assert cfg.av.vision_tower == "openai/clip-vit-base-patch16"
    AVTask.validate(cfg)
    assert AVFamily.check(cfg, []) == []
    media = media_from_config(cfg.av)
    assert (media.sample_rate, media.mel.n_mels, media.mel.hop_length) == (16000, 128, 256)
    assert (media.num_slow, media.num_fast, media.num_mel_frames) == (8, 32, 126)
    with torch.device("meta"):
        model = build_sf_cavp(vision_tower="clip-vit-b16", audio_tower="ast-base", media=media,
                              embed_dim=cfg.av.embed_dim, fast_channels=cfg.av.fast_channels,
                              fast_layers=cfg.av.fast_layers)
        vc = model.vision_tower.config
        assert (vc.hidden_size, vc.num_hidden_layers, vc.image_size, vc.patch_size) == (768, 12, 224, 16)
        assert model.audio_tower.config.max_length == 126
        n_params = sum(p.numel() for p in model.parameters())
        assert 160e6 < n_params < 200e6  # ViT-B/16 vision (~86 M) + AST-base (~86 M) + heads
        slow = torch.empty(1, media.num_slow, 3, 224, 224)
        fast = torch.empty(1, media.num_fast, 3, 64, 64)
        vs, vf = model.encode_video(slow, fast)
        as_, af = model.encode_audio(torch.empty(1, 128, 126))
    assert vs.shape == as_.shape == (1, 512) and vf.shape == af.shape == (1, 32, 512)
