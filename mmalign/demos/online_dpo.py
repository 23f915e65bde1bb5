"""``mmalign demo online_dpo``: online DPO (and optionally XPO) on the warm-colours task, measured honestly.

1. SFT: the same tiny Llama and colour-list corpus as ``mmalign demo text`` (:mod:`mmalign.demos.text`);
   trained once through ``mmalign.train`` and cached under ``out_dir/sft`` (reused when present).
2. Online DPO (Guo et al., arXiv 2402.04792): prompt-only rows; every step the current policy samples two
   completions per prompt, the programmatic reward (:func:`mmalign.data.warm_colors.reward`, share of warm
   colour words) picks chosen/rejected, and DPO trains on the pair against the frozen SFT reference.
   With ``xpo=True`` the same budget is also spent on XPO (arXiv 2405.21046: policy vs reference sample plus
   the ``α · log π(ỹ)`` exploration term).
3. Evaluation on held-out prompts with the same sampling seed for every model: mean reward before (SFT)
   and after, win-rate against the SFT samples, and KL(policy ‖ SFT) estimated on policy samples.

Also holds :func:`addition_reward`, the reward of the tiny online configs (``configs/text/tiny_online_dpo.yaml``,
``tiny_xpo.yaml``) on the shipped addition prompts.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..data import warm_colors as W
from .seeds import SeedSpec

SEEDS = SeedSpec(fast={"sft_steps": 150, "steps": 20, "n_eval": 64}, win_rate="win_rate_vs_sft",
                 metrics={"kl_to_reference": "kl_to_reference", "xpo_reward": "methods.xpo.reward",
                          "xpo_kl_to_reference": "methods.xpo.kl_to_reference"}, claim=("after", "before"))


def addition_reward(prompt: str, completion: str) -> float:
    """1 for the right sum of ``add: a b =``, minus 0.1 per unit off (floor −1); −1 when no number is written."""
    nums = [int(x) for x in re.findall(r"-?\d+", prompt)]
    got = re.findall(r"-?\d+", completion)
    if len(nums) < 2 or not got:
        return -1.0
    return max(-1.0, 1.0 - 0.1 * abs(int(got[0]) - sum(nums[:2])))


def _plot(out: Path, runs: dict[str, Path]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.metrics_log import read_metrics

    keys = [("samples/reward_policy", "mean reward of the policy's samples"), ("loss", "loss"),
            ("rewards/accuracies", "implicit reward accuracy (on-policy pairs)"),
            ("objective/kl", "log-ratio of samples (TRL's crude KL)")]
    fig, ax = plt.subplots(1, len(keys), figsize=(18, 3.6))
    for name, run_dir in runs.items():
        rows = [r for r in read_metrics(run_dir) if "loss" in r]
        for a, (key, title) in zip(ax, keys, strict=True):
            vals = [r.get(key, r.get("samples/reward_mean", float("nan")) if key.startswith("samples/") else
                          float("nan")) for r in rows]
            a.plot([r["step"] for r in rows], vals, label=name)
            a.set(title=title, xlabel="step")
    ax[0].legend()
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(out_dir: str | Path = "outputs/demo/online_dpo", *, seed: int = 0, sft_steps: int = 300, steps: int = 60,
        n_eval: int = 256, xpo: bool = True) -> dict:
    from .text import _evaluate, _train

    t0 = time.time()
    out = Path(out_dir)
    data = out / "data"
    sft_dir = out / "sft" / "final"
    if not (sft_dir / "config.json").is_file():  # cached: the SFT model is the same for every online run
        W.write_jsonl(W.sft_rows(3000, seed=seed), data / "sft.jsonl")
        tiny = "model.tiny={hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 128}"
        _train(out, "sft", [f"data.train=[{data / 'sft.jsonl'}]", "loss.name=sft", f"run.max_steps={sft_steps}",
                            "run.batch_size=32", "optim.lr=3e-3", "optim.scheduler=cosine", f"run.seed={seed}",
                            "optim.warmup_steps=20", tiny])
    W.write_jsonl([{"prompt": p} for p in W.eval_prompts(512, seed=seed + 1)], data / "prompts.jsonl")
    common = [f"model.name_or_path={sft_dir}", f"data.train=[{data / 'prompts.jsonl'}]", f"run.max_steps={steps}",
              "run.batch_size=16", "optim.lr=5e-4", "optim.scheduler=constant", f"run.seed={seed}",
              "reference.strategy=copy", "run.log_every=1",
              "options={reward_fn: 'mmalign.data.warm_colors:reward', max_new_tokens: "
              f"{W.N_WORDS + 2}, temperature: 1.0}}"]
    methods = {"online_dpo": ["loss.name=online_dpo", "loss.kwargs={beta: 0.1}"]}
    if xpo:
        methods["xpo"] = ["loss.name=xpo", "loss.kwargs={beta: 0.1, alpha: 1.0e-5}"]
    prompts = W.eval_prompts(n_eval, seed=seed + 2)
    results, summaries = {}, {}
    for name, extra in methods.items():
        summaries[name] = _train(out, name, [*common, *extra])
        ev = _evaluate(out / name / "final", sft_dir, prompts, seed)
        results[name] = ev
    plot = _plot(out, {name: out / name for name in methods})
    main = results["online_dpo"]
    report = {
        "method": "online_dpo", "metric": "mean reward (fraction of warm colour words) of samples",
        "before": round(main["reward_reference"], 4), "after": round(main["reward_policy"], 4),
        "higher_is_better": True, "win_rate_vs_sft": round(main["win_rate"], 4),
        "kl_to_reference": round(main["kl"], 4), "eval_prompts": n_eval, "steps": steps, "sft_steps": sft_steps,
        "sampling": "temperature 1.0, same held-out prompts and seed for every model",
        "train_samples_per_method": steps * 16 * 2,
        "methods": {n: {"reward": round(e["reward_policy"], 4), "win_rate_vs_sft": round(e["win_rate"], 4),
                        "kl_to_reference": round(e["kl"], 4),
                        "final_train_metrics": {k: round(v, 4) for k, v in summaries[n]["stages"][-1]["final"].items()
                                                if k.startswith(("samples/", "rewards/", "loss"))}}
                    for n, e in results.items()},
        "seconds": round(time.time() - t0, 1), "plots": [plot.name],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = "\n".join(f"| {n} | {report['before']} | {m['reward']} | {m['win_rate_vs_sft']} | {m['kl_to_reference']} |"
                      for n, m in report["methods"].items())
    rows = "\n".join(f"| `{p}` | `{a.strip()}` | `{b.strip()}` |" for p, a, b in main["samples"])
    (out / "report.md").write_text(
        f"# mmalign demo: online DPO{' and XPO' if xpo else ''} on warm colours\n\n"
        "Reward = fraction of warm colour words among 6 (the SFT model writes about half). Each method trains "
        f"{steps} steps × 16 prompts × 2 fresh samples, judged by the reward, against the frozen SFT reference. "
        f"Evaluation: {n_eval} held-out prompts, temperature 1.0, the same sampling seed for every model.\n\n"
        "| method | reward before (SFT) | reward after | win-rate vs SFT | KL(policy ‖ SFT), nats/seq |\n"
        f"|---|---|---|---|---|\n{lines}\n\n"
        "XPO's α = 1e-5 (TRL's default) makes its exploration term tiny next to DPO at this length, so XPO and "
        "online DPO differ mostly through XPO's pairs (policy vs reference sample). Training curves show the "
        "reward of the policy's own samples; the 'crude KL' curve is TRL's mean log-ratio over both scored "
        "samples (for XPO half of them are reference samples, so it can go negative); the KL in the table is "
        "estimated on policy samples.\n\n"
        f"![training curves]({plot.name})\n\n## Samples of online DPO (same prompt and seed)\n\n"
        f"| prompt | SFT | online DPO |\n|---|---|---|\n{rows}\n\nRuntime: {report['seconds']} s on CPU.\n")
    return report
