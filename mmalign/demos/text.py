"""``mmalign demo text``: SFT a tiny LM on synthetic colour lists, align it with DPO, measure the effect.

1. SFT: a random tiny Llama (BPE tokenizer trained on the data) learns to write 6 colour words, half warm.
2. DPO: pairs from the same distribution, chosen = more warm words (the programmatic reward of
   :mod:`mmalign.data.warm_colors`); the SFT model is both the starting point and the frozen reference.
3. Evaluation on the same prompts and sampling seeds: mean reward and win-rate of DPO samples against the
   SFT model's samples, and the KL(policy ‖ reference) estimated on policy samples.

Writes ``report.json`` (``method, metric, before, after, higher_is_better`` + extras), ``report.md``,
``training_curves.png`` and ``samples.md``. Both runs go through the public API (``mmalign.train``) with the
same loop and data path as a user's run; the DPO run loads the SFT checkpoint with ``from_pretrained``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..data import warm_colors as W
from .seeds import SeedSpec

# Fast: a smoke run of the same pipeline; full ({}): the defaults, seed 0 = the README's single-seed figure.
SEEDS = SeedSpec(fast={"sft_steps": 150, "dpo_steps": 60, "n_eval": 64}, win_rate="win_rate_vs_sft",
                 metrics={"kl_to_reference": "kl_to_reference"}, claim=("after", "before"))


def _train(out: Path, name: str, overrides: list[str]) -> dict:
    from ..api import train

    return train(None, [f"run.output_dir={out / name}", "run.resume=never", "run.report_to=[jsonl]",
                        "run.overwrite=true", "run.progress=true", *overrides])


@torch.no_grad()
def _evaluate(policy_dir: Path, ref_dir: Path, prompts: list[str], seed: int) -> dict:
    from ..eval.text import compare_text
    from ..models.text import load_causal_lm, load_tokenizer

    ev = compare_text(load_causal_lm(policy_dir), load_tokenizer(policy_dir), prompts,
                      reference=load_causal_lm(ref_dir), reward_fn=lambda ps, cs: [W.reward(c) for c in cs],
                      seeds=[seed], max_new_tokens=W.N_WORDS + 2, temperature=1.0)
    return {"reward_policy": ev["reward"], "reward_reference": ev["reward_reference"], "win_rate": ev["win_rate"],
            "kl": ev["kl"], "samples": [(r["prompt"], r["reference"], r["policy"]) for r in ev["samples"][:8]]}


def _plot(out: Path, sft_dir: Path, dpo_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.metrics_log import read_metrics

    sft = [r for r in read_metrics(sft_dir) if "loss" in r]
    dpo = [r for r in read_metrics(dpo_dir) if "loss" in r]
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.6))
    ax[0].plot([r["step"] for r in sft], [r["loss"] for r in sft])
    ax[0].set(title="SFT: NLL per token", xlabel="step")
    for i, (key, title) in enumerate([("loss", "DPO loss"), ("rewards/accuracies", "DPO implicit reward accuracy"),
                                      ("rewards/margins", "DPO reward margin")], start=1):
        ax[i].plot([r["step"] for r in dpo], [r[key] for r in dpo])
        ax[i].set(title=title, xlabel="step")
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(out_dir: str | Path = "outputs/demo/text", *, seed: int = 0, sft_steps: int = 300, dpo_steps: int = 150,
        n_eval: int = 256) -> dict:
    t0 = time.time()
    out = Path(out_dir)
    data = out / "data"
    W.write_jsonl(W.sft_rows(3000, seed=seed), data / "sft.jsonl")
    W.write_jsonl(W.preference_rows(2000, seed=seed + 1), data / "pairs.jsonl")
    W.write_jsonl(W.preference_rows(128, seed=seed + 3), data / "pairs_eval.jsonl")
    tiny = ["model.tiny={hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 128}"]
    sft = _train(out, "sft", [f"data.train=[{data / 'sft.jsonl'}]", "loss.name=sft", f"run.max_steps={sft_steps}",
                              "run.batch_size=32", "optim.lr=3e-3", "optim.scheduler=cosine", f"run.seed={seed}",
                              "optim.warmup_steps=20", *tiny])
    dpo = _train(out, "dpo", [f"model.name_or_path={out / 'sft' / 'final'}", f"data.train=[{data / 'pairs.jsonl'}]",
                              f"data.eval=[{data / 'pairs_eval.jsonl'}]", "loss.name=dpo", "loss.kwargs={beta: 0.1}",
                              f"run.max_steps={dpo_steps}", "run.batch_size=16", "optim.lr=5e-4",
                              "optim.scheduler=constant", f"run.seed={seed}", "reference.strategy=copy"])
    ev = _evaluate(out / "dpo" / "final", out / "sft" / "final", W.eval_prompts(n_eval, seed=seed + 2), seed)
    plot = _plot(out, out / "sft", out / "dpo")
    report = {
        "method": "dpo", "metric": "mean reward (fraction of warm colour words) of samples",
        "before": round(ev["reward_reference"], 4), "after": round(ev["reward_policy"], 4), "higher_is_better": True,
        "win_rate_vs_sft": round(ev["win_rate"], 4), "kl_to_reference": round(ev["kl"], 4),
        "eval_prompts": n_eval, "sampling": "temperature 1.0, same prompts and seed for both models",
        "dpo_eval": {k: round(v, 4) for k, v in dpo["stages"][-1]["eval"].items()},
        "sft_final_nll": round(sft["stages"][-1]["final"]["loss"], 4), "sft_steps": sft_steps,
        "dpo_steps": dpo_steps, "seconds": round(time.time() - t0, 1),
        "plots": [plot.name],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    rows = "\n".join(f"| `{p}` | `{a.strip()}` | `{b.strip()}` |" for p, a, b in ev["samples"])
    (out / "report.md").write_text(
        f"# mmalign demo: text DPO on warm colours\n\nReward = fraction of warm colour words among 6 (random: 0.5).\n\n"
        f"| | SFT (before) | DPO (after) |\n|---|---|---|\n| mean reward | {report['before']} | {report['after']} |\n"
        f"| win-rate of DPO vs SFT samples | | {report['win_rate_vs_sft']} |\n"
        f"| KL(policy ‖ SFT reference), nats/sequence | 0 | {report['kl_to_reference']} |\n\n"
        f"Held-out implicit reward accuracy after DPO: {report['dpo_eval'].get('eval/rewards/accuracies')}.\n\n"
        f"![training curves]({plot.name})\n\n## Samples (same prompt and seed)\n\n| prompt | SFT | DPO |\n"
        f"|---|---|---|\n{rows}\n\nRuntime: {report['seconds']} s on CPU.\n")
    return report
