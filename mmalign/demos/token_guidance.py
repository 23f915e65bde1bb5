"""``mmalign demo token_guidance``: preference-grounded token-level guidance (Yang et al. 2023, arXiv 2306.00398)
on the warm-colours task of :mod:`mmalign.data.warm_colors`.

1. SFT: a random tiny Llama learns to write 6 colour words, half of them warm (cached under ``out_dir/sft``).
2. Guidance training through ``mmalign.train`` (``loss.name=token_guidance``, the one loop): per cycle, one step
   fitting a token-reward model (initialised from the SFT model + a linear head) so that its aggregated token
   rewards rank K policy samples per prompt like the programmatic reward (fraction of warm words), by ListMLE;
   then one LM step with the learned token rewards as weights (``lm_objective``: ``self_sample`` = reward-weighted
   NLL of the policy's own samples + entropy bonus, or ``wmle`` = reward-weighted MLE of the SFT data).
3. Evaluation on the same prompts and sampling seed for both models: mean reward of the samples before (SFT)
   and after (guided policy), the win-rate, and how often the learned reward model orders two SFT samples with
   different true rewards correctly (pairwise accuracy of its aggregates; 0.5 = chance).

Writes ``report.json`` (``method, metric, before, after, higher_is_better`` + extras), ``report.md`` and
``training_curves.png``. The numbers are whatever the run measured; nothing is tuned per seed.

Measured (seed 0, defaults, 256 prompts; CPU): ``wmle`` (default) mean reward 0.471 -> 0.826, win-rate 0.975,
reward-model pairwise accuracy 0.977; ``self_sample`` (entropy 0.125) 0.471 -> 0.645, win-rate 0.81, accuracy
0.91, but unstable (training-sample reward dipped to ~0.26 midway) and its samples pick up junk tokens after the
colour words (the entropy bonus raises them and the reward ignores words after the sixth).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..data import warm_colors as W
from .seeds import SeedSpec

SEEDS = SeedSpec(fast={"sft_steps": 150, "guidance_steps": 40, "n_eval": 64}, win_rate="win_rate_vs_sft",
                 metrics={"reward_model_pairwise_accuracy": "reward_model_pairwise_accuracy"},
                 claim=("after", "before"))

TINY = "model.tiny={hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 128}"


def _train(out: Path, name: str, overrides: list[str]) -> dict:
    from ..api import train

    return train(None, [f"run.output_dir={out / name}", "run.resume=never", "run.report_to=[jsonl]",
                        "run.overwrite=true", "run.progress=false", *overrides])


@torch.no_grad()
def _evaluate(policy_dir: Path, sft_dir: Path, prompts: list[str], seed: int, k: int = 4) -> dict:
    from ..losses import aggregate_token_values
    from ..methods.rewards import TokenRewardModel
    from ..models.text import load_causal_lm, load_tokenizer
    from ..sample.text import generate

    tok = load_tokenizer(policy_dir)
    policy, sft = load_causal_lm(policy_dir), load_causal_lm(sft_dir)
    gen = {"max_new_tokens": W.N_WORDS + 2, "temperature": 1.0, "seed": seed}
    s_pol, s_sft = generate(policy, tok, prompts, **gen), generate(sft, tok, prompts, **gen)
    r_pol = [W.reward(c) for c in s_pol.completions]
    r_sft = [W.reward(c) for c in s_sft.completions]
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(r_pol, r_sft, strict=True)]
    # The learned token-reward model, on K fresh SFT samples per prompt: does its aggregate order them like
    # the programmatic reward?
    rm = TokenRewardModel.from_pretrained(policy_dir / "token_reward_model").eval()
    many = generate(sft, tok, [p for p in prompts for _ in range(k)], seed=seed + 1,
                    **{k_: v for k_, v in gen.items() if k_ != "seed"})
    from ..data.batches import TextBatch

    n, pw = len(prompts), max(len(p) for p in many.prompt_ids)
    cw = max(len(c) for c in many.completion_ids)
    pad = tok.pad_token_id
    pid, pm = torch.full((n, pw), pad), torch.zeros((n, pw), dtype=torch.long)
    cid, cm = torch.full((n, k, cw), pad), torch.zeros((n, k, cw), dtype=torch.long)
    for i in range(n):
        p = many.prompt_ids[i * k]
        pid[i, pw - len(p):], pm[i, pw - len(p):] = torch.tensor(p), 1
        for j in range(k):
            c = many.completion_ids[i * k + j]
            cid[i, j, : len(c)], cm[i, j, : len(c)] = torch.tensor(c), 1
    agg = aggregate_token_values(rm(TextBatch(pid, pm, cid, cm)), cm, mode="mean_list_len")
    true = torch.tensor([W.reward(c) for c in many.completions]).view(n, k)
    dt, da = true[:, :, None] - true[:, None, :], agg[:, :, None] - agg[:, None, :]
    pairs = dt > 0
    acc = float(((da > 0) & pairs).sum() / pairs.sum().clamp_min(1))
    return {"reward_policy": sum(r_pol) / len(r_pol), "reward_sft": sum(r_sft) / len(r_sft),
            "win_rate": sum(wins) / len(wins), "rm_pairwise_accuracy": acc, "rm_pairs": int(pairs.sum()),
            "samples": list(zip(prompts[:8], s_sft.completions[:8], s_pol.completions[:8], strict=True))}


def _plot(out: Path, run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.metrics_log import read_metrics

    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    g = [r for r in rows if "guidance/listmle" in r]
    lm = [r for r in rows if "guidance/listmle" not in r]
    smp = [r for r in rows if "samples/reward_mean" in r]
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.6))
    ax[0].plot([r["step"] for r in g], [r["guidance/listmle"] for r in g])
    ax[0].set(title="reward model: ListMLE", xlabel="step")
    ax[1].plot([r["step"] for r in g], [r["guidance/accuracies"] for r in g])
    ax[1].set(title="reward model: top sample scored highest", xlabel="step")
    ax[2].plot([r["step"] for r in lm], [r["loss"] for r in lm])
    ax[2].set(title="policy: token-weighted loss", xlabel="step")
    ax[3].plot([r["step"] for r in smp], [r["samples/reward_mean"] for r in smp])
    ax[3].set(title="mean reward of training samples", xlabel="step")
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(out_dir: str | Path = "outputs/demo/token_guidance", *, seed: int = 0, sft_steps: int = 300,
        guidance_steps: int = 160, n_eval: int = 256, lm_objective: str = "wmle") -> dict:
    t0 = time.time()
    out = Path(out_dir)
    data = out / "data"
    W.write_jsonl(W.sft_rows(3000, seed=seed), data / "sft.jsonl")
    sft_dir = out / "sft" / "final"
    if not (sft_dir / "config.json").exists():  # cached: the SFT model only depends on the seed and steps
        _train(out, "sft", [f"data.train=[{data / 'sft.jsonl'}]", "loss.name=sft", f"run.max_steps={sft_steps}",
                            "run.batch_size=32", "optim.lr=3e-3", "optim.scheduler=cosine", f"run.seed={seed}",
                            "optim.warmup_steps=20", TINY])
    entropy = 0.125 if lm_objective == "self_sample" else 0.0
    tg = _train(out, "guidance", [
        f"model.name_or_path={sft_dir}", f"data.train=[{data / 'sft.jsonl'}]", "loss.name=token_guidance",
        "reference.strategy=none", f"run.max_steps={guidance_steps}", "run.batch_size=16", "optim.lr=5e-4",
        "optim.scheduler=constant", f"run.seed={seed}", "run.log_every=1",
        f"options={{num_samples: 4, guidance_steps: 1, lm_steps: 1, aggregate: mean_list_len, "
        f"lm_objective: {lm_objective}, entropy_coef: {entropy}, reward_fn: warm_colors, reward_backbone: policy, "
        f"max_new_tokens: {W.N_WORDS + 2}}}"])
    ev = _evaluate(out / "guidance" / "final", sft_dir, W.eval_prompts(n_eval, seed=seed + 2), seed)
    plot = _plot(out, out / "guidance")
    report = {
        "method": "token_guidance", "metric": "mean reward (fraction of warm colour words) of samples",
        "before": round(ev["reward_sft"], 4), "after": round(ev["reward_policy"], 4), "higher_is_better": True,
        "win_rate_vs_sft": round(ev["win_rate"], 4),
        "reward_model_pairwise_accuracy": round(ev["rm_pairwise_accuracy"], 4), "reward_model_pairs": ev["rm_pairs"],
        "lm_objective": lm_objective, "entropy_coef": entropy, "eval_prompts": n_eval,
        "sampling": "temperature 1.0, same prompts and seed for both models", "sft_steps": sft_steps,
        "guidance_run_steps": guidance_steps, "guidance_final": tg["stages"][-1]["final"],
        "seconds": round(time.time() - t0, 1), "plots": [plot.name],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    rows = "\n".join(f"| `{p}` | `{a.strip()}` | `{b.strip()}` |" for p, a, b in ev["samples"])
    (out / "report.md").write_text(
        f"# mmalign demo: token-level guidance on warm colours\n\nReward = fraction of warm colour words among 6 "
        f"(SFT data: 0.5 in expectation). {guidance_steps} steps alternating 1 reward-model step (ListMLE over "
        f"K=4 policy samples per prompt) and 1 policy step (`{lm_objective}`).\n\n"
        f"| | SFT (before) | guided (after) |\n|---|---|---|\n"
        f"| mean reward | {report['before']} | {report['after']} |\n"
        f"| win-rate vs SFT samples | | {report['win_rate_vs_sft']} |\n\n"
        f"Learned token-reward model, pairwise ordering accuracy on {ev['rm_pairs']} pairs of fresh SFT samples "
        f"with different rewards: {report['reward_model_pairwise_accuracy']} (chance 0.5).\n\n"
        f"![training curves]({plot.name})\n\n## Samples (same prompt and seed)\n\n| prompt | SFT | guided |\n"
        f"|---|---|---|\n{rows}\n\nRuntime: {report['seconds']} s on CPU.\n")
    return report
