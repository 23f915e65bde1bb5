"""Benchmark (DESIGN.md §5): a contrastive (CLIP InfoNCE) fine-tuning step, mmalign vs open_clip_train.

    .venv/bin/python scripts/bench/clip.py                      # ViT "small" shape, ~19 M parameters, batch 64
    .venv/bin/python scripts/bench/clip.py --quick              # tiny shape, a smoke test
    .venv/bin/python scripts/bench/clip.py --threads 1 --steps 12 --out clip_bench.json

Both sides start from the same random open_clip ``CLIP`` (built from one config with one seed) and train on the
same in-memory batches (synthetic shape images from :mod:`mmalign.data.synthetic_images`, transformed and
tokenised once, so neither side pays for image decoding):

- ``open_clip``: ``open_clip_train.train.train_one_epoch`` itself — the training step open_clip's ``main`` runs —
  over a ``DataLoader`` of those tensors (wrapped like its ``get_synthetic_dataset`` output), with its ``ClipLoss``,
  AdamW with its gain/bias parameter split, fp32, no grad clipping, no scheduler;
- ``mmalign``: ``mmalign.train.loop.fit`` (the one loop: accelerate, metrics, logit-scale clamp) on a
  :class:`~mmalign.methods.clip.ClipTask` (``loss.name=clip``) whose stage data are the same tensors.

Equal settings: AdamW lr 1e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0.1 on ≥2-dim weights, no clipping,
constant LR, fp32, normalised features, learnable logit scale clamped at 100. Each side runs in its own child
process (peak RSS = ``getrusage(RUSAGE_SELF).ru_maxrss`` of that child; ``import_rss_mb`` is the RSS after the
imports both children share) with ``--threads`` torch threads. Step time: each side marks the start of every step
(open_clip: its loss call; mmalign: ``task.score``), wall and process-CPU time; steps 2..N-1 are timed (step 1 is
warm-up), medians reported. Step-0 agreement: the loss of the first batch at the initial weights on each side.
``--inprocess`` runs both sides in this process one after the other (used by the fast test; memory numbers are
then not separable and are reported as null).
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

SHAPES = {
    "quick": {"embed_dim": 32, "image_size": 32, "patch_size": 8, "vision_width": 64, "vision_layers": 2,
              "context_length": 16, "text_width": 32, "text_layers": 2, "text_heads": 2},
    "small": {"embed_dim": 256, "image_size": 64, "patch_size": 8, "vision_width": 256, "vision_layers": 4,
              "context_length": 32, "text_width": 256, "text_layers": 4, "text_heads": 4},
}
LR, WD, SEED = 1e-5, 0.1, 0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _data(spec: dict):
    """``steps × batch`` pre-transformed images and token ids, identical in every process."""
    import torch

    from mmalign.data.synthetic_images import make_samples, render
    from mmalign.models.clip import build_open_clip, tiny_open_clip_config

    bundle = build_open_clip(tiny_open_clip_config(**SHAPES[spec["shape"]]), seed=SEED)
    samples = make_samples(spec["batch"] * spec["steps"], seed=SEED)
    pixels = torch.stack([bundle.transform(render(s, 64)) for s in samples])
    ids, mask = bundle.tokenizer([s.captions()[0] for s in samples])
    return bundle, pixels, ids, mask


def run_open_clip(spec: dict, marks: list, losses: list) -> None:
    import types

    import torch
    from open_clip.loss import ClipLoss
    from open_clip_train.train import train_one_epoch

    from mmalign.train.data_order import BatchOrder

    bundle, pixels, ids, _ = _data(spec)
    model = bundle.model
    model.output_dict = True
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": WD}], lr=LR, betas=(0.9, 0.999),
        eps=1e-8)
    # The batches mmalign's loop draws (its seeded BatchOrder), in the same order: identical step-0 batches.
    order = BatchOrder(len(pixels), spec["batch"], seed=SEED)
    batches = [order.next_indices() for _ in range(spec["steps"])]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixels, ids), batch_sampler=batches)
    loader.num_samples, loader.num_batches = len(pixels), len(loader)
    inner = ClipLoss()

    class DataInfo:  # open_clip_train.data.DataInfo (that module needs webdataset/braceexpand, not installed)
        def __init__(self, dataloader):
            self.dataloader, self.sampler, self.shared_epoch = dataloader, None, None

        def set_epoch(self, epoch):
            pass

    def loss(**kw):
        marks.append((time.perf_counter(), time.process_time()))
        out = inner(**kw)
        losses.append(float(sum(out.values()).detach()))
        return out

    args = types.SimpleNamespace(device="cpu", precision="fp32", distill=False, accum_freq=1, skip_scheduler=True,
                                 grad_clip_norm=None, horovod=False, log_every_n_steps=10**9, batch_size=spec["batch"],
                                 world_size=1, rank=0, local_rank=0, wandb=False)
    train_one_epoch(model, {"train": DataInfo(loader)}, loss, 0, optimizer, None, None, None, args)


def run_mmalign(spec: dict, marks: list, losses: list, out_dir: str) -> None:
    from mmalign.api import load_train_config
    from mmalign.methods.clip import ClipTask
    from mmalign.methods.task import StageData
    from mmalign.train.loop import fit

    bundle, pixels, ids, mask = _data(spec)

    class Tensors:  # the stage data: already transformed/tokenised, like open_clip's in-memory loader
        def __len__(self):
            return len(pixels)

        def __getitem__(self, i):
            return i

    def collate(idx):
        from mmalign.data.batches import ImageTextBatch

        return ImageTextBatch(pixels[idx], ids[idx], mask[idx])

    class BenchTask(ClipTask):
        def stage_data(self, stage):
            return StageData(train=Tensors(), collate=collate)

        def score(self, model, batch):
            marks.append((time.perf_counter(), time.process_time()))
            return super().score(model, batch)

        def loss(self, policy, reference, batch, aux=None):
            out = super().loss(policy, reference, batch, aux)
            losses.append(float(out.loss.detach()))
            return out

    cfg = load_train_config(None, [], {
        "modality": "clip", "loss.name": "clip", "data.train": ["<in memory>"], "run.max_steps": spec["steps"],
        "run.batch_size": spec["batch"], "run.output_dir": out_dir, "run.resume": "never", "run.report_to": ["jsonl"],
        "run.progress": False, "run.save_final": False, "run.seed": SEED, "optim.lr": LR, "optim.weight_decay": WD,
        "optim.scheduler": "constant", "optim.max_grad_norm": None})
    fit(BenchTask(cfg, bundle=bundle), cfg)


def _summary(marks: list, losses: list, import_rss: float | None, peak_rss: float | None, threads: int) -> dict:
    wall = [b[0] - a[0] for a, b in zip(marks[1:], marks[2:], strict=False)]
    cpu = [b[1] - a[1] for a, b in zip(marks[1:], marks[2:], strict=False)]
    step = statistics.median(wall) if wall else float("nan")
    return {"step_s": round(step, 5), "steps_per_s": round(1 / step, 3) if wall else None,
            "cpu_step_s": round(statistics.median(cpu), 5) if cpu else None, "step_s_each": [round(w, 4) for w in wall],
            "peak_rss_mb": None if peak_rss is None else round(peak_rss, 1),
            "import_rss_mb": None if import_rss is None else round(import_rss, 1),
            "step0_loss": losses[0] if losses else None, "threads": threads}


def child(side: str, spec_path: str, out_path: str) -> None:
    import open_clip_train.train  # noqa: F401
    import torch

    import mmalign.methods.clip  # noqa: F401 - same imports on both sides: comparable RSS baselines

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    import_rss = _rss_mb()
    marks, losses = [], []
    if side == "open_clip":
        run_open_clip(spec, marks, losses)
    else:
        run_mmalign(spec, marks, losses, str(Path(out_path).parent / "mmalign_run"))
    Path(out_path).write_text(json.dumps(_summary(marks, losses, import_rss, _rss_mb(), spec["threads"])))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shape, 4 steps, batch 16")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--inprocess", action="store_true", help="no child processes (no memory numbers)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", nargs=3, metavar=("SIDE", "SPEC", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(*a.child)
        return {}
    spec = {"shape": "quick" if a.quick else "small", "steps": a.steps or (4 if a.quick else 12),
            "batch": a.batch or (16 if a.quick else 64), "threads": a.threads}
    load = {"before": round(os.getloadavg()[0], 2)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for side in ("open_clip", "mmalign"):
            out = Path(tmp) / f"{side}.json"
            if a.inprocess:
                import torch

                n = torch.get_num_threads()
                torch.set_num_threads(spec["threads"])
                marks, losses = [], []
                try:
                    if side == "open_clip":
                        run_open_clip(spec, marks, losses)
                    else:
                        run_mmalign(spec, marks, losses, str(Path(tmp) / "mmalign_run"))
                finally:
                    torch.set_num_threads(n)
                results[side] = _summary(marks, losses, None, None, spec["threads"])
            else:
                env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1"}
                subprocess.run([sys.executable, __file__, "--child", side, str(spec_path), str(out)], env=env,
                               check=True, cwd=REPO)
                results[side] = json.loads(out.read_text())
    o, m = results["open_clip"], results["mmalign"]
    import torch

    report = {
        "shape": {**spec, **SHAPES[spec["shape"]]}, "device": "cpu", "open_clip": o, "mmalign": m,
        "speedup": round(o["step_s"] / m["step_s"], 3), "cpu_speedup": round(o["cpu_step_s"] / m["cpu_step_s"], 3),
        "memory_ratio": None if o["peak_rss_mb"] is None else round(m["peak_rss_mb"] / o["peak_rss_mb"], 3),
        "step0_loss_abs_diff": abs(o["step0_loss"] - m["step0_loss"]),
        "load_avg_1m": {**load, "after": round(os.getloadavg()[0], 2)},
        "env": {"cpus": os.cpu_count(), "torch": torch.__version__},
    }
    text = json.dumps(report, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text)
    return report


if __name__ == "__main__":
    main()
