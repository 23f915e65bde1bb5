"""``mmalign demo seq_contrastive``: Feng et al. 2025 contrastive training on plain SFT data, before vs after.

1. SFT: a random tiny Llama learns the warm-colours corpus (:mod:`mmalign.data.warm_colors`: 6 colour words
   per completion), deliberately briefly, so that its own samples still contain mistakes.
2. ``seq_contrastive`` from the SFT checkpoint on the same SFT rows (no preference labels): the ground truth is
   the positive, negatives are the model's samples (AN), other rows' answers (BN), teacher-forced token
   replacements (MN) and truncations (TN); Plackett–Luce top-1 loss against the frozen SFT reference.
   A second variant adds the MLE term on the positive (``loss.sft_weight``), the combination the paper mentions
   (its weight is not known: ``mle_weight``, 1.0 here, is our choice).
3. Control: continued MLE (``loss.name=sft``) from the same checkpoint for the same number of steps, since the
   paper's claim is "better than more MLE", not "better than the starting point".

Metrics, all on held-out rows and the same sampling seeds for every model:
- **ranking accuracy** (the reported ``metric``; ``after`` is the pure seq_contrastive run): how often a model
  gives the held-out ground truth a higher sequence log-likelihood than a negative; negatives are made once, by
  the SFT model, with every generator, so every model is judged on the same lists (per kind in ``per_kind``).
  Summed log-likelihoods favour short sequences, which is why the SFT model loses to most truncations, and
  argmax replacements (MN) are more likely than the ground truth under the model that made them by construction;
- **valid-sample rate**: share of samples (temperature 1) that are exactly 6 known colour words;
- **warm reward** of samples: the method has no warm preference, so it should stay near the SFT value.

Writes ``report.json``, ``report.md`` and ``training_curves.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..data import warm_colors as W
from .seeds import SeedSpec

SEEDS = SeedSpec(fast={"sft_steps": 60, "steps": 30, "n_eval": 64},
                 metrics={"mle_control": "mle_control", "with_mle_term": "with_mle_term",
                          "valid_rate_sft": "valid_sample_rate.sft",
                          "valid_rate_seq_contrastive": "valid_sample_rate.seq_contrastive"},
                 claim=("after", "before"))

KINDS = ["autoregressive", "batch", "mean_field", "truncation"]
NAMES = ["sft", "seq_contrastive", "seq_contrastive_mle", "mle"]
TINY = "model.tiny={hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 128}"


def _train(out: Path, name: str, overrides: list[str]) -> dict:
    from ..api import train

    return train(None, [f"run.output_dir={out / name}", "run.resume=never", "run.report_to=[jsonl]",
                        "run.overwrite=true", "run.progress=false", *overrides])


def _valid(completion: str) -> bool:
    words = completion.replace(",", " ").split()
    return len(words) == W.N_WORDS and all(w in W.COLORS for w in words)


@torch.no_grad()
def _eval_lists(sft_dir: Path, eval_file: Path, seed: int):
    """Held-out batches with negatives of every kind made by the SFT model (fixed for all models)."""
    from ..api import build_task, load_train_config

    cfg = load_train_config(None, [f"model.name_or_path={sft_dir}", f"data.train=[{eval_file}]",
                                   "loss.name=seq_contrastive", f"options.negatives={KINDS}".replace("'", ""),
                                   "options.max_new_tokens=10", "data.max_length=48", f"run.seed={seed}"])
    task = build_task(cfg)
    data = task.stage_data(task.cfg.stages[0] if task.cfg.stages else _stage())
    batches = []
    for start in range(0, len(data.train), 32):
        batch = data.collate([data.train[i] for i in range(start, min(start + 32, len(data.train)))])
        batches.append(task.add_negatives(task.model, batch, seed + start))
    return batches


def _stage():
    from ..schema import StageConfig

    return StageConfig(name="main")


@torch.no_grad()
def _evaluate(model_dir: Path, batches, prompts: list[str], seed: int) -> dict:
    from ..adapters.causal_lm import score_batch
    from ..data.negatives import KIND_CODES
    from ..models.text import load_causal_lm, load_tokenizer
    from ..sample.text import generate

    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
    wins = {k: [] for k in KINDS}
    for batch in batches:
        logps = score_batch(model, batch).logps
        kinds = batch.extras["candidate_kind"]
        for k in KINDS:
            sel = kinds == KIND_CODES[k]
            wins[k] += (logps[:, :1] > logps).expand_as(sel)[sel].float().tolist()
    per_kind = {k: sum(v) / len(v) for k, v in wins.items() if v}
    per_kind = {"mean": sum(per_kind.values()) / len(per_kind), **per_kind}
    samples = generate(model, tok, prompts, max_new_tokens=W.N_WORDS + 4, temperature=1.0, seed=seed)
    comps = samples.completions
    return {"ranking_accuracy": per_kind["mean"], "per_kind": per_kind,
            "valid_rate": sum(map(_valid, comps)) / len(comps),
            "reward": sum(map(W.reward, comps)) / len(comps), "samples": comps[:8]}


def _plot(out: Path, names: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.metrics_log import read_metrics

    fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
    recs = {n: [r for r in read_metrics(out / n) if "loss" in r and "event" not in r] for n in names}
    ax[0].plot([r["step"] for r in recs["sft"]], [r["loss"] for r in recs["sft"]], label="SFT")
    ax[0].plot([r["step"] for r in recs["mle"]], [r["loss"] for r in recs["mle"]], label="MLE control")
    mix = recs["seq_contrastive_mle"]
    ax[0].plot([r["step"] for r in mix], [r.get("loss/sft") for r in mix], label="MLE term of +MLE")
    ax[0].set(title="NLL per token", xlabel="step")
    ax[0].legend()
    sc = recs["seq_contrastive"]
    ax[1].plot([r["step"] for r in sc], [r["loss"] for r in sc])
    ax[1].set(title="seq_contrastive PL loss (top-1)", xlabel="step")
    for k in KINDS:
        ax[2].plot([r["step"] for r in sc], [r.get(f"accuracy/{k}", float("nan")) for r in sc], label=k)
    ax[2].set(title="train: positive beats negative (log-ratio)", xlabel="step")
    ax[2].legend()
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(out_dir: str | Path = "outputs/demo/seq_contrastive", *, seed: int = 0, sft_steps: int = 120,
        steps: int = 100, n_eval: int = 256, mle_weight: float = 1.0) -> dict:
    t0 = time.time()
    out = Path(out_dir)
    data = out / "data"
    W.write_jsonl(W.sft_rows(3000, seed=seed), data / "sft.jsonl")
    W.write_jsonl(W.sft_rows(n_eval, seed=seed + 5), data / "sft_eval.jsonl")
    sft_dir = out / "sft" / "final"
    if not (sft_dir / "config.json").is_file():  # cached between runs of the demo in the same out_dir
        _train(out, "sft", [f"data.train=[{data / 'sft.jsonl'}]", "loss.name=sft", f"run.max_steps={sft_steps}",
                            "run.batch_size=32", "optim.lr=3e-3", "optim.scheduler=cosine", f"run.seed={seed}",
                            "optim.warmup_steps=20", TINY])
    common = [f"model.name_or_path={sft_dir}", f"data.train=[{data / 'sft.jsonl'}]", f"run.max_steps={steps}",
              "run.batch_size=16", "optim.lr=5e-4", "optim.scheduler=constant", f"run.seed={seed}",
              "data.max_length=48"]
    sc_args = [*common, "loss.name=seq_contrastive", "loss.kwargs={beta: 0.1}", "reference.strategy=copy",
               f"options.negatives={KINDS}".replace("'", ""), "options.max_new_tokens=10"]
    sc = _train(out, "seq_contrastive", sc_args)
    _train(out, "seq_contrastive_mle", [*sc_args, f"loss.sft_weight={mle_weight}"])
    _train(out, "mle", [*common, "loss.name=sft"])
    batches = _eval_lists(sft_dir, data / "sft_eval.jsonl", seed + 11)
    prompts = W.eval_prompts(n_eval, seed=seed + 2)
    ev = {name: _evaluate(d, batches, prompts, seed) for name, d in
          [("sft", sft_dir), *((n, out / n / "final") for n in NAMES[1:])]}
    plot = _plot(out, NAMES)
    r4 = lambda x: round(x, 4)  # noqa: E731
    report = {
        "method": "seq_contrastive",
        "metric": "held-out ranking accuracy: log p(ground truth) > log p(negative), negatives made by the SFT model "
                  "(mean over AN/BN/MN/TN)",
        "before": r4(ev["sft"]["ranking_accuracy"]), "after": r4(ev["seq_contrastive"]["ranking_accuracy"]),
        "higher_is_better": True,
        "mle_control": r4(ev["mle"]["ranking_accuracy"]),
        "with_mle_term": r4(ev["seq_contrastive_mle"]["ranking_accuracy"]), "mle_weight": mle_weight,
        "per_kind": {n: {k: r4(v) for k, v in e["per_kind"].items()} for n, e in ev.items()},
        "valid_sample_rate": {n: r4(e["valid_rate"]) for n, e in ev.items()},
        "warm_reward": {n: r4(e["reward"]) for n, e in ev.items()},
        "train_final": {k: r4(v) for k, v in sc["stages"][-1]["final"].items()},
        "sft_steps": sft_steps, "steps": steps, "eval_rows": n_eval, "seconds": round(time.time() - t0, 1),
        "plots": [plot.name],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report, ev))
    return report


def _markdown(rep: dict, ev: dict) -> str:
    names = NAMES
    head = (f"| | SFT (before) | seq_contrastive (after) | seq_contrastive + {rep['mle_weight']}·MLE | MLE control |"
            "\n|---|---|---|---|---|\n")
    rows = [f"| ranking accuracy, {k} | " + " | ".join(str(rep["per_kind"][n].get(k)) for n in names) + " |"
            for k in ["mean", *KINDS]]
    rows += ["| valid-sample rate | " + " | ".join(str(rep["valid_sample_rate"][n]) for n in names) + " |",
             "| warm reward (should not move) | " + " | ".join(str(rep["warm_reward"][n]) for n in names) + " |"]
    samples = "\n".join("| " + " | ".join(f"`{c.strip()}`" for c in row) + " |" for row in
                        zip(*(ev[n]["samples"] for n in names), strict=True))
    return (f"# mmalign demo: sequence-level contrastive training (Feng et al. 2025, arXiv 2502.16433)\n\n"
            f"SFT {rep['sft_steps']} steps on warm-colour lists, then {rep['steps']} steps of seq_contrastive or of "
            f"more MLE from that checkpoint, on the same SFT rows (no preference labels).\n"
            f"Ranking accuracy: held-out rows, negatives made once by the SFT model; a model wins a pair when it "
            f"gives the ground truth the higher sequence log-likelihood.\n\n{head}" + "\n".join(rows) +
            f"\n\n![training curves]({rep['plots'][0]})\n\n## Samples (same prompt and seed)\n\n"
            f"| SFT | seq_contrastive | + MLE | MLE |\n|---|---|---|---|\n{samples}\n\n"
            f"Runtime: {rep['seconds']} s on CPU.\n")
