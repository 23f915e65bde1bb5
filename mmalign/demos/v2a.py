"""``mmalign demo v2a``: AVP-RPO (MultiSoundGen-style, arXiv 2509.19999) on a toy video-to-audio task, measured
against the synthetic ground truth.

1. Data: 1 s clips of a square that flashes at irregular event times, its hue naming the pitch of the matching
   tone burst (:mod:`mmalign.data.synthetic_audio`); the flash onsets are known exactly.
2. Two SF-CAVP-style encoders (``modality: av``) on separate synthetic audio-visual sets: the **reward** (run seed
   s) and an **independent** evaluator (its own data and seed), so the alignment score of the report is never the
   model that was optimised (research note §2.7).
3. A tiny MMAudio-style flow generator pre-trained with conditional flow matching (``loss.name: sft``), short
   enough that its audio is not yet well synchronised.
4. AVP-RPO (``loss.name: avp_rpo``): ``rounds`` stages, each generating K candidates per training video with the
   current policy, ranking them with the reward, and training flow DPO on best-vs-worst pairs; the reference is
   re-anchored at each round.
5. Before/after on held-out videos × sampling seeds: AV-sync error (onsets detected on the generated wave vs the
   known flash onsets, :mod:`mmalign.demos.v2a_metrics`), the reward, the independent alignment score, and a
   mel-statistics distance to the real clips.

Every training run is a plain config through :func:`mmalign.api.train`. The primary metric (``before``/``after``)
is the sync error in ms (lower is better). Whether AVP-RPO helped is read off the seed table, not assumed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .seeds import SeedSpec
from .v2a_metrics import before_after_plot, detect_onsets, mel_stat_distance, spectrogram_grid, sync_error

__all__ = ["SEEDS", "run"]

SEEDS = SeedSpec(fast={"sft_steps": 100, "cavp_steps": 40, "rpo_steps": 8, "rounds": 2, "n_train": 8, "n_eval": 6},
                 metrics={"reward_before": "reward.before", "reward_after": "reward.after",
                          "independent_before": "independent.before", "independent_after": "independent.after",
                          "mel_distance_before": "mel_distance.before", "mel_distance_after": "mel_distance.after"},
                 claim=None)
SR, DURATION, FPS, SIZE = 8000, 1.0, 8.0, 16
V2A = {"latent": "mel", "sample_rate": SR, "duration": DURATION, "fps": FPS, "frame_size": 8, "frame_encoder": "pixels",
       "mel": {"n_fft": 256, "hop_length": 64, "win_length": 256, "n_mels": 32, "f_max": 4000.0}}
TINY = {"hidden": 32, "layers": 2, "heads": 2, "cond_dim": 32}


def write_clips(folder: Path, n: int, seed: int, prefix: str) -> Path:
    """``n`` clips (``.mp4`` + matching ``.wav``) and ``rows.jsonl`` with ``video``, ``audio`` and the true
    ``onsets``."""
    from ..data.audio import write_audio
    from ..data.synthetic_audio import random_events, tone_bursts, visual_frames
    from ..data.synthetic_video import write_video

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        events = random_events(2, duration=DURATION, seed=seed * 7919 + i, min_len=0.1, max_len=0.2, min_gap=0.1)
        name = f"{prefix}_{i:03d}"
        write_video(folder / f"{name}.mp4", visual_frames(events, duration=DURATION, fps=FPS, size=SIZE), FPS)
        write_audio(folder / f"{name}.wav", tone_bursts(events, duration=DURATION, sample_rate=SR), SR)
        rows.append({"video": f"{name}.mp4", "audio": f"{name}.wav", "onsets": [e.onset for e in events]})
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(cfg: dict) -> dict:
    from ..api import train

    return train(cfg)


def _run_cfg(out: Path, seed: int, steps: int, batch: int) -> dict:
    return {"output_dir": str(out), "seed": seed, "max_steps": steps, "batch_size": batch, "report_to": ["jsonl"],
            "progress": False, "resume": "never", "overwrite": True}


def train_encoder(out: Path, rows: Path, seed: int, steps: int) -> Path:
    """An SF-CAVP-style encoder (configs/av/tiny_cavp.yaml's setting) → its ``final/``."""
    _train({"modality": "av", "model": {"name_or_path": "tiny"}, "data": {"train": [str(rows)]},
            "loss": {"name": "cavp", "kwargs": {"slow_weight": 1.0, "intra_weight": 1.0, "temporal_weight": 1.0}},
            "av": {"clip_seconds": 1.0, "slow_fps": 4.0, "fast_fps": 16.0, "clips_per_video": 3, "min_shift": 0.25},
            "optim": {"lr": 2e-3, "scheduler": "constant"}, "run": _run_cfg(out, seed, steps, 8)})
    return out / "final"


def _eval_set(rows: Path, components):
    from ..data.audio import read_audio
    from ..data.v2a import MediaOptions, load_clip_frames

    s = components.spec
    opts = MediaOptions(sample_rate=s.sample_rate, num_samples=s.num_samples, fps=s.fps, num_frames=s.num_frames,
                        frame_size=s.frame_size)
    items = [json.loads(line) for line in rows.read_text().splitlines()]
    frames = torch.stack([load_clip_frames(rows.parent / r["video"], opts) for r in items])
    real = torch.stack([read_audio(rows.parent / r["audio"])[0][0, : s.num_samples] for r in items])
    return items, frames, real


def _reward_frames(rows: Path, items: list[dict], model) -> torch.Tensor:
    from ..data.v2a import MediaOptions, load_clip_frames

    m = model.media
    opts = MediaOptions(sample_rate=m.sample_rate, num_samples=m.num_samples, fps=m.fast_fps, num_frames=m.num_fast,
                        frame_size=max(m.image_size, m.fast_image_size))
    return torch.stack([load_clip_frames(rows.parent / r["video"], opts) for r in items])


def measure(model_dir: Path, rows: Path, reward_dir: Path, independent_dir: Path, seeds: list[int], *,
            steps: int, guidance: float) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Metrics of a generator's samples on the eval videos × ``seeds``; also the waves ``[V, S, N]`` and real
    ``[V, N]``."""
    from ..adapters.av import cavp_scores
    from ..models.cavp import load_sf_cavp
    from ..models.v2a import load_v2a
    from ..sample.v2a import generate

    comps = load_v2a(model_dir)
    items, frames, real = _eval_set(rows, comps)
    waves = generate(comps, None, frames, seeds, steps=steps, guidance_scale=guidance, batch_size=64)
    sr = comps.spec.sample_rate
    errors = [sync_error(detect_onsets(waves[v, k], sr), items[v]["onsets"])
              for v in range(len(items)) for k in range(len(seeds))]
    out = {"sync_error_ms": 1000 * sum(errors) / len(errors)}
    for key, path in (("reward", reward_dir), ("independent", independent_dir)):
        enc = load_sf_cavp(path)
        out[key] = float(cavp_scores(enc, _reward_frames(rows, items, enc), waves, sample_rate=sr).mean())
    out["mel_distance"] = mel_stat_distance(waves, real, comps.spec.mel_config)
    out["silent_fraction"] = sum(not detect_onsets(w, sr) for w in waves.flatten(0, 1)) / waves[..., 0].numel()
    return out, waves, real


def run(out_dir: str | Path = "outputs/demo/v2a", *, seed: int = 0, n_train: int = 16, n_eval: int = 8,
        sft_steps: int = 150, cavp_steps: int = 60, rpo_steps: int = 15, rounds: int = 3, num_candidates: int = 4,
        pairing: str = "best_worst", beta: float = 100.0, rpo_lr: float = 3e-4, eval_seeds: int = 2,
        sample_steps: int = 10, guidance: float = 3.0, sft_lr: float = 3e-3) -> dict:
    """One seed of the demo (module docstring); ``report.json`` etc. in ``out_dir``."""
    from ..data.synthetic_av import write_synthetic_av

    t0 = time.time()
    out = Path(out_dir)
    data = out / "data"
    train_rows = write_clips(data / "train", n_train, seed, "train")
    eval_rows = write_clips(data / "eval", n_eval, 10_000 + seed, "eval")
    av_kw = {"duration": 3.0, "fps": 16.0, "size": 32, "sample_rate": 16000}
    reward = train_encoder(out / "reward", write_synthetic_av(data / "av_reward", 16, seed=seed + 1, **av_kw), seed,
                           cavp_steps)
    indep = train_encoder(out / "independent", write_synthetic_av(data / "av_indep", 16, seed=seed + 5000, **av_kw),
                          seed + 17, cavp_steps)
    timings = {"encoders_s": round(time.time() - t0, 1)}

    base = {"modality": "v2a", "v2a": {**V2A, "steps": sample_steps, "guidance_scale": guidance}}
    _train({**base, "model": {"name_or_path": "tiny", "tiny": TINY}, "data": {"train": [str(train_rows)]},
            "loss": {"name": "sft"}, "optim": {"lr": sft_lr, "scheduler": "constant"},
            "run": _run_cfg(out / "sft", seed, sft_steps, 8)})
    timings["sft_s"] = round(time.time() - t0 - timings["encoders_s"], 1)
    stages = [{"name": f"round{r + 1}", "max_steps": rpo_steps, "reanchor_reference": r > 0} for r in range(rounds)]
    t1 = time.time()
    summary = _train({**base, "model": {"name_or_path": str(out / "sft" / "final")},
                      "data": {"train": [str(train_rows)]}, "loss": {"name": "avp_rpo", "kwargs": {"beta": beta}},
                      "options": {"reward_model": str(reward), "num_candidates": num_candidates, "pairing": pairing},
                      "reference": {"strategy": "copy"}, "optim": {"lr": rpo_lr, "scheduler": "constant"},
                      "stages": stages, "run": _run_cfg(out / "avp_rpo", seed, rpo_steps, min(8, n_train))})
    timings["avp_rpo_s"] = round(time.time() - t1, 1)

    seeds = [20_000 + k for k in range(eval_seeds)]
    kw = {"steps": sample_steps, "guidance": guidance}
    before, w_before, real = measure(out / "sft" / "final", eval_rows, reward, indep, seeds, **kw)
    after, w_after, _ = measure(out / "avp_rpo" / "final", eval_rows, reward, indep, seeds, **kw)
    items = [json.loads(line) for line in eval_rows.read_text().splitlines()]
    from ..models.v2a import load_v2a

    mel_cfg = load_v2a(out / "sft" / "final").spec.mel_config
    shown = min(4, n_eval)
    grid = spectrogram_grid({"real": real[:shown], "before": w_before[:shown, 0], "after": w_after[:shown, 0]},
                            mel_cfg, out / "spectrograms.png", onsets=[it["onsets"] for it in items[:shown]],
                            titles=[it["video"] for it in items[:shown]])
    labels = {"sync_error_ms": "AV-sync error (ms, lower better)", "reward": "reward (SF-CAVP, optimised)",
              "independent": "independent SF-CAVP score", "mel_distance": "mel-stat distance (lower better)"}
    plot = before_after_plot(before, after, out / "before_after.png", labels)
    rounds_info = json.loads((out / "avp_rpo" / "final" / "v2a_config.json").read_text())["info"].get("rounds", {})
    report = {
        "demo": "v2a", "method": "avp_rpo", "metric": "AV-sync error (ms)", "higher_is_better": False,
        "before": round(before["sync_error_ms"], 2), "after": round(after["sync_error_ms"], 2),
        **{k: {"before": round(before[k], 4), "after": round(after[k], 4)}
           for k in ("reward", "independent", "mel_distance", "silent_fraction")},
        "rounds": rounds_info, "steps": [s.get("steps") for s in summary["stages"]],
        "settings": {"seed": seed, "n_train": n_train, "n_eval": n_eval, "sft_steps": sft_steps,
                     "sft_lr": sft_lr, "cavp_steps": cavp_steps, "rpo_steps": rpo_steps, "rounds": rounds,
                     "K": num_candidates,
                     "pairing": pairing, "beta": beta, "rpo_lr": rpo_lr, "eval_seeds": seeds,
                     "sample_steps": sample_steps, "guidance": guidance},
        "plots": [grid.name, plot.name], "timings": {**timings, "total_s": round(time.time() - t0, 1)},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report))
    return report


def _markdown(r: dict) -> str:
    rows = [f"| AV-sync error (ms) | {r['before']} | {r['after']} |"]
    rows += [f"| {k} | {r[k]['before']} | {r[k]['after']} |"
             for k in ("reward", "independent", "mel_distance", "silent_fraction")]
    return "\n".join([
        f"# mmalign demo v2a (seed {r['settings']['seed']})", "",
        "AVP-RPO rounds on a tiny flow generator; sync error measured from the synthetic flash onsets, the "
        "independent score by a separately trained SF-CAVP (not the reward).", "",
        "| metric | before (pre-trained) | after AVP-RPO |", "|---|---|---|", *rows, "",
        f"Rounds (reward statistics of each round's candidates): `{json.dumps(r['rounds'])}`", "",
        f"![spectrograms]({r['plots'][0]})", "", f"![before/after]({r['plots'][1]})", "",
        f"Timings: {r['timings']}", ""])
