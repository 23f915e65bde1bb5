"""One demo over seeds 0..N-1: mean and spread of its metric, the report every ``mmalign demo`` writes.

Each demo module keeps its single-seed ``run(out_dir, *, seed=0, ...)`` (seed 0 of the full setting is the run the
README's figures were measured on, unchanged) and declares a :class:`SeedSpec`: the keyword arguments of its full
and fast settings, and which fields of its single-seed report to aggregate. :func:`run_seeds` runs seeds 0..N-1
(the ``seed`` argument sets the training, data and sampling seeds of that run) into ``out_dir/seed{k}/`` and writes
``out_dir/report.json``, ``report.md`` and ``seeds.png``:

- ``before`` / ``after``: means over the seeds; ``before_spread`` / ``after_spread``: sample standard deviation
  (ddof 1) and the 95 % Student-t interval of the mean, ``mean ± t(0.975, n−1)·std/√n``;
- ``change``: the same for the paired per-seed difference ``after − before``, and ``improved_seeds`` (how many
  seeds moved the metric the better way);
- ``win_rate`` where the demo has one (its per-seed win-rate aggregated the same way), other metrics under
  ``metrics``; ``per_seed``: ``[{seed, before, after, ...}]`` with each seed's own report under ``report``.

With 3 seeds the interval is wide (t = 4.30): it says how far one seed's figure can be trusted, not that an effect is
significant. A demo with nothing random (``deterministic=True``, the loss showcase) runs once and says so.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Two-sided 95 % quantiles of Student's t, df 1..30 (standard tables).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


@dataclass(frozen=True)
class SeedSpec:
    """How a demo runs over seeds.

    ``full``: ``run()`` keyword arguments of the full setting (``{}`` = the defaults the README figures come from);
    ``fast``: those of the reduced default (keeps ``make demo`` short; its numbers are a smoke test, not an effect).
    ``win_rate``: dotted path of the per-seed win-rate in the single-seed report, if the demo has one.
    ``metrics``: name → dotted path of other per-seed numbers to aggregate like ``before`` / ``after``.
    ``claim``: the direction the README claims, as ``(larger, smaller)`` metric names (``before``, ``after`` or a
    ``metrics`` name) whose means the slow tier compares; ``None`` where no effect is claimed.
    """

    full: dict = field(default_factory=dict)
    fast: dict = field(default_factory=dict)
    win_rate: str | None = None
    metrics: dict[str, str] = field(default_factory=dict)
    claim: tuple[str, str] | None = None
    deterministic: bool = False


def t975(df: int) -> float:
    """Two-sided 95 % Student-t quantile; beyond the table, the Cornish–Fisher expansion around z = 1.96."""
    if df < 1:
        return float("nan")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def spread(values: list[float]) -> dict:
    """Mean, sample std (ddof 1; 0 for one value) and the 95 % t-interval of the mean (the mean itself for n = 1)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = t975(n - 1) * std / math.sqrt(n) if n > 1 else 0.0
    r = lambda x: round(x, 4)  # noqa: E731
    return {"mean": r(mean), "std": r(std), "ci95": [r(mean - half), r(mean + half)], "n": n}


def lookup(report: dict, path: str):
    """``report["a"]["b"]`` for ``path = "a.b"``; a missing key names the path and the keys that exist."""
    node = report
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            have = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise KeyError(f"demo report has no {path!r} (at {part!r}; keys there: {have})")
        node = node[part]
    return node


def spec_of(run: Callable[..., dict]) -> SeedSpec:
    """The :class:`SeedSpec` declared as ``SEEDS`` beside a demo's ``run`` function."""
    import importlib

    spec = getattr(importlib.import_module(run.__module__), "SEEDS", None)
    if not isinstance(spec, SeedSpec):
        raise TypeError(f"{run.__module__} declares no SEEDS = SeedSpec(...) beside its run function")
    return spec


def aggregate(name: str, reports: list[tuple[int, dict, float]], spec: SeedSpec, setting: str, kwargs: dict) -> dict:
    """The multi-seed report from ``(seed, single-seed report, wall seconds)`` triples."""
    first = reports[0][1]
    better = 1.0 if first.get("higher_is_better", True) else -1.0
    per_seed = []
    for seed, rep, secs in reports:
        row = {"seed": seed, "before": rep["before"], "after": rep["after"]}
        if spec.win_rate:
            row["win_rate"] = lookup(rep, spec.win_rate)
        row.update({k: lookup(rep, p) for k, p in spec.metrics.items()})
        per_seed.append({**row, "seconds": round(secs, 1), "report": f"seed{seed}/report.json"})
    col = lambda k: [float(r[k]) for r in per_seed]  # noqa: E731
    before, after = spread(col("before")), spread(col("after"))
    change = spread([a - b for a, b in zip(col("after"), col("before"), strict=True)])
    out = {
        "demo": name, "method": first["method"], "metric": first["metric"],
        "higher_is_better": first.get("higher_is_better", True), "setting": setting,
        "seeds": [r["seed"] for r in per_seed],
        "before": before["mean"], "after": after["mean"], "before_spread": _no_mean(before),
        "after_spread": _no_mean(after), "change": change,
        "improved_seeds": f"{sum(better * (a - b) > 0 for a, b in zip(col('after'), col('before'), strict=True))}/"
                          f"{len(per_seed)}",
    }
    if spec.win_rate:
        out["win_rate"] = {"field": spec.win_rate, **spread(col("win_rate"))}
    out["metrics"] = {k: {"field": p, **spread(col(k))} for k, p in spec.metrics.items()}
    out["per_seed"] = per_seed
    out["run_kwargs"] = {k: v for k, v in kwargs.items() if k != "seed"}
    out["seconds"] = round(sum(r[2] for r in reports), 1)
    return out


def _no_mean(s: dict) -> dict:
    return {k: v for k, v in s.items() if k != "mean"}


def run_seeds(name: str, run: Callable[..., dict], out_dir: str | Path, *, seeds: int = 3, full: bool = False,
              log: Callable[[str], None] | None = None) -> dict:
    """Run demo ``name`` (its single-seed ``run``) for seeds 0..``seeds``−1 and write the multi-seed report."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: need at least 1 seed (3 or more for a spread)")
    spec, out = spec_of(run), Path(out_dir)
    setting = "full" if full else "fast"
    kwargs = dict(spec.full if full else spec.fast)
    if spec.deterministic:  # nothing random: one run is every seed's run
        t0 = time.time()
        report = run(out, **kwargs)
        report["seeds"] = "none: deterministic (no training, no sampling), run once"
        report["seconds"] = round(time.time() - t0, 1)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        return report
    reports = []
    for seed in range(seeds):
        if log:
            log(f"{name}: seed {seed} of 0..{seeds - 1} ({setting} setting)")
        t0 = time.time()
        rep = run(out / f"seed{seed}", seed=seed, **kwargs)
        reports.append((seed, rep, time.time() - t0))
    report = aggregate(name, reports, spec, setting, kwargs)
    report["plots"] = [plot(report, out / "seeds.png").name]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    return report


def fmt(s: dict, mean: float | None = None) -> str:
    """``mean ± std [lo, hi]`` of a :func:`spread` (``mean`` given separately for before/after spreads)."""
    m = s["mean"] if mean is None else mean
    return f"{m:.4f} ± {s['std']:.4f} [{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]"


def markdown(r: dict) -> str:
    """report.md of a multi-seed report: mean ± std [95 % interval] and one row per seed."""
    extra = (["win_rate"] if "win_rate" in r else []) + list(r["metrics"])
    rows = ["| " + " | ".join(["seed", "before", "after", *extra, "s"]) + " |", "|" + "---|" * (4 + len(extra))]
    for p in r["per_seed"]:
        cells = [str(p["seed"]), str(p["before"]), str(p["after"]), *(str(p[k]) for k in extra)]
        rows.append("| " + " | ".join(cells) + f" | {p['seconds']} |")
    lines = [
        f"# mmalign demo {r['demo']}: {len(r['seeds'])} seeds, {r['setting']} setting", "",
        f"Metric: {r['metric']} ({'higher' if r['higher_is_better'] else 'lower'} is better). Seed k sets the "
        "training, data and sampling seeds of its run; each seed's own report is under `seed{k}/`.", "",
        "| | mean ± std [95 % t-interval of the mean] |", "|---|---|",
        f"| before | {fmt(r['before_spread'], r['before'])} |", f"| after | {fmt(r['after_spread'], r['after'])} |",
        f"| after − before (paired) | {fmt(r['change'])} |",
    ]
    if "win_rate" in r:
        lines.append(f"| win-rate (`{r['win_rate']['field']}`) | {fmt(r['win_rate'])} |")
    lines += [f"| {k} (`{m['field']}`) | {fmt(m)} |" for k, m in r["metrics"].items()]
    lines += ["", f"Improved on {r['improved_seeds']} seeds.", "", *rows, "",
              f"![per-seed values]({r['plots'][0]})", "", f"Runtime: {r['seconds']} s on CPU ({r['setting']} "
              f"setting; `--full` is the README's).", ""]
    if r["setting"] == "fast":
        lines.insert(2, "Fast setting: a reduced budget that shows the pipeline runs; its numbers are not the "
                        "demo's effect (run `mmalign demo NAME --full`).\n")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> Path:
    """Per-seed before → after (paired lines) and each aggregated metric's per-seed values with mean ± 95 % CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = (["win_rate"] if "win_rate" in r else []) + list(r["metrics"])
    fig, axes = plt.subplots(1, 1 + len(extra), figsize=(4.2 * (1 + len(extra)), 3.6), squeeze=False)
    ax = axes[0][0]
    for p in r["per_seed"]:
        ax.plot([0, 1], [p["before"], p["after"]], marker="o", alpha=0.7, label=f"seed {p['seed']}")
    for x, key in ((0, "before"), (1, "after")):
        lo, hi = r[f"{key}_spread"]["ci95"]
        ax.errorbar([x + 0.06], [r[key]], yerr=[[r[key] - lo], [hi - r[key]]], color="k", capsize=4, marker="s")
    ax.set(xticks=[0, 1], xticklabels=["before", "after"], xlim=(-0.3, 1.3), title=r["metric"][:60])
    ax.legend(fontsize=7)
    for ax, key in zip(axes[0][1:], extra, strict=True):
        s = r[key] if key == "win_rate" else r["metrics"][key]
        vals = [p[key] for p in r["per_seed"]]
        ax.scatter(range(len(vals)), vals, zorder=3)
        ax.axhline(s["mean"], color="k")
        ax.axhspan(*s["ci95"], color="grey", alpha=0.2)
        ax.set(title=key, xlabel="seed", xticks=range(len(vals)))
    fig.suptitle(f"{r['demo']}: {len(r['seeds'])} seeds ({r['setting']}); black = mean, band/bars = 95 % CI")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
