"""``mmalign demo tdpo``: DPO vs token-level DPO (TDPO2) from the same SFT model, same budget: reward vs KL.

TDPO (Zeng et al. 2024, arXiv 2404.11999) adds a per-token KL(pi_ref || pi) term to DPO's margin and claims a
better reward-KL trade-off (its IMDB frontier, Fig. 2) than DPO. This demo puts that claim to a small, honest test
on the warm-colours task (:mod:`mmalign.data.warm_colors`: reward = share of warm colour words in 6):

1. SFT a tiny Llama on colour lists (cached in ``out_dir/sft`` between runs of the demo).
2. Train DPO (sigmoid, beta 0.1) and TDPO2 (beta 0.1, alpha 0.5) from that checkpoint, frozen-copy reference,
   same data order, learning rate, batch size and number of steps; a checkpoint every third of the run.
3. For the SFT model and every checkpoint, sample the same prompts with the same seed and measure the mean
   reward and the KL(policy || SFT) of the samples (mean of log pi(y) - log pi_ref(y) over policy samples, nats
   per sequence). Points of one run trace its reward-KL path; a better trade-off = higher reward at equal KL.

Writes ``report.json`` (method, metric, before, after, higher_is_better, every point), ``report.md`` and
``tradeoff.png``. The verdict in the report is computed from the measured points, whichever way it goes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..data import warm_colors as W
from .seeds import SeedSpec

# The claim: TDPO2's reward above DPO's at equal KL (each path interpolated at the smaller final KL).
SEEDS = SeedSpec(fast={"sft_steps": 150, "steps": 30, "n_eval": 64},
                 metrics={"dpo_reward": "runs.dpo.reward", "dpo_kl": "runs.dpo.kl", "tdpo2_kl": "runs.tdpo2.kl",
                          "equal_kl": "reward_at_equal_kl.kl", "dpo_at_equal_kl": "reward_at_equal_kl.dpo",
                          "tdpo2_at_equal_kl": "reward_at_equal_kl.tdpo2"},
                 claim=("tdpo2_at_equal_kl", "dpo_at_equal_kl"))

TINY = "model.tiny={hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 128}"
METHODS = {"dpo": ["loss.name=dpo", "loss.kwargs={beta: 0.1}"],
           "tdpo2": ["loss.name=tdpo", "loss.kwargs={beta: 0.1, alpha: 0.5, variant: tdpo2}"]}


def _train(out: Path, name: str, overrides: list[str]) -> dict:
    from ..api import train

    return train(None, [f"run.output_dir={out / name}", "run.resume=never", "run.report_to=[jsonl]",
                        "run.overwrite=true", "run.progress=false", *overrides])


def _checkpoint_models(sft_dir: Path, run_dir: Path, steps: int) -> list[tuple[int, torch.nn.Module]]:
    """(step, model) for every saved checkpoint before ``steps``, then the final model. Checkpoints hold accelerate
    state (the loop's ``_Scorer`` wrapper, keys prefixed ``model.``), loaded into a copy of the SFT model."""
    from safetensors.torch import load_file

    from ..models.text import load_causal_lm
    from ..train.checkpoint import list_checkpoints

    out = []
    for ckpt in list_checkpoints(run_dir):
        if int(ckpt.name.split("-")[1]) >= steps:
            continue
        state = load_file(str(ckpt / "model.safetensors"))
        model = load_causal_lm(sft_dir)
        state = {k.removeprefix("model."): v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:  # tied lm_head may be absent from the file
            raise RuntimeError(f"{ckpt}: checkpoint does not match the SFT model ({missing[:3]}, {unexpected[:3]})")
        out.append((int(ckpt.name.split("-")[1]), model.eval()))
    return [*out, (steps, load_causal_lm(run_dir / "final").eval())]


@torch.no_grad()
def _measure(model, ref, tok, prompts: list[str], seed: int) -> dict:
    from ..adapters.causal_lm import score_batch
    from ..sample.text import generate, samples_to_batch

    s = generate(model, tok, prompts, max_new_tokens=W.N_WORDS + 2, temperature=1.0, seed=seed)
    batch = samples_to_batch(s, tok.pad_token_id)
    kl = (score_batch(model, batch).logps - score_batch(ref, batch).logps)[:, 0]
    rewards = [W.reward(c) for c in s.completions]
    return {"reward": sum(rewards) / len(rewards), "kl": float(kl.mean()), "samples": s.completions[:6]}


def _plot(out: Path, points: dict[str, list[dict]], sft: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, pts in points.items():
        xs, ys = [0.0] + [p["kl"] for p in pts], [sft["reward"]] + [p["reward"] for p in pts]
        ax.plot(xs, ys, marker="o", label=name.upper())
        for p in pts:
            ax.annotate(str(p["step"]), (p["kl"], p["reward"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.scatter([0.0], [sft["reward"]], color="k", zorder=3, label="SFT (reference)")
    ax.set(xlabel="KL(policy || SFT) of samples, nats/sequence", ylabel="mean reward (share of warm words)",
           title="reward vs KL along training (labels: step)")
    ax.legend()
    fig.tight_layout()
    path = out / "tradeoff.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _reward_at(pts: list[dict], kl: float) -> float:
    """Reward of a run's path at ``kl``, linearly interpolated (path starts at the SFT point, KL 0)."""
    for a, b in zip(pts, pts[1:], strict=False):
        if a["kl"] <= kl <= b["kl"] and b["kl"] > a["kl"]:
            return a["reward"] + (b["reward"] - a["reward"]) * (kl - a["kl"]) / (b["kl"] - a["kl"])
    return float("nan")


def run(out_dir: str | Path = "outputs/demo/tdpo", *, seed: int = 0, sft_steps: int = 300, steps: int = 90,
        n_eval: int = 192) -> dict:
    from ..models.text import load_causal_lm, load_tokenizer

    t0 = time.time()
    out = Path(out_dir)
    data = out / "data"
    W.write_jsonl(W.sft_rows(3000, seed=seed), data / "sft.jsonl")
    W.write_jsonl(W.preference_rows(2000, seed=seed + 1), data / "pairs.jsonl")
    sft_dir = out / "sft" / "final"
    if not (sft_dir / "config.json").is_file():  # cached between runs of the demo in the same out_dir
        _train(out, "sft", [f"data.train=[{data / 'sft.jsonl'}]", "loss.name=sft", f"run.max_steps={sft_steps}",
                            "run.batch_size=32", "optim.lr=3e-3", "optim.scheduler=cosine", f"run.seed={seed}",
                            "optim.warmup_steps=20", TINY])
    every = max(steps // 3, 1)
    common = [f"model.name_or_path={sft_dir}", f"data.train=[{data / 'pairs.jsonl'}]", f"run.max_steps={steps}",
              "run.batch_size=16", "optim.lr=5e-4", "optim.scheduler=constant", f"run.seed={seed}",
              "reference.strategy=copy", f"run.save_every={every}", "run.keep_last=100"]
    seconds = {}
    for name, loss in METHODS.items():
        t = time.time()
        _train(out, name, [*common, *loss])
        seconds[name] = round(time.time() - t, 1)

    tok, ref = load_tokenizer(sft_dir), load_causal_lm(sft_dir).eval()
    prompts = W.eval_prompts(n_eval, seed=seed + 2)
    sft = _measure(ref, ref, tok, prompts, seed)
    sft["kl"] = 0.0
    points = {name: [{"step": step, **_measure(m, ref, tok, prompts, seed)}
                     for step, m in _checkpoint_models(sft_dir, out / name, steps)] for name in METHODS}
    plot = _plot(out, points, sft)

    final = {name: pts[-1] for name, pts in points.items()}
    # Trade-off at equal KL: each path's reward at the smaller of the two final KLs (interpolated from SFT).
    kl_common = min(p["kl"] for p in final.values())
    at_common = {name: _reward_at([{"kl": 0.0, "reward": sft["reward"]}, *pts], kl_common)
                 for name, pts in points.items()}
    undecided = any(v != v for v in at_common.values()) or kl_common <= 0  # NaN: a path never reached that KL
    better = "undetermined" if undecided else max(at_common, key=lambda k: at_common[k])
    r4 = lambda x: round(float(x), 4)  # noqa: E731
    report = {
        "method": "tdpo", "metric": "mean reward (fraction of warm colour words) of samples",
        "before": r4(sft["reward"]), "after": r4(final["tdpo2"]["reward"]), "higher_is_better": True,
        "runs": {name: {"reward": r4(p["reward"]), "kl": r4(p["kl"]), "train_seconds": seconds[name]}
                 for name, p in final.items()},
        "points": {name: [{"step": p["step"], "reward": r4(p["reward"]), "kl": r4(p["kl"])} for p in pts]
                   for name, pts in points.items()},
        "reward_at_equal_kl": {"kl": r4(kl_common), **{k: r4(v) for k, v in at_common.items()}},
        "better_tradeoff": better, "eval_prompts": n_eval, "steps": steps, "sft_steps": sft_steps,
        "sampling": "temperature 1.0, same prompts and seed for every model", "seconds": round(time.time() - t0, 1),
        "plots": [plot.name],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report, sft, final))
    return report


def _markdown(rep: dict, sft: dict, final: dict) -> str:
    rows = "\n".join(f"| {name.upper()} | {r['reward']} | {r['kl']} | {r['train_seconds']} s |"
                     for name, r in rep["runs"].items())
    path_rows = "\n".join(f"| {name.upper()} | " + ", ".join(f"{p['step']}: ({p['kl']}, {p['reward']})" for p in pts)
                          + " |" for name, pts in rep["points"].items())
    eq = rep["reward_at_equal_kl"]
    samples = "\n".join(f"| `{a.strip()}` | `{b.strip()}` | `{c.strip()}` |"
                        for a, b, c in zip(sft["samples"], final["dpo"]["samples"], final["tdpo2"]["samples"],
                                           strict=False))
    return (
        "# mmalign demo: DPO vs TDPO2 (token-level DPO, arXiv 2404.11999) on warm colours\n\n"
        f"Same SFT start and reference, data order, lr, batch and {rep['steps']} steps. Reward = share of warm "
        f"words among 6 (SFT: {rep['before']}). KL = mean log pi(y) - log pi_ref(y) over {rep['eval_prompts']} "
        "policy samples (nats per sequence).\n\n"
        f"| method | final reward | final KL to SFT | train time |\n|---|---|---|---|\n{rows}\n\n"
        f"Reward-KL path (step: (KL, reward)):\n\n| method | points |\n|---|---|\n{path_rows}\n\n"
        f"At equal KL {eq['kl']} (interpolated along each path from the SFT point): DPO {eq['dpo']}, TDPO2 "
        f"{eq['tdpo2']}; better trade-off here: **{rep['better_tradeoff'].upper()}**. One seed and a tiny model: "
        "a single point on the paper's claim, not a replication.\n\n"
        f"![reward vs KL]({rep['plots'][0]})\n\n## Samples (same prompt and seed)\n\n| SFT | DPO | TDPO2 |\n"
        f"|---|---|---|\n{samples}\n\nRuntime: {rep['seconds']} s on CPU.\n"
    )
