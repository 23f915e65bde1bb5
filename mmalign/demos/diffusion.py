"""``mmalign demo diffusion``: pretrain a tiny text-to-image model on coloured shapes, align it with
Diffusion-DPO on reward-ranked self-generated pairs, train Diffusion-NPO and Self-NPO negative models, and measure
NPO-guided CFG with each.

1. SFT: a random tiny pixel-space UNet (16×16 RGB, ≈250k parameters; frozen random tiny CLIP text encoder)
   learns the denoising loss on synthetic shapes (:mod:`mmalign.data.shapes`), 10 % empty captions for CFG.
   Half of the training images are *faded* (washed-out colours), so the model produces faded images for some
   seeds: the low-quality mode that preference alignment should remove.
2. Pairs: the SFT model samples several images per caption (DDIM, CFG); the programmatic reward (caption colour
   agreement in [0, 1]) ranks them, and the top/bottom samples of a caption make up to 4 pairs.
3. Diffusion-DPO on those pairs, from the SFT model, which is also the frozen reference (original β convention).
4. Diffusion-NPO: the same DPO run on the reversed pairs, with 20 % empty captions (the original Diffusion-DPO
   code's prompt dropout) and a lower learning rate, stored as δ = θ_npo − θ_sft. NPO-CFG puts the negative
   model on the *unconditional* branch, so both choices matter; measured while building the demo (mean reward,
   w = 3, base → base + NPO-CFG / DPO → DPO + NPO-CFG, α = 1):
   - no caption dropout (lr 1e-4, β = 1): 0.724 → 0.688 / 0.763 → 0.710 (4 eval seeds): the NPO model's
     unconditional branch was never trained on the reversed pairs, and NPO-CFG lowered the reward;
   - dropout 0.2, lr 1e-4 (the DPO run's): β = 0.5: 0.735 → 0.740 / 0.775 → 0.773; β = 1: 0.730 / 0.750
     (8 eval seeds; dropout 0.5 gave the same picture): the offset is too large at β = 1;
   - dropout 0.2, lr 3e-5 (the defaults): β = 0.5: 0.735 → 0.742 / 0.775 → 0.781; β = 1: 0.747 / 0.781.
   β = 1 with α = 1 (θ_neg = θ_dpo + δ) is the reference code's default (merge_weight 0).
   Self-NPO's δ lowered the reward at every setting tried (lr 2e-4 / 5e-5 / 2e-5 for 100 steps, β = 0.5 / 1:
   base −0.009 to −0.027, DPO −0.006 to −0.020, 8 eval seeds), less so the smaller the offset: on this toy the
   model's own samples do not carry the faded failure mode more than its training data does.
5. Self-NPO (data-free truncated diffusion fine-tuning) from the SFT model: δ = θ_selfnpo − θ_sft.
6. Evaluation on captions × seeds held out from the pair seeds: mean reward of samples from the SFT model, the
   DPO model, and each with NPO-guided CFG (θ_neg = θ_sft + α·(θ_pos − θ_sft) + β·δ) for both negative models.

Two choices make a 16×16 model usable in a few CPU minutes (both measured while building the demo): x0
("sample") prediction, since an ε-model's x̂0 = (x − σε̂)/α amplifies its errors up to 15× at high noise and
600 steps gave speckled samples whose colours followed the seed more than the caption (reward ≈ 0.62 against
≈ 0.75); and zero terminal SNR (Lin et al., arXiv 2305.08891), since with the SD schedule's ᾱ_T ≈ 0.005 the
model reads the background brightness off the mean of the initial noise (reward 0.75 → 0.82 with it).
Diffusion-DPO's β was tuned on this toy (β = 2000 original convention, lr 1e-4): β ≤ 200 lets both errors grow
(reward falls), β ≥ 5000 barely moves the samples. With caption-specific defects (mislabelled shape colours)
instead of a shared low-quality mode, DPO raised the held-out implicit accuracy to ≈ 0.9 but not the reward.

Every training run is a plain config through ``mmalign.train`` (the one loop), as a user would write it: the
SFT run builds the tiny model (``diffusion.zero_terminal_snr=true``), and every later run loads the SFT
pipeline directory with ``model.name_or_path`` (``diffusion.pixel_space=true``: no VAE).

Writes ``report.json`` (``method, metric, before, after, higher_is_better, settings``), ``report.md``,
``training_curves.png`` and one sample grid PNG per setting.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..data import shapes as S
from .seeds import SeedSpec

# The claim is DPO over base; the NPO-CFG / Self-NPO rows are measured and aggregated, not claimed (README).
SEEDS = SeedSpec(fast={"n_images": 48, "sft_steps": 4, "dpo_steps": 2, "self_npo_steps": 2, "pair_seeds": 3,
                       "eval_seeds": 2, "captions": 3, "sample_steps": 3},
                 win_rate="settings.win_rate_dpo_vs_base",
                 metrics={"base+npo_cfg": "settings.base+npo_cfg", "dpo+npo_cfg": "settings.dpo+npo_cfg",
                          "base+self_npo_cfg": "settings.base+self_npo_cfg",
                          "dpo+self_npo_cfg": "settings.dpo+self_npo_cfg"},
                 claim=("after", "before"))

RESOLUTION = 16
TINY = "model.tiny={channels: [16, 32], text_hidden: 32, text_max_length: 20}"
# x0 ("sample") prediction: see the module docstring.
COMMON = ["modality=diffusion", "diffusion.pixel_space=true", f"diffusion.resolution={RESOLUTION}",
          "diffusion.prediction_type=sample", "run.overwrite=true",
          "run.resume=never", "run.report_to=[jsonl]", "run.progress=false", "diffusion.verify_images=false"]

def _config(out: Path, name: str, overrides: list[str], seed: int):
    from ..api import load_train_config

    return load_train_config(None, [*COMMON, f"run.output_dir={out / name}", f"run.seed={seed}", *overrides])


def _train(cfg) -> dict:
    from ..api import train

    return train(cfg)


def _write_images(images: torch.Tensor, captions: list[str], folder: Path, prefix: str) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    names = []
    for i in range(len(arr)):
        p = folder / f"{prefix}_{i:05d}.png"
        Image.fromarray(arr[i]).save(p)
        names.append(str(p.relative_to(folder.parent)))
    return names


def _pairs(pipe, captions: list[str], seeds: list[int], out: Path, name: str, *, guidance: float, steps: int,
           max_pairs: int) -> tuple[Path, dict]:
    """Sample ``len(seeds)`` images per caption, rank them by the reward, write ``{caption, chosen, rejected}``."""
    from ..sample.diffusion import generate

    flat_caps = [c for c in captions for _ in seeds]
    flat_seeds = [s for _ in captions for s in seeds]
    imgs = generate(pipe, flat_caps, flat_seeds, guidance_scale=guidance, num_inference_steps=steps)
    rewards = S.reward(imgs, flat_caps).reshape(len(captions), len(seeds))
    ranked = S.rank_pairs(rewards, strategy="all", min_margin=0.02, max_pairs_per_prompt=max_pairs)
    imgs = imgs.reshape(len(captions), len(seeds), *imgs.shape[1:])
    chosen = torch.stack([imgs[p.prompt_index, p.chosen] for p in ranked])
    rejected = torch.stack([imgs[p.prompt_index, p.rejected] for p in ranked])
    caps = [captions[p.prompt_index] for p in ranked]
    c_names = _write_images(chosen, caps, out / f"{name}_images", "chosen")
    r_names = _write_images(rejected, caps, out / f"{name}_images", "rejected")
    rows = [{"caption": c, "chosen": a, "rejected": b, "margin": round(p.margin, 4)}
            for c, a, b, p in zip(caps, c_names, r_names, ranked, strict=True)]
    path = S.write_jsonl(rows, out / f"{name}.jsonl")
    stats = {"pairs": len(rows), "sampled": len(flat_caps), "mean_margin": float(sum(p.margin for p in ranked) /
                                                                                max(1, len(ranked))),
             "mean_reward_of_samples": float(rewards.mean())}
    return path, stats


def _smooth(y: list[float], k: int = 10) -> list[float]:
    return [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]


def _plot(out: Path, runs: dict[str, Path]) -> Path:
    """Raw (faint) and 10-step moving-average curves of the three runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.metrics_log import read_metrics

    def series(run: str, key: str):
        rows = [r for r in read_metrics(runs[run]) if key in r and "event" not in r and "eval/loss" not in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    panels = [("sft", "loss", "SFT: denoising MSE (x0)"), ("dpo", "loss", "Diffusion-DPO loss"),
              ("dpo", "rewards/accuracies", "DPO implicit accuracy (train batches)"),
              ("dpo", "mse_gap", "DPO: policy − reference MSE"),
              ("npo", "rewards/accuracies", "Diffusion-NPO implicit accuracy (reversed pairs)"),
              ("self_npo", "loss", "Self-NPO x0 regression (pseudo-Huber)")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (run, key, title) in zip(axes.flat, panels, strict=True):
        if key == "mse_gap":
            x, model = series(run, "diffusion/model_mse")
            _, ref = series(run, "diffusion/ref_mse")
            y = [m - r for m, r in zip(model, ref, strict=True)]
            ax.axhline(0, color="grey", lw=0.8)
        else:
            x, y = series(run, key)
        ax.plot(x, y, alpha=0.25, color="tab:blue")
        ax.plot(x, _smooth(y), color="tab:blue")
        ax.set(title=title, xlabel="step")
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run(out_dir: str | Path = "outputs/demo/diffusion", *, seed: int = 0, n_images: int = 1440,
        sft_steps: int = 500, dpo_steps: int = 250, self_npo_steps: int = 100, pair_seeds: int = 12,
        eval_seeds: int = 8, captions: int | None = None, guidance_scale: float = 3.0, sample_steps: int = 20,
        beta: float = 2000.0, dpo_lr: float = 1e-4, alpha: float = 1.0, npo_beta: float = 1.0,
        npo_lr: float = 3e-5, npo_caption_dropout: float = 0.2, faded_prob: float = 0.5) -> dict:
    """Run the demo; ``captions`` limits the caption set (default all 36) for quick runs."""
    from ..models import npo_weights as npo
    from ..sample import diffusion as SD

    t0 = time.time()
    out = Path(out_dir)
    caps = S.all_captions()[:captions] if captions else S.all_captions()
    # 1. SFT on synthetic shapes -----------------------------------------------------------------------------
    data = out / "data"
    samples = S.shape_samples(n_images, seed=seed, size=RESOLUTION, captions=caps, faded_prob=faded_prob)
    paths = S.write_images(samples, data / "images")
    S.write_jsonl([{"caption": s.caption, "image": str(p.relative_to(data))} for s, p in zip(samples, paths,
                                                                                             strict=True)],
                  data / "sft.jsonl")
    sft_cfg = _config(out, "sft", [TINY, f"data.train=[{data / 'sft.jsonl'}]", "loss.name=sft",
                                   f"run.max_steps={sft_steps}", f"run.batch_size={min(16, n_images)}",
                                   "optim.lr=1e-3", "optim.scheduler=cosine", "optim.warmup_steps=20",
                                   "diffusion.proportion_empty_prompts=0.1", "diffusion.zero_terminal_snr=true"],
                      seed)
    sft = _train(sft_cfg)
    # the SFT model as a pipeline directory: the base of every later run and of the NPO offsets
    comps = SD.load_components(out / "sft" / "final")
    sft_unet = SD.load_denoiser(out / "sft" / "final", comps)
    comps.pipeline(sft_unet).save_pretrained(str(out / "sft_pipeline"))
    base = SD.load_components(out / "sft_pipeline")
    pipe = SD.build_pipeline(base, sampler="ddim")

    # 2. reward-ranked pairs from the SFT model's own samples ---------------------------------------------------
    pairs, pair_stats = _pairs(pipe, caps, list(range(1000, 1000 + pair_seeds)), out, "pairs",
                               guidance=guidance_scale, steps=sample_steps, max_pairs=4)
    held, held_stats = _pairs(pipe, caps, list(range(2000, 2000 + max(2, pair_seeds // 2))), out, "pairs_eval",
                              guidance=guidance_scale, steps=sample_steps, max_pairs=1)

    # 3. Diffusion-DPO from the SFT model (frozen copy = reference) ---------------------------------------------
    from_sft = f"model.name_or_path={out / 'sft_pipeline'}"

    def dpo_run(name: str, lr: float, extra: list[str]) -> dict:
        cfg = _config(out, name, [from_sft, f"data.train=[{pairs}]", f"data.eval=[{held}]", "loss.name=dpo",
                                  f"loss.kwargs={{beta: {beta}}}", f"run.max_steps={dpo_steps}",
                                  f"run.batch_size={min(16, pair_stats['pairs'])}", f"optim.lr={lr}",
                                  "optim.scheduler=constant", "reference.strategy=copy", "optim.warmup_steps=10",
                                  *extra], seed)
        return _train(cfg)

    dpo = dpo_run("dpo", dpo_lr, [])
    # 4. Diffusion-NPO: the same training on reversed preferences, with caption dropout (module docstring) -------
    npo_run = dpo_run("npo", npo_lr, ["diffusion.reverse_preferences=true",
                              f"diffusion.proportion_empty_prompts={npo_caption_dropout}"])

    # 5. Self-NPO from the SFT model (data-free) ------------------------------------------------------------------
    npo_kwargs = ("loss.kwargs={k_steps: 3, grid_steps: 10, empty_prompt_prob: 0.5, prompts_file: "
                  f"{out / 'prompts.txt'}}}")
    (out / "prompts.txt").write_text("\n".join(caps) + "\n")
    npo_cfg = _config(out, "self_npo", [from_sft, "loss.name=self_npo", npo_kwargs, f"run.max_steps={self_npo_steps}",
                                        "run.batch_size=16", "optim.lr=2e-4", "optim.scheduler=constant"], seed)
    self_npo = _train(npo_cfg)

    # 6. evaluation: same captions and seeds for every setting -------------------------------------------------------
    dpo_unet = SD.load_denoiser(out / "dpo" / "final", base)
    dpo_pipe = SD.build_pipeline(base, dpo_unet, sampler="ddim")
    settings = [SD.Setting("base", guidance_scale), SD.Setting("dpo", guidance_scale, pipe=dpo_pipe)]
    offsets = {}
    for tag, run_dir in (("npo_cfg", "npo"), ("self_npo_cfg", "self_npo")):
        delta = offsets[tag] = SD.npo_offset_from(out / run_dir / "final", base)
        npo.save_offset(delta, out / f"{run_dir}_offset", metadata={"base": str(out / "sft_pipeline")})
        settings += [SD.Setting(f"base+{tag}", guidance_scale,
                                negative=npo.negative_model(base.denoiser, npo_offset=delta, beta=npo_beta)),
                     SD.Setting(f"dpo+{tag}", guidance_scale, pipe=dpo_pipe,
                                negative=npo.negative_model(base.denoiser, positive=dpo_unet, alpha=alpha,
                                                            npo_offset=delta, beta=npo_beta))]
    seeds = list(range(10_000, 10_000 + eval_seeds))
    images = SD.sample_settings(pipe, settings, caps, seeds, num_inference_steps=sample_steps)
    rewards = {k: S.reward(v.flatten(0, 1), [c for c in caps for _ in seeds]) for k, v in images.items()}
    means = {k: round(float(v.mean()), 4) for k, v in rewards.items()}

    def win(a: str, b: str) -> float:
        from ..eval.paired import win_rate  # paired by caption and seed; a tie counts 1/2

        return round(win_rate(rewards[a], rewards[b]), 4)

    grids = {}
    shown = min(len(caps), 12)
    for name, imgs in images.items():
        path = SD.save_grid(imgs[:shown], out / f"samples_{name.replace('+', '_')}.png",
                            row_labels=[c.replace(" background", "") for c in caps[:shown]],
                            col_labels=[f"s{s}" for s in seeds], title=f"{name}: w={guidance_scale}", scale=4)
        grids[name] = path.name
    plot = _plot(out, {"sft": out / "sft", "dpo": out / "dpo", "npo": out / "npo", "self_npo": out / "self_npo"})

    report = {
        "method": "diffusion_dpo",
        "metric": "mean caption colour agreement reward of samples (mmalign.data.shapes.reward, in [0, 1])",
        "before": means["base"], "after": means["dpo"], "higher_is_better": True,
        "settings": {
            **means,
            "win_rate_dpo_vs_base": win("dpo", "base"),
            "win_rate_base+npo_cfg_vs_base": win("base+npo_cfg", "base"),
            "win_rate_dpo+npo_cfg_vs_dpo": win("dpo+npo_cfg", "dpo"),
            "guidance_scale": guidance_scale, "sample_steps": sample_steps, "sampler": "ddim",
            "npo_alpha": alpha, "npo_beta": npo_beta, "npo_caption_dropout": npo_caption_dropout, "npo_lr": npo_lr,
            "dpo_beta_original_convention": beta,
            "eval_images_per_setting": len(caps) * len(seeds), "captions": len(caps), "eval_seeds": seeds,
        },
        "pairs": pair_stats, "held_out_pairs": held_stats,
        "dpo_eval": {k: round(v, 4) for k, v in dpo["stages"][-1].get("eval", {}).items()},
        "npo_eval": {k: round(v, 4) for k, v in npo_run["stages"][-1].get("eval", {}).items()},
        "offset_norms": {k: npo.offset_norms(v) for k, v in offsets.items()},
        "steps": {"sft": sft_steps, "dpo": dpo_steps, "npo": dpo_steps, "self_npo": self_npo_steps},
        "final_losses": {k: round(r["stages"][-1]["final"]["loss"], 5)
                         for k, r in (("sft", sft), ("dpo", dpo), ("npo", npo_run), ("self_npo", self_npo))},
        "seconds": round(time.time() - t0, 1), "plots": [plot.name], "grids": grids,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report))
    return report


def _markdown(r: dict) -> str:
    s = r["settings"]

    def row(label: str, key: str, ref: str | None = None) -> str:
        delta = f" ({s[key] - s[ref]:+.4f})" if ref else ""
        return f"| {label} | {s[key]}{delta} |\n"

    cfg = f"α = {s['npo_alpha']}, β = {s['npo_beta']}"
    grids = "\n".join(f"- {k}: ![{k}]({v})" for k, v in r["grids"].items())
    return (
        "# mmalign demo: Diffusion-DPO, Diffusion-NPO, Self-NPO and NPO-guided CFG on coloured shapes\n\n"
        "Reward: caption colour agreement in [0, 1] (1 = the shape and background show exactly the colours the "
        "caption names; a flat grey image scores ≈ 0.65). Half of the SFT images were faded (washed-out), so the base "
        "model produces faded samples for some seeds. Same captions and seeds (held out from the pair seeds) for "
        "every row.\n\n"
        f"| setting (CFG w = {s['guidance_scale']}, {s['sample_steps']} DDIM steps) | mean reward |\n|---|---|\n"
        + row("SFT base", "base") + row("Diffusion-DPO", "dpo", "base")
        + row(f"SFT base + NPO-CFG (Diffusion-NPO, β = {s['npo_beta']})", "base+npo_cfg", "base")
        + row(f"DPO + NPO-CFG (Diffusion-NPO, {cfg})", "dpo+npo_cfg", "dpo")
        + row(f"SFT base + NPO-CFG (Self-NPO, β = {s['npo_beta']})", "base+self_npo_cfg", "base")
        + row(f"DPO + NPO-CFG (Self-NPO, {cfg})", "dpo+self_npo_cfg", "dpo")
        + f"\nWin-rates (paired by caption and seed): DPO vs base {s['win_rate_dpo_vs_base']}; base + NPO-CFG vs "
        f"base {s['win_rate_base+npo_cfg_vs_base']}; DPO + NPO-CFG vs DPO {s['win_rate_dpo+npo_cfg_vs_dpo']}.\n"
        f"DPO pairs: {r['pairs']['pairs']} from {r['pairs']['sampled']} base samples (mean reward margin "
        f"{r['pairs']['mean_margin']:.3f}); held-out implicit accuracy after DPO: "
        f"{r['dpo_eval'].get('eval/rewards/accuracies')}, after Diffusion-NPO (reversed pairs): "
        f"{r['npo_eval'].get('eval/rewards/accuracies')}. Diffusion-NPO was trained with "
        f"{s['npo_caption_dropout']:.0%} empty captions so that its unconditional branch, the one NPO-CFG uses, "
        "learns the dispreferred outputs.\n\n"
        "Every figure is reported as measured, whichever way it goes: Self-NPO was designed for large "
        "text-to-image models whose own samples carry recognisable failure modes, which a 16×16 toy may not have.\n\n"
        f"![training curves]({r['plots'][0]})\n\n## Sample grids (rows: captions, columns: seeds)\n\n{grids}\n\n"
        f"Runtime: {r['seconds']} s on CPU.\n"
    )
