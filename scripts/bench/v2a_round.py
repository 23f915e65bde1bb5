"""Benchmark (DESIGN.md §5): one AVP-RPO round broken down, and the flow-DPO step's reference designs.

    .venv/bin/python scripts/bench/v2a_round.py            # a small generator (hidden 128, 4 layers), minutes on CPU
    .venv/bin/python scripts/bench/v2a_round.py --quick    # tiny sizes, a smoke test (the fast test runs this)

Part 1, **round** (one process, same tiny weights, videos, seeds and reward model for both paths):

- ``mmalign``: :class:`mmalign.methods.avp_rpo.AVPRPOTask` — generation batched across videos × K candidates
  (``generate_round``), the reward batched per video (``cavp_scores`` on all K at once), then the pair data and
  ``train_steps`` flow-DPO steps; and the same round again with the on-disk cache filled (``resume``: a resumed
  round reads its candidates instead of sampling them);
- ``naive``: a per-candidate loop — :func:`mmalign.sample.v2a.generate` for one video and one seed at a time, the
  reward one candidate at a time — then the same training steps.

Part 2, **dpo_step** (child processes, so that each peak RSS, ``ru_maxrss``, is its own): flow DPO through
``mmalign.train`` on the same pairs with (a) LoRA r=8 and the reference = the adapter-disabled base (no copy) vs
(b) full fine-tuning with a frozen deep copy as the reference. Step time = median interval between loss calls
(first excluded). Printed: one JSON with the phase seconds, ``ratios.generation_speedup``/``scoring_speedup``/
``round_speedup``/``resume_speedup`` (naive ÷ mmalign), ``ratios.memory_lora_over_copy``, ``speed_lora_over_copy``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZES = {"quick": {"hidden": 16, "layers": 1, "heads": 2, "cond_dim": 16},
         "small": {"hidden": 128, "layers": 4, "heads": 4, "cond_dim": 128}}
V2A = {"latent": "mel", "sample_rate": 8000, "duration": 1.0, "fps": 8.0, "frame_size": 8,
       "mel": {"n_fft": 256, "hop_length": 64, "win_length": 256, "n_mels": 16, "f_max": 4000.0}}


def _config(spec: dict, name: str, **sections) -> dict:
    base = {"modality": "v2a", "model": {"name_or_path": "tiny", "tiny": SIZES[spec["size"]]},
            "v2a": {**V2A, "steps": spec["sample_steps"], "guidance_scale": 3.0},
            "optim": {"lr": 1e-4, "scheduler": "constant"},
            "run": {"output_dir": str(Path(spec["workdir"]) / name), "max_steps": spec["train_steps"],
                    "batch_size": spec["batch"], "seed": 0, "report_to": ["jsonl"], "progress": False,
                    "save_final": False, "resume": "never", "overwrite": True}}
    return {**base, **sections}


def _clock(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def _train_steps(task, data, steps: int, batch: int) -> float:
    """Seconds of ``steps`` optimizer steps (policy + frozen-copy reference scores, loss, backward, AdamW)."""
    import copy

    import torch

    ref = copy.deepcopy(task.model).eval().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=1e-4)
    t = time.perf_counter()
    for s in range(steps):
        idx = [(s * batch + i) % len(data.train) for i in range(batch)]
        b = data.collate([data.train[i] for i in idx])
        with torch.no_grad():
            r = task.score(ref, b)
        out = task.loss(task.score(task.model, b), r, b)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - t


def round_bench(spec: dict) -> dict:
    import torch

    from mmalign.adapters.av import cavp_scores
    from mmalign.api import build_task, load_train_config
    from mmalign.data.avp_pairs import round_examples
    from mmalign.data.synthetic_v2a import write_v2a_dataset
    from mmalign.models.cavp import build_sf_cavp, save_sf_cavp
    from mmalign.sample.v2a import generate
    from mmalign.schema import StageConfig

    work = Path(spec["workdir"])
    rows = write_v2a_dataset(work / "data", n=spec["videos"])["sft"]
    reward = save_sf_cavp(build_sf_cavp(seed=1), work / "reward")
    cfg = load_train_config(_config(spec, "round", data={"train": [str(rows)]}, loss={"name": "avp_rpo"},
                                    options={"reward_model": str(reward), "num_candidates": spec["k"],
                                             "generation_batch_size": 64, "cache_dir": str(work / "cache")}))
    task = build_task(cfg)
    data = task.stage_data(StageConfig())
    frames, reward_frames, _, keys = task._videos
    seeds = task.round_seeds(0)
    gen_key = task.generation_key(task.model)
    out: dict = {"mmalign": {}, "naive": {}}
    waves, out["mmalign"]["generation_s"] = _clock(task.generate_round, task.model, torch.stack(frames), keys, seeds,
                                                   gen_key)
    rewards, out["mmalign"]["scoring_s"] = _clock(task.reward, torch.stack(reward_frames), waves)
    calls = task.generated
    _, out["mmalign"]["resume_generation_s"] = _clock(task.generate_round, task.model, torch.stack(frames), keys,
                                                      seeds, gen_key)
    out["mmalign"]["resume_generated"] = task.generated - calls

    comps, net = task.components, task.model
    steps, scale = task.sampler_settings()
    t = time.perf_counter()
    naive = torch.stack([torch.cat([generate(comps, net, torch.stack(frames)[v:v + 1], [s], steps=steps,
                                             guidance_scale=scale, batch_size=1)[:, 0] for s in seeds])
                         for v in range(len(keys))])
    out["naive"]["generation_s"] = time.perf_counter() - t
    t = time.perf_counter()
    naive_r = torch.tensor([[float(cavp_scores(task.reward_model, torch.stack(reward_frames)[v:v + 1],
                                               naive[v:v + 1, j:j + 1], sample_rate=comps.spec.sample_rate))
                             for j in range(len(seeds))] for v in range(len(keys))])
    out["naive"]["scoring_s"] = time.perf_counter() - t
    data.train.ready()  # the round's pair data (cache hits now), then training (after both paths sampled)
    out["mmalign"]["training_s"] = _train_steps(task, data, spec["train_steps"], spec["batch"])
    out["naive"]["training_s"] = out["mmalign"]["training_s"]  # the same steps: training has no naive variant
    out["naive"]["resume_generation_s"] = out["naive"]["generation_s"]  # no cache: a resume samples everything
    out["agree"] = {"waves_max_abs_diff": float((naive - waves).abs().max()),
                    "rewards_max_abs_diff": float((naive_r - rewards).abs().max()),
                    "same_pairs": [e.candidates for e in round_examples(naive_r)] ==
                                  [e.candidates for e in round_examples(rewards)]}
    for side in ("mmalign", "naive"):
        o = out[side]
        o["round_s"] = o["generation_s"] + o["scoring_s"] + o["training_s"]
    return out


def child_main(variant: str, spec_path: str, out_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"] or torch.get_num_threads())
    from mmalign.api import build_task, load_train_config, train
    from mmalign.data.synthetic_v2a import write_v2a_dataset

    pairs = write_v2a_dataset(Path(spec["workdir"]) / f"pairs_{variant}", n=max(4, spec["batch"]))["pairs"]
    lora = variant == "lora_adapter"
    cfg = load_train_config(_config(spec, variant, data={"train": [str(pairs)]}, loss={"name": "dpo"},
                                    lora={"enabled": lora, "r": 8, "alpha": 8},
                                    reference={"strategy": "adapter" if lora else "copy"}))
    task = build_task(cfg)
    stamps, losses, loss_fn = [], [], task.loss

    def timed_loss(*args, **kwargs):
        o = loss_fn(*args, **kwargs)
        stamps.append(time.perf_counter())
        losses.append(o.loss.item())
        return o

    task.loss = timed_loss
    train(cfg, task=task)
    intervals = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    step = statistics.median(intervals[1:] if len(intervals) > 1 else intervals)
    Path(out_path).write_text(json.dumps({
        "step_s": step, "steps_per_s": 1 / step, "step0_loss": losses[0],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "trainable_params": sum(p.numel() for p in task.model.parameters() if p.requires_grad)}))


def dpo_bench(spec: dict) -> dict:
    path = Path(spec["workdir"]) / "spec.json"
    path.write_text(json.dumps(spec))
    results = {}
    for variant in ("lora_adapter", "full_copy"):
        out = Path(spec["workdir"]) / f"{variant}.json"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, __file__, "--child", variant, str(path), str(out)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-4000:]}")
        results[variant] = json.loads(out.read_text())
    return results


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--videos", type=int, default=None)
    parser.add_argument("--k", type=int, default=4, help="candidates per video")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return None
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"size": "quick" if args.quick else "small", "videos": args.videos or (4 if args.quick else 16),
                "k": args.k, "sample_steps": 4 if args.quick else 10, "train_steps": 3 if args.quick else 8,
                "batch": 2 if args.quick else 4, "threads": args.threads, "workdir": args.workdir or tmp}
        Path(spec["workdir"]).mkdir(parents=True, exist_ok=True)
        rnd, dpo = round_bench(spec), dpo_bench(spec)
    m, n = rnd["mmalign"], rnd["naive"]
    a, b = dpo["lora_adapter"], dpo["full_copy"]
    report = {"shape": {k: v for k, v in spec.items() if k != "workdir"}, "round": rnd, "dpo_step": dpo,
              "ratios": {"generation_speedup": n["generation_s"] / m["generation_s"],
                         "scoring_speedup": n["scoring_s"] / m["scoring_s"],
                         "round_speedup": n["round_s"] / m["round_s"],
                         "resume_speedup": n["resume_generation_s"] / max(m["resume_generation_s"], 1e-9),
                         "memory_lora_over_copy": a["peak_rss_gb"] / b["peak_rss_gb"],
                         "speed_lora_over_copy": a["steps_per_s"] / b["steps_per_s"]}}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return report


if __name__ == "__main__":
    main()
