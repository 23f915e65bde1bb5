"""``mmalign demo curriculum``: automatic pairs from models of different strength + an easy→hard curriculum.

Xu et al. 2023 (arXiv 2310.02263), on the warm-colours task of :mod:`mmalign.data.warm_colors`:

1. Three source models of known strength, all trained through ``mmalign.train``: **weak** = the SFT model
   after a few steps, **sft** = the same SFT run carried on, **strong** = ``sft`` aligned with DPO on
   reward-labelled pairs. Ranks weak 0 < sft 1 < strong 2 stand in for InstructGPT < ChatGPT < GPT-4.
2. The three sample the same prompts with the same seed (:func:`mmalign.sample.text.generate`); every two
   responses to a prompt form a pair, the stronger model's chosen (no reward labels the pairs), with
   ``difficulty = -strength gap`` (strong-vs-weak easy, adjacent models hard; unverified recollection of the
   paper). The warm-colour reward is only used to report how often the strength labels agree with it.
3. DPO from the **weak** model (also the frozen reference) on these pairs, with the same pairs, total
   steps, stage structure and hyperparameters: (a) the curriculum, 2 stages easy→hard
   (:func:`~mmalign.data.pairs.curriculum_stages`), and (b) 2 stages each drawing from all pairs shuffled
   (:func:`~mmalign.data.pairs.shuffled_mix`). The loop rebuilds the optimizer at every stage, so the mix
   arm has stages too: the arms differ only in which pairs each stage draws from. Repeated over
   ``n_seeds`` training seeds (data order and initial state of each run).
4. Mean reward of samples (same prompts and seed) of the base (weak, ``before``), the curriculum arm
   (``after``) and the mix arm (``mix``, the comparison the paper makes: ``curriculum_minus_mix``), the arms
   averaged over the seeds, with the per-seed values. The default budget
   (30 DPO steps) is chosen so that neither arm saturates (at 120 steps both reach ~0.99). The difference
   between the arms is reported as measured, with no claim that it is significant. ``reanchor=True`` moves
   both arms' reference to the policy at the stage switch (as TEMPLE's staged curriculum does); measured once
   (3 seeds): curriculum 0.804 vs mix 0.818, so re-anchoring did not make the curriculum win either.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..data import warm_colors as W
from ..data.pairs import curriculum_stages, shuffled_mix, write_jsonl
from .seeds import SeedSpec

# No claim: the easy→hard effect does not appear on this toy (README); each seed's report keeps its arms.
SEEDS = SeedSpec(fast={"weak_steps": 20, "sft_steps": 100, "strong_steps": 40, "align_steps": 20, "n_seeds": 1,
                       "n_prompts": 128, "n_eval": 64},
                 metrics={"mix": "mix", "curriculum_minus_mix": "curriculum_minus_mix",
                          "label_agreement_with_reward": "label_agreement_with_reward"})

TINY = "model.tiny={hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 128}"


def _train(out: Path, name: str, overrides: list[str], *, stages: list[dict] | None = None) -> Path:
    """Train (or reuse the cached run with identical settings) and return ``out/name/final``."""
    from ..api import train

    run_dir = out / name
    args = [f"run.output_dir={run_dir}", "run.resume=never", "run.report_to=[jsonl]", "run.progress=false",
            "run.overwrite=true", *overrides]
    key = json.dumps({"args": args, "stages": stages}, sort_keys=True)
    marker = run_dir / "demo_args.json"
    if marker.is_file() and marker.read_text() == key and (run_dir / "final" / "config.json").is_file():
        return run_dir / "final"
    extra = {"stages": stages} if stages else {}
    train(None, args, **extra)
    marker.write_text(key)
    return run_dir / "final"


@torch.no_grad()
def _samples(model_dir: Path, prompts: list[str], seed: int) -> list[str]:
    from ..models.text import load_causal_lm, load_tokenizer
    from ..sample.text import generate

    return generate(load_causal_lm(model_dir), load_tokenizer(model_dir), prompts, max_new_tokens=W.N_WORDS + 2,
                    temperature=1.0, seed=seed, batch_size=64).completions


def _mean_reward(completions: list[str]) -> float:
    return sum(W.reward(c) for c in completions) / max(1, len(completions))


def _plot(out: Path, runs: dict[str, Path], stage_ends: list[int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.metrics_log import read_metrics

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    for label, run_dir in runs.items():
        recs = [r for r in read_metrics(run_dir) if "loss" in r and "event" not in r]
        ax[0].plot([r["step"] for r in recs], [r["loss"] for r in recs], label=label)
        ax[1].plot([r["step"] for r in recs], [r["rewards/margins"] for r in recs], label=label)
    for a in ax:
        for s in stage_ends[:-1]:
            a.axvline(s, color="grey", ls=":", lw=1)
        a.legend()
    ax[0].set(title="DPO loss (curriculum stage switch dotted)", xlabel="step")
    ax[1].set(title="implicit reward margin", xlabel="step")
    fig.tight_layout()
    path = out / "curriculum_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(out_dir: str | Path = "outputs/demo/curriculum", *, seed: int = 0, weak_steps: int = 40,
        sft_steps: int = 300, strong_steps: int = 150, align_steps: int = 30, n_stages: int = 2, n_seeds: int = 3,
        n_prompts: int = 512, n_eval: int = 256, reanchor: bool = False) -> dict:
    t0 = time.time()
    out = Path(out_dir)
    data = out / "data"
    W.write_jsonl(W.sft_rows(3000, seed=seed), data / "sft.jsonl")
    W.write_jsonl(W.preference_rows(2000, seed=seed + 1), data / "labelled_pairs.jsonl")
    sft_args = [f"data.train=[{data / 'sft.jsonl'}]", "loss.name=sft", "run.batch_size=32", "optim.lr=3e-3",
                "optim.scheduler=constant", f"run.seed={seed}", "optim.warmup_steps=0", TINY]
    # 1. source models: weak and sft are the same recipe stopped at different steps (same seed, constant lr)
    weak = _train(out, "weak", [*sft_args, f"run.max_steps={weak_steps}"])
    sft = _train(out, "sft", [*sft_args, f"run.max_steps={sft_steps}"])
    strong = _train(out, "strong", [f"model.name_or_path={sft}", f"data.train=[{data / 'labelled_pairs.jsonl'}]",
                                    "loss.name=dpo", "loss.kwargs={beta: 0.1}", f"run.max_steps={strong_steps}",
                                    "run.batch_size=16", "optim.lr=5e-4", "optim.scheduler=constant",
                                    f"run.seed={seed}", "reference.strategy=copy"])
    # 2. automatic pairs: same prompts and sampling seed for all three, strength ranks only
    from ..data.pairs import build_pairs

    prompts = W.eval_prompts(n_prompts, seed=seed + 5)
    strength = {"weak": 0, "sft": 1, "strong": 2}
    responses = {name: _samples(path, prompts, seed + 6) for name, path in
                 (("weak", weak), ("sft", sft), ("strong", strong))}
    rows, stats = build_pairs(prompts, responses, strength)
    pairs_file = write_jsonl(rows, data / "auto_pairs.jsonl")
    agree = [W.reward(r["chosen"]) > W.reward(r["rejected"]) for r in rows]
    by_gap = {g: [a for a, r in zip(agree, rows, strict=True) if r["strength_gap"] == g] for g in (1, 2)}
    # 3. same budget and stage structure: easy→hard stages vs the same number of stages over the shuffled mix
    # (the loop rebuilds the optimizer at each stage, so both arms restart Adam at the same step and differ
    # only in which pairs each stage draws from); repeated over training seeds
    stages = curriculum_stages(pairs_file, n_stages, data / "curriculum", total_steps=align_steps)
    mix_file = shuffled_mix(pairs_file, data / "mix.jsonl", seed=seed)
    mix_stages = [{"name": f"mix_{i}", "train": [str(mix_file)], "max_steps": s["max_steps"]}
                  for i, s in enumerate(stages)]
    for arm_stages in (stages, mix_stages):  # both arms alike: the reference moves to the policy at each switch
        for i, st in enumerate(arm_stages):
            st["reanchor_reference"] = reanchor and i > 0
    eval_prompts = W.eval_prompts(n_eval, seed=seed + 2)
    rewards = {name: _mean_reward(_samples(path, eval_prompts, seed)) for name, path in
               (("weak", weak), ("sft", sft), ("strong", strong))}
    arms: dict[str, list[float]] = {"mix": [], "curriculum": []}
    for k in range(n_seeds):
        dpo_args = [f"model.name_or_path={weak}", "loss.name=dpo", "loss.kwargs={beta: 0.1}", "run.batch_size=16",
                    "optim.lr=5e-4", "optim.scheduler=constant", f"run.seed={seed + k}", "reference.strategy=copy",
                    f"data.train=[{pairs_file}]"]
        for arm, arm_stages in (("curriculum", stages), ("mix", mix_stages)):
            final = _train(out, f"{arm}_seed{k}", dpo_args, stages=arm_stages)
            arms[arm].append(_mean_reward(_samples(final, eval_prompts, seed)))
    mean = {arm: sum(v) / len(v) for arm, v in arms.items()}
    wins = sum(c > m for c, m in zip(arms["curriculum"], arms["mix"], strict=True))
    ends = [sum(s["max_steps"] for s in stages[: i + 1]) for i in range(len(stages))]
    plot = _plot(out, {"curriculum (seed 0)": out / "curriculum_seed0", "mix (seed 0)": out / "mix_seed0"}, ends)
    report = {
        "method": "auto_pairs_curriculum", "metric": "mean reward (fraction of warm colour words) of samples",
        "before": round(rewards["weak"], 4), "after": round(mean["curriculum"], 4), "higher_is_better": True,
        "base": round(rewards["weak"], 4), "mix": round(mean["mix"], 4),
        "curriculum_minus_mix": round(mean["curriculum"] - mean["mix"], 4),
        "before_is": "the weak model the DPO runs start from (and their reference)",
        "after_is": f"DPO easy→hard curriculum, mean over {n_seeds} training seeds",
        "mix_is": f"DPO on the shuffled mix (same pairs, steps, stages, seeds), mean over {n_seeds} seeds",
        "per_seed": {arm: [round(v, 4) for v in vals] for arm, vals in arms.items()},
        "curriculum_wins": f"{wins}/{n_seeds} seeds",
        "source_model_rewards": {k: round(rewards[k], 4) for k in ("weak", "sft", "strong")},
        "pairs": stats["pairs"], "ties_dropped": stats["ties_identical"],
        "label_agreement_with_reward": round(sum(agree) / max(1, len(agree)), 4),
        "label_agreement_by_gap": {str(g): round(sum(v) / max(1, len(v)), 4) for g, v in by_gap.items()},
        "stages": [{"name": s["name"], "max_steps": s["max_steps"], "pairs": sum(1 for _ in open(s["train"][0]))}
                   for s in stages],
        "align_steps": align_steps, "seed": seed, "eval_prompts": n_eval, "seconds": round(time.time() - t0, 1),
        "plots": [plot.name],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(
        "# mmalign demo: automatic pairs + easy→hard curriculum (Xu et al. 2023, arXiv 2310.02263)\n\n"
        "Pairs: responses of weak (SFT, few steps) < sft < strong (SFT + DPO) models to the same prompts; the "
        "stronger model's response is chosen, difficulty = -strength gap (no reward labels the pairs).\n"
        "DPO starts from the weak model (also the reference). Reward = fraction of warm colour words.\n\n"
        f"| model | mean reward |\n|---|---|\n| weak (base) | {report['base']} |\n"
        f"| sft | {report['source_model_rewards']['sft']} |\n| strong | {report['source_model_rewards']['strong']} |\n"
        f"| DPO, shuffled mix (per seed {report['per_seed']['mix']}) | {report['mix']} |\n"
        f"| DPO, easy→hard curriculum (per seed {report['per_seed']['curriculum']}) | {report['after']} |\n\n"
        f"Curriculum − mix: {report['curriculum_minus_mix']:+.4f}. "
        f"{align_steps} DPO steps in {n_stages} stages for both arms; the curriculum is ahead on "
        f"{report['curriculum_wins']}.\n\n"
        f"{report['pairs']} pairs ({report['ties_dropped']} identical-response ties dropped); the strength labels "
        f"agree with the reward on {report['label_agreement_with_reward']} of them "
        f"(by strength gap: {report['label_agreement_by_gap']}). Stages: {report['stages']}.\n\n"
        f"{n_seeds} training seeds, {n_eval} evaluation prompts: a difference of about 0.01-0.02 is within "
        "seed-to-seed spread; read it as a measurement, not as a significant effect.\n\n"
        f"![curves]({plot.name})\n\nRuntime: {report['seconds']} s on CPU.\n")
    return report
