"""Sampling from a video-to-audio generator: batched, seeded Euler flow steps with classifier-free guidance by the
learned null condition, and the writers of ``mmalign sample v2a`` (wav, spectrogram PNG, mp4 with the audio muxed).

Sampler (MMAudio, arXiv 2412.15322; research/video_audio_clip_prior.md §2.5): x_0 ~ N(0, I) drawn from the seed,
t_i = i/steps, x_{i+1} = x_i + (t_{i+1} − t_i)·v̂(x_i, t_i) with the guided velocity

    v̂ = v(x, t, null) + w·(v(x, t, video) − v(x, t, null))            (w = guidance_scale; w = 1: no null pass)

— the Euler scheme of diffusers' ``FlowMatchEulerDiscreteScheduler`` with inverted σ as the LongCat audio pipeline
runs it (time 0 = noise, 1 = data), written out here so that the null condition is the conditioner's learned one and
the conditional and null passes share one batched forward. :func:`generate` returns waveforms ``[V, K, N]``: K
candidates per video from K seeds (the same K seeds for every video, so candidates are paired across videos and
reproducible) — what AVP-RPO samples and ranks (arXiv 2509.19999 §2.2).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["euler_sample", "generate", "mux_audio", "save_spectrogram", "write_outputs"]


@torch.no_grad()
def euler_sample(denoiser: nn.Module, features: Tensor, noise: Tensor, *, steps: int = 25,
                 guidance_scale: float = 4.5) -> Tensor:
    """Latents ``[N, C, L]`` from start noise ``[N, C, L]`` and frame features ``[N, T, F]``."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    x = noise.float()
    n = x.shape[0]
    guided = guidance_scale != 1.0
    feats = torch.cat([features, features]) if guided else features
    null = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]) if guided else None
    null = None if null is None else null.to(x.device)
    for i in range(steps):
        t0, t1 = i / steps, (i + 1) / steps
        t = torch.full((feats.shape[0],), t0, device=x.device)
        v = denoiser(torch.cat([x, x]) if guided else x, t, feats, null).float()
        if guided:
            v_cond, v_null = v.chunk(2)
            v = v_null + guidance_scale * (v_cond - v_null)
        x = x + (t1 - t0) * v
    return x


@torch.no_grad()
def generate(components, denoiser: nn.Module | None, frames: Tensor, seeds: Sequence[int], *, steps: int = 25,
             guidance_scale: float = 4.5, batch_size: int = 16) -> Tensor:
    """Waves ``[V, K, num_samples]`` for uint8 frames ``[V, T, H, W, 3]`` (already at the spec's fps and frame size),
    candidate k of every video from ``seeds[k]``. ``denoiser``: the model to sample (default: the components')."""
    net = denoiser if denoiser is not None else components.denoiser
    device = next(net.parameters()).device
    for m in components.frozen():
        m.to(device)
    was_training = net.training
    net.eval()
    shape = components.spec.latent_shape
    noises = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    features = components.encode_frames(frames.to(device))  # [V, T, F]
    v, k = features.shape[0], len(seeds)
    flat_feats = features.repeat_interleave(k, dim=0)  # video-major: (v0 s0, v0 s1, ..., v1 s0, ...)
    flat_noise = noises.repeat(v, 1, 1).to(device)
    waves = []
    for start in range(0, v * k, batch_size):
        sl = slice(start, start + batch_size)
        latents = euler_sample(net, flat_feats[sl], flat_noise[sl], steps=steps, guidance_scale=guidance_scale)
        waves.append(components.decode(latents).cpu())
    net.train(was_training)
    return torch.cat(waves).reshape(v, k, -1)


# ------------------------------------------------------------------------------------------------ writers


def save_spectrogram(wave: Tensor, mel_cfg, path: str | Path, title: str = "") -> Path:
    """A log-mel spectrogram PNG of a ``[N]`` wave (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.audio import mel_spectrogram

    mel = mel_spectrogram(wave.float(), mel_cfg).numpy()
    fig, ax = plt.subplots(figsize=(6, 2.5), dpi=100)
    hop_s = mel_cfg.hop_length / mel_cfg.sample_rate
    ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", extent=(0, mel.shape[1] * hop_s, 0, mel.shape[0]))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mel bin")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def mux_audio(video: str | Path, wave: Tensor, sample_rate: int, out: str | Path, *, duration: float) -> Path:
    """Write ``out`` (.mp4): the first ``duration`` s of ``video``'s frames re-encoded (libx264, else mpeg4) and
    ``wave`` (mono, [-1, 1]) as an AAC track (the encoder adds its usual priming delay)."""
    import av

    from ..data.synthetic_video import available_codec
    from ..data.video import read_frames, video_info

    info = video_info(video)
    fps = info.fps if info.fps > 0 else 8.0
    count = max(1, min(info.num_frames, round(duration * fps)))
    frames = read_frames(video, list(range(count))).numpy()
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # yuv420p needs even sides
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    codec = available_codec()
    with av.open(str(out), "w") as container:
        vs = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "libx264":
            vs.options = {"crf": "18", "preset": "ultrafast"}
        aus = container.add_stream("aac", rate=sample_rate)
        aus.layout = "mono"
        for f in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in vs.encode():
            container.mux(packet)
        samples = wave.detach().float().cpu().clamp(-1, 1).numpy().reshape(1, -1).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = sample_rate
        for packet in aus.encode(frame):
            container.mux(packet)
        for packet in aus.encode():
            container.mux(packet)
    return out


def write_outputs(components, videos: Sequence[str | Path], waves: Tensor, seeds: Sequence[int], out_dir: str | Path,
                  *, settings: dict | None = None) -> list[dict]:
    """For each video and seed: ``<stem>_seed<s>.wav``, ``.png`` (spectrogram) and ``.mp4`` (video + audio); and
    ``samples.json`` listing them with ``settings``."""
    from ..data.audio import write_audio

    spec, out_dir = components.spec, Path(out_dir)
    written = []
    for v, video in enumerate(videos):
        for k, seed in enumerate(seeds):
            stem = out_dir / f"{Path(video).stem}_seed{seed}"
            wave = waves[v, k]
            write_audio(stem.with_suffix(".wav"), wave, spec.sample_rate)
            save_spectrogram(wave, spec.mel_config, stem.with_suffix(".png"), title=f"{Path(video).name} seed {seed}")
            mux_audio(video, wave, spec.sample_rate, stem.with_suffix(".mp4"), duration=spec.duration)
            written.append({"video": str(video), "seed": int(seed), **{s: str(stem.with_suffix(f".{s}"))
                                                                       for s in ("wav", "png", "mp4")}})
    (out_dir / "samples.json").write_text(json.dumps({"settings": settings or {}, "samples": written}, indent=1))
    return written
