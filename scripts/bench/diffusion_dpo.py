"""Benchmark (DESIGN.md §5): one Diffusion-DPO training step on an SD1.5-shaped UNet, three reference designs.

    .venv/bin/python scripts/bench/diffusion_dpo.py            # SD1.5-shaped, reduced (minutes on 2 CPU cores)
    .venv/bin/python scripts/bench/diffusion_dpo.py --sd15     # the full SD1.5 UNet (needs ~20 GB for variant b)
    .venv/bin/python scripts/bench/diffusion_dpo.py --quick    # tiny components, a smoke test (~1 min)

Variants, each in its own child process (so its peak RSS, ``getrusage(RUSAGE_SELF).ru_maxrss``, is its own),
all through ``mmalign.train`` on the same random weights (fixed seed), data and settings:

- ``lora_adapter`` (a): LoRA r=8 on to_q/k/v/out, reference = the same UNet with adapters disabled (diffusers'
  ``train_diffusion_dpo.py`` design; no second copy);
- ``full_copy`` (b): full fine-tune, reference = a frozen deep copy (Salesforce DiffusionDPO / align-anything);
- ``lora_adapter_cached`` (c): (a) with VAE posteriors and text embeddings cached on disk before training
  (cache build time reported separately, not in the step time).

Shapes: the default UNet has SD1.5's widths (320, 640, 1280), cross-attention dim 768, 8 heads, but 3 blocks with
one layer each (316 M parameters instead of 860 M) so that variant (b) — weights, gradients, two AdamW moments
and the reference copy, 5× the weights in fp32 — fits a shared 23 GB machine; ``--sd15`` uses the real
4-block, 2-layer UNet. The VAE (SD1.5 config, 84 M) and text encoder (CLIP ViT-L/14 text config, 123 M, full
49408-token BPE from open_clip's table) are full size. Images are 256 px (latents 4×32×32), batch 2 pairs,
fp32, AdamW, β = 5000. Weights are random: speed and memory do not depend on their values.

Step time: the median interval between consecutive loss evaluations (one per optimizer step), the first
interval (warm-up) excluded. Reported: steps/s and peak RSS (GB) per variant, the step-0 loss (ln 2 = 0.6931 for
every variant, policy == reference at initialisation, up to fp32 rounding: the gradient-enabled policy forward
and the no-grad reference forward differ by ~1 ulp, which β = 5000 turns into ~1e-4 of loss), and the ratios
``memory_a_over_b``, ``speed_a_over_b``, ``speed_c_over_a``.
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

VARIANTS = ("lora_adapter", "full_copy", "lora_adapter_cached")
SEED = 0


def build_components(shape: str):
    """Random components: ``quick`` (tiny), ``reduced`` (SD1.5 widths, 3 blocks × 1 layer) or ``sd15``."""
    import torch

    from mmalign.models.diffusion import DiffusionComponents
    from mmalign.models.diffusion_tiny import build_tiny_clip_tokenizer, build_tiny_components

    if shape == "quick":
        return build_tiny_components("unet", seed=SEED), 16
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    if shape == "sd15":
        unet_kw = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    else:
        unet_kw = dict(block_out_channels=(320, 640, 1280), layers_per_block=1,
                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    unet = UNet2DConditionModel(sample_size=32, cross_attention_dim=768, attention_head_dim=8, **unet_kw)
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], latent_channels=4, sample_size=256,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        layers_per_block=2)
    tok = build_tiny_clip_tokenizer(num_merges=49152 - 256 - 2, max_length=77)  # the full CLIP vocabulary
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, hidden_act="quick_gelu"))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          steps_offset=1)
    return DiffusionComponents("unet", unet, sched, vae, [te], [tok], source="bench"), 256


def child_main(variant: str, spec_path: str, out_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from mmalign.api import load_train_config, train
    from mmalign.methods.diffusion import DiffusionTask

    t0 = time.time()
    comps, resolution = build_components(spec["shape"])
    lora = variant != "full_copy"
    cfg = load_train_config({
        "modality": "diffusion",
        "model": {"name_or_path": "tiny"},  # components are passed in; nothing is loaded
        "lora": {"enabled": lora, "r": 8, "alpha": 8},
        "reference": {"strategy": "adapter" if lora else "copy"},
        "data": {"train": [str(REPO / "assets" / "diffusion" / "pairs.jsonl")]},
        "loss": {"name": "dpo", "kwargs": {"beta": 5000}},
        "optim": {"lr": 1e-5, "scheduler": "constant"},
        "diffusion": {"resolution": resolution, "cache_latents": variant.endswith("cached"),
                      "cache_text_embeddings": variant.endswith("cached"), "cache_dir": spec["cache_dir"]},
        "run": {"output_dir": str(Path(spec["workdir"]) / variant), "max_steps": spec["steps"],
                "batch_size": spec["batch"], "seed": SEED, "report_to": ["jsonl"], "progress": False,
                "save_final": False, "resume": "never"},
    })
    task = DiffusionTask(cfg, components=comps)
    stamps: list[float] = []
    losses: list[float] = []
    loss_fn = task.loss

    def timed_loss(*args, **kwargs):
        out = loss_fn(*args, **kwargs)
        stamps.append(time.perf_counter())
        losses.append(out.loss.item())
        return out

    task.loss = timed_loss
    t_cache = 0.0
    stage_data = task.stage_data

    def timed_stage_data(stage):
        nonlocal t_cache
        t = time.perf_counter()
        out = stage_data(stage)
        t_cache = time.perf_counter() - t
        return out

    task.stage_data = timed_stage_data
    build_s = time.time() - t0
    train(cfg, task=task)
    intervals = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    step_s = statistics.median(intervals[1:] if len(intervals) > 1 else intervals)  # the first holds warm-up
    result = {
        "variant": variant, "steps_per_s": 1.0 / step_s, "step_seconds": step_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "step0_loss": losses[0], "losses": losses, "data_and_cache_seconds": t_cache, "build_seconds": build_s,
        "trainable_params": sum(p.numel() for p in task.model.parameters() if p.requires_grad),
        "denoiser_params": sum(p.numel() for p in comps.denoiser.parameters()),
    }
    Path(out_path).write_text(json.dumps(result))


def run(shape: str, steps: int, batch: int, threads: int | None, workdir: Path) -> dict:
    spec = {"shape": shape, "steps": steps, "batch": batch, "threads": threads, "workdir": str(workdir),
            "cache_dir": str(workdir / "cache")}
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    results = {}
    for variant in VARIANTS:
        out = workdir / f"{variant}.json"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, __file__, "--child", variant, str(spec_path), str(out)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-4000:]}")
        results[variant] = json.loads(out.read_text())
    return report(results, shape=shape, steps=steps, batch_pairs=batch, threads=threads)


def report(results: dict[str, dict], **header) -> dict:
    """The JSON report of the three child results (per-variant numbers and the ratios)."""
    a, b, c = (results[v] for v in VARIANTS)
    return {
        **header,
        "variants": {k: {kk: v[kk] for kk in ("steps_per_s", "step_seconds", "peak_rss_gb", "step0_loss",
                                                 "data_and_cache_seconds", "trainable_params", "denoiser_params")}
                     for k, v in results.items()},
        "ratios": {"memory_a_over_b": a["peak_rss_gb"] / b["peak_rss_gb"],
                   "speed_a_over_b": a["steps_per_s"] / b["steps_per_s"],
                   "speed_c_over_a": c["steps_per_s"] / a["steps_per_s"]},
    }


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny components: a smoke test")
    parser.add_argument("--sd15", action="store_true", help="the full SD1.5 UNet (4 blocks × 2 layers, 860 M)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (first is warm-up)")
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child (default: torch's)")
    parser.add_argument("--workdir", default=None, help="keep run outputs and caches here")
    parser.add_argument("--json", default=None, help="also write the JSON report to this file")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return None
    shape = "quick" if args.quick else "sd15" if args.sd15 else "reduced"
    steps = args.steps or 4
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        report = run(shape, steps, args.batch, args.threads, workdir)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return report


if __name__ == "__main__":
    main()
