"""Measurements of ``mmalign demo v2a``, all taken against the synthetic ground truth, none by the reward model.

- :func:`detect_onsets` / :func:`sync_error`: AV-sync error in seconds. Onsets are read off the generated wave's RMS
  envelope (8 ms frames; an onset is a rise above ``rel`` × the clip's peak envelope, at least ``min_gap`` s after
  the previous one) and matched to the known flash onsets both ways: mean distance of every true onset to its
  nearest detected onset and of every detected onset to its nearest true one, each capped at ``cap`` s (a missed
  event or a silent clip costs ``cap``; a spurious burst costs its distance). A direct stand-in for DeSync
  (Synchformer's predicted offset, research note §2.6), which needs no model on synthetic data.
- :func:`mel_stat_distance`: a diagonal Fréchet-style distance between the per-mel-bin mean and std of the log-mel
  frames of generated and real clips (FAD's form on mel statistics instead of embeddings, §2.6).
- :func:`spectrogram_grid`, :func:`before_after_plot`: the PNGs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

__all__ = ["before_after_plot", "detect_onsets", "mel_stat_distance", "spectrogram_grid", "sync_error"]


def detect_onsets(wave: Tensor, sample_rate: int, *, frame: float = 0.008, rel: float = 0.3,
                  min_gap: float = 0.08, floor: float = 1e-3) -> list[float]:
    """Onset times (s) of a ``[N]`` wave: rises of the frame RMS above ``rel`` × its peak (and above ``floor``)."""
    hop = max(1, round(frame * sample_rate))
    x = wave.float().flatten()
    n = x.numel() // hop
    if n == 0:
        return []
    env = x[: n * hop].reshape(n, hop).pow(2).mean(1).sqrt()
    peak = float(env.max())
    if peak < floor:
        return []
    above = (env > rel * peak).tolist()
    onsets, last = [], -1e9
    for i, on in enumerate(above):
        if on and (i == 0 or not above[i - 1]):
            t = i * hop / sample_rate
            if t - last >= min_gap:
                onsets.append(t)
                last = t
    return onsets


def sync_error(detected: Sequence[float], truth: Sequence[float], *, cap: float = 0.25) -> float:
    """Symmetric capped onset distance (s) between detected and true onsets (see the module docstring)."""
    def one_way(src: Sequence[float], dst: Sequence[float]) -> float:
        if not src:
            return 0.0
        return sum(min(cap, min((abs(s - d) for d in dst), default=cap)) for s in src) / len(src)

    if not truth:
        return cap if detected else 0.0
    if not detected:
        return cap
    return 0.5 * (one_way(truth, detected) + one_way(detected, truth))


def _mel_frames(waves: Tensor, mel_cfg) -> Tensor:
    from ..data.audio import mel_spectrogram

    mel = mel_spectrogram(waves.reshape(-1, waves.shape[-1]).float(), mel_cfg)  # [N, M, F]
    return mel.transpose(1, 2).reshape(-1, mel.shape[1])  # [N·F, M]


def mel_stat_distance(generated: Tensor, real: Tensor, mel_cfg) -> float:
    """mean over mel bins of (μ_gen − μ_real)² + (σ_gen − σ_real)², log-mel frames pooled over clips."""
    g, r = _mel_frames(generated, mel_cfg), _mel_frames(real, mel_cfg)
    return float(((g.mean(0) - r.mean(0)).pow(2) + (g.std(0) - r.std(0)).pow(2)).mean())


def spectrogram_grid(rows: dict[str, Tensor], mel_cfg, path: Path, *, onsets: Sequence[Sequence[float]] = (),
                     titles: Sequence[str] = ()) -> Path:
    """One column per clip, one row per setting (``rows``: name → ``[clips, N]`` waves); true onsets dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.audio import mel_spectrogram

    names = list(rows)
    n = rows[names[0]].shape[0]
    fig, axes = plt.subplots(len(names), n, figsize=(2.2 * n, 1.6 * len(names)), dpi=100, squeeze=False)
    hop_s = mel_cfg.hop_length / mel_cfg.sample_rate
    for i, name in enumerate(names):
        for j in range(n):
            ax = axes[i][j]
            mel = mel_spectrogram(rows[name][j].float(), mel_cfg).numpy()
            ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", extent=(0, mel.shape[1] * hop_s, 0,
                                                                                mel.shape[0]))
            for t in (onsets[j] if j < len(onsets) else []):
                ax.axvline(t, color="cyan", ls="--", lw=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
            if i == 0 and j < len(titles):
                ax.set_title(titles[j], fontsize=7)
    fig.suptitle("log-mel of real vs generated audio (dashed: the video's flash onsets)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def before_after_plot(before: dict, after: dict, path: Path, labels: dict[str, str]) -> Path:
    """One bar pair per metric (``labels``: key → axis title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(labels)
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.6), dpi=100)
    for ax, k in zip(axes, keys, strict=True):
        ax.bar(["before", "after"], [before[k], after[k]], color=["#999999", "#3a7ebf"])
        ax.set_title(labels[k], fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("AVP-RPO on the toy: pre-trained generator (before) vs after the rounds", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
