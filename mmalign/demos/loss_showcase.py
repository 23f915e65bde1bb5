"""Loss-engine showcase: every pairwise DPO ``loss_type`` and f-divergence plotted against the margin.

No model is trained here; this shows what ``mmalign.losses`` computes. For each loss the curve is the loss as
a function of the chosen-minus-rejected log-ratio margin (reference = 0, β = 1, unit lengths), with its
value at margin 0 (policy == reference) written in the report, and the slope sign that drives learning.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import losses as L
from .seeds import SeedSpec

SEEDS = SeedSpec(deterministic=True)  # closed-form curves: nothing is trained or sampled


def run(out_dir: str | Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    margin = torch.linspace(-6, 6, 241, dtype=torch.float64)
    zeros, ones = torch.zeros_like(margin), torch.ones_like(margin)
    table = {}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for i, lt in enumerate(sorted(L.DPO_LOSS_TYPES)):
        if lt.startswith("aot"):
            continue  # batch-distributional: a curve per pair is not meaningful
        eps = 1e-3 if lt == "exo_pair" else 0.0
        m = margin.clone().requires_grad_(True)
        res = L.dpo(m / 2, -m / 2, zeros, zeros, beta=1.0, loss_type=lt, label_smoothing=eps,
                    chosen_lengths=ones, rejected_lengths=ones)
        res.per_example.sum().backward()
        y = res.per_example.detach()
        axes[0].plot(margin, y, label=lt, color=plt.cm.tab20(i), ls="-" if i % 2 else "--")
        mid = len(margin) // 2
        table[lt] = {"at_zero_margin": round(float(y[mid]), 6), "slope_at_zero": round(float(m.grad[mid]), 6)}
    axes[0].set(title="DPO loss types (β=1)", xlabel="log-ratio margin r_w − r_l", ylabel="loss", ylim=(-0.1, 6))
    axes[0].legend(fontsize=7, ncol=2)
    for fd in sorted(L.F_DIVERGENCES):
        m = margin.clone()
        y = L.dpo(m / 2, -m / 2, zeros, zeros, beta=1.0, f_divergence=fd).per_example
        axes[1].plot(margin, y, label=fd)
    axes[1].set(title="sigmoid DPO under f-divergences", xlabel="log-ratio margin", ylabel="loss", ylim=(-0.1, 6))
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "dpo_losses.png", dpi=110)
    plt.close(fig)

    k = torch.arange(2, 9)
    pl = [float(L.plackett_luce(torch.zeros(1, int(n))).loss) for n in k]
    report = {"method": "loss-engine showcase", "metric": "loss at policy == reference", "dpo": table,
              "plackett_luce_equal_scores": dict(zip([int(n) for n in k], pl, strict=True)),
              "npo_at_init_beta_0.1": float(L.npo(torch.zeros(1), torch.zeros(1), beta=0.1).loss),
              "losses_available": sorted(L.LOSSES)}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = ["# mmalign loss-engine showcase", "", "![](dpo_losses.png)", "",
             "| loss_type | loss at margin 0 | d loss / d margin at 0 |", "|---|---|---|"]
    lines += [f"| {k} | {v['at_zero_margin']} | {v['slope_at_zero']} |" for k, v in table.items()]
    lines += ["", f"Plackett-Luce with K equal scores = log K!: {report['plackett_luce_equal_scores']}",
              f"NPO at init (β=0.1) = (2/β)·ln 2 = {report['npo_at_init_beta_0.1']:.4f}",
              "", f"{len(L.LOSSES)} losses in `mmalign.losses.LOSSES`."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return report
