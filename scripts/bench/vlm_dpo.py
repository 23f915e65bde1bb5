"""Benchmark (DESIGN.md §5): image-conditioned DPO with mmalign vs TRL 1.16 ``DPOTrainer`` on the same tiny
Qwen2-VL, data and settings; and mmalign's video DPO step against a naive per-candidate encoding (TRL has no video
DPO path, TRL issue #4002).

One command runs everything and prints one JSON object (its last output)::

    .venv/bin/python scripts/bench/vlm_dpo.py --threads 1            # full shape (minutes on 2 CPU cores)
    .venv/bin/python scripts/bench/vlm_dpo.py --quick --threads 1    # tiny shape, a smoke test

The parent builds a random ``Qwen2VLForConditionalGeneration`` and its real ``Qwen2VLProcessor``
(:func:`mmalign.models.vlm.build_tiny_vlm`, fixed seed, BPE tokenizer trained on the rows' words), saves both with
``save_pretrained``, writes PNG images, MP4 videos and TRL conversational rows (``prompt`` with an image part,
``chosen`` / ``rejected`` assistant turns, ``images``: [path]). Each side runs in its own child process, so its
peak RSS (``ru_maxrss``) is its own:

- ``trl``: ``DPOTrainer(model=<dir>, processing_class=<its processor>)`` on the rows with PIL images, the default
  live reference (a second copy; ``precompute_ref_log_probs`` is refused for vision data in TRL 1.16). Its
  collator renders the chat template and runs the processor on ``[prompt; chosen]`` and ``[prompt; rejected]``
  rows, so each image goes through the vision tower twice for the policy and twice for the reference.
- ``mmalign``: ``mmalign.api.build_task`` + ``mmalign.train`` on the same directory and jsonl with
  ``reference.strategy=copy`` (a live frozen copy, like TRL) and the whole model trained, vision tower and
  merger included (``vlm.freeze_vision_tower=false``, ``vlm.freeze_projector=false``; TRL trains every weight).
  Media are encoded once per example per pass and the prompt KV cache is shared by chosen and rejected.
- ``trl_frozen_vision`` / ``mmalign_frozen_vision`` (ratios under ``frozen_vision_*``): the vision tower and
  merger frozen, mmalign's default (TEMPLE / ms-swift ``freeze_vit``); TRL gets the model loaded, its ``visual``
  frozen and passed as an instance (TRL builds its reference from the same directory). mmalign then encodes each
  batch's media once for both passes (frozen features shared with the reference); TRL still runs the tower on
  every ``[prompt; completion]`` row of both passes, only its backward is skipped.
- ``video_mmalign`` / ``video_naive``: the same loop (``mmalign.train``, same model, video rows) with the
  family's scorer, or with :func:`mmalign.adapters.vlm.score_candidates_naive` put in ``task.score`` (one full
  ``model(...)`` forward per candidate, its own video encoding, full-vocabulary logits; policy and reference).

Equal settings (TRL vs mmalign): fp32, sdpa attention, no gradient checkpointing (TRL's default is on), batch
size, ``max_length`` 1024 (nothing is cut), AdamW (lr 1e-6, betas (0.9, 0.999), eps 1e-8, no weight decay), linear
schedule without warm-up, grad-norm clipping at 1.0, sigmoid DPO loss with beta 0.1, metrics every step, no
dropout (Qwen2-VL has none by default). Image sizes are multiples of patch x merge (8 px) within the processor's
pixel bounds and mmalign's ``vlm.min_pixels`` / ``max_pixels`` are unset, so both sides get the processor's own
pixels and the same number of ``<|image_pad|>`` tokens.

Timing (as in ``text_dpo.py``): each side marks the start of every optimizer step (TRL: ``on_step_begin``;
mmalign: the grad-enabled policy scoring call). Step 1 is warm-up and the last step has no closing mark, so
``--steps N`` times steps 2..N-1 and reports their median wall time (``step_s``) and process CPU time
(``cpu_step_s``, steadier under load with ``--threads 1``).

Step-0 check: each child scores the first ``--batch`` rows with its own code path (TRL: its collator,
``compute_loss`` and the model forward with ``fused_lm_head``; mmalign: its dataset collate, ``task.score``,
``task.loss``) against one fixed synthetic reference (``-log(V)`` per completion token plus a seeded offset), so
the loss is not the trivial ``log 2``; the report gives the largest difference of those losses and of the
per-sequence policy log-probs. The video pair checks the naive and shared scorers the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(steps=7, batch=4, image=64, prompt_words=24, completion_words=24, vocab=1000, hidden=128, layers=4,
            heads=4, kv_heads=2, intermediate=384, vision_hidden=128, vision_layers=4, vision_heads=4, frames=8,
            video_size=32)
QUICK = dict(steps=4, batch=2, image=16, prompt_words=4, completion_words=4, vocab=300, hidden=32, layers=1,
             heads=2, kv_heads=1, intermediate=64, vision_hidden=32, vision_layers=1, vision_heads=2, frames=4,
             video_size=16)
VARIANTS = ("trl", "mmalign", "trl_frozen_vision", "mmalign_frozen_vision", "video_mmalign", "video_naive")
DEFAULT_VARIANTS = VARIANTS
BETA, LR, SEED, PATCH = 0.1, 1e-6, 0, 4
WORDS = ("red green blue dot square circle moves left right up down the a image video frame shows what which "
         "colour shape where is in of and to small large bright dark top bottom corner centre").split()


# ----------------------------------------------------------------------------------------------------------
# Shared setup (parent)


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_rows(shape: dict, n: int, media_dir: Path, kind: str, seed: int = SEED) -> list[dict]:
    """``n`` TRL conversational rows over PNG images (``kind="image"``, sizes image x image or image x image/2) or
    MP4 videos (``kind="video"``), written to ``media_dir``; prompts and completions of 3/4..1 x their word counts,
    so both sides pad."""
    import numpy as np
    from PIL import Image

    from mmalign.data.synthetic_video import write_moving_shape_video

    rng = random.Random(seed)
    P, C = shape["prompt_words"], shape["completion_words"]
    rows = []
    for i in range(n):
        if kind == "image":
            h, w = shape["image"], shape["image"] if i % 2 == 0 else max(shape["image"] // 2, 8)
            arr = np.random.default_rng(seed * 1000 + i).integers(0, 255, (h, w, 3), dtype=np.uint8)
            path = media_dir / f"img{i}.png"
            Image.fromarray(arr).save(path)
            media = {"images": [str(path)]}
        else:
            path = media_dir / f"vid{i}.mp4"
            write_moving_shape_video(path, shape["frames"], shape["video_size"], seed=seed * 1000 + i, fps=4)
            media = {"videos": [str(path)]}
        text = _sentence(rng, rng.randint(max(1, P * 3 // 4), P))
        rows.append({"prompt": [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}],
                     "chosen": [{"role": "assistant", "content": _sentence(rng, rng.randint(max(1, C * 3 // 4), C))}],
                     "rejected": [{"role": "assistant",
                                   "content": _sentence(rng, rng.randint(max(1, C * 3 // 4), C))}],
                     **media})
    return rows


def probe_reference(rows: list[dict], tokenizer, seed: int = SEED + 1) -> list[list[float]]:
    """Synthetic reference log-probs ``[B, 2]``: ``-log(V)`` per completion token (its text + ``<|im_end|>\\n``)
    plus a seeded offset in [-3, 3] nats, so the DPO margin is not 0 and the loss depends on the policy."""
    rng = random.Random(seed)
    V = len(tokenizer)
    return [[-math.log(V) * (len(tokenizer(r[k][0]["content"])["input_ids"]) + 2) + rng.uniform(-3, 3)
             for k in ("chosen", "rejected")] for r in rows]


def build_model(shape: dict, texts: list[str]):
    from mmalign.models.vlm import build_tiny_vlm, build_vlm_tokenizer

    tok = build_vlm_tokenizer("qwen2_vl", texts, vocab_size=shape["vocab"])
    size = max(shape["image"], shape["video_size"])
    return build_tiny_vlm("qwen2_vl", tok, seed=SEED, hidden_size=shape["hidden"], num_layers=shape["layers"],
                          num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
                          intermediate_size=shape["intermediate"], vision_hidden_size=shape["vision_hidden"],
                          vision_layers=shape["vision_layers"], vision_heads=shape["vision_heads"], image_size=size,
                          patch_size=PATCH)


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------------
# Children: each runs one trainer and writes its result JSON


def _trl_rows(path: str) -> list[dict]:
    from PIL import Image

    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    for r in rows:
        r["images"] = [Image.open(p).convert("RGB") for p in r["images"]]
    return rows


def run_trl(spec: dict, frozen_vision: bool = False) -> dict:
    import datasets
    import torch
    from transformers import AutoProcessor, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    import_rss = _rss_gb()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    B, steps = spec["shape"]["batch"], spec["shape"]["steps"]
    marks: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), time.process_time()))

    init = {"dtype": "float32", "attn_implementation": "sdpa"}
    args = DPOConfig(output_dir=str(Path(spec["workdir"]) / ("trl_frozen" if frozen_vision else "trl")),
                     per_device_train_batch_size=B, max_steps=steps,
                     learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=1024,
                     precompute_ref_log_probs=False, bf16=False, gradient_checkpointing=False, use_cpu=True,
                     report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                     seed=SEED, model_init_kwargs=None if frozen_vision else init)
    t0 = time.perf_counter()
    processor = AutoProcessor.from_pretrained(spec["model_dir"])
    model = spec["model_dir"]
    if frozen_vision:  # what a TRL user does to freeze it: load the model, freeze, pass the instance
        from transformers import Qwen2VLForConditionalGeneration

        model = Qwen2VLForConditionalGeneration.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                                attn_implementation="sdpa")
        model.model.visual.requires_grad_(False)  # mmalign's freeze_vision_tower + freeze_projector
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(
        _trl_rows(spec["data"])), processing_class=processor, callbacks=[StepTimer()])
    setup_s = time.perf_counter() - t0

    # Step-0 probe: TRL's collator, compute_loss and forward on rows 0..B-1, reference log-probs from the probe.
    model = trainer.model
    inputs = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(B)])
    ref = torch.tensor(spec["probe_ref"], dtype=torch.float32)
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
    saved, trainer.precompute_ref_logps = trainer.precompute_ref_logps, True
    model.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(model, inputs))
        kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps",
                                                                "ref_rejected_logps")}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        out = model(**kwargs, labels=labels, fused_lm_head=True, use_cache=False)
        chosen, rejected = out.log_probs.sum(1).chunk(2)
    trainer.precompute_ref_logps = saved
    trainer._metrics["eval"].clear()
    model.train()

    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    return {"step_marks": marks, "setup_s": setup_s, "train_s": train_s, "import_rss_gb": import_rss,
            "probe": {"loss": loss, "logps": [[float(c), float(r)] for c, r in zip(chosen, rejected, strict=True)]}}


def run_mmalign(spec: dict, variant: str) -> dict:
    import torch

    import mmalign.api as mm
    from mmalign.adapters.vlm import score_candidates_naive
    from mmalign.schema import StageConfig
    from mmalign.types import Scores

    import_rss = _rss_gb()
    shape = spec["shape"]
    video = variant.startswith("video")
    frozen = variant == "mmalign_frozen_vision"
    config = {
        "modality": "vlm",
        "model": {"name_or_path": spec["model_dir"], "attn_implementation": "sdpa", "dtype": "float32"},
        "data": {"train": [spec["video_data" if video else "data"]], "max_length": 1024},
        "loss": {"name": "dpo", "kwargs": {"beta": BETA, "loss_type": "sigmoid"}},
        "reference": {"strategy": "copy"},
        "vlm": {"freeze_vision_tower": frozen, "freeze_projector": frozen, "fps": None,
                "max_frames": shape["frames"]},
        "optim": {"name": "adamw", "lr": LR, "scheduler": "linear", "warmup_steps": 0, "weight_decay": 0.0,
                  "max_grad_norm": 1.0},
        "run": {"output_dir": str(Path(spec["workdir"]) / variant), "batch_size": shape["batch"],
                "max_steps": shape["steps"], "seed": SEED, "log_every": 1, "report_to": ["jsonl"],
                "progress": False, "save_final": False, "resume": "never"},
    }
    t0 = time.perf_counter()
    cfg = mm.load_train_config(config)
    task = mm.build_task(cfg)  # loads the processor and the model from model_dir, as `mmalign train` does
    if variant == "video_naive":
        task.score = score_candidates_naive  # (model, batch) -> Scores; the reference copy takes it too
    setup_s = time.perf_counter() - t0

    data = task.stage_data(StageConfig())
    batch = data.collate([data.train[i] for i in range(shape["batch"])])
    task.model.eval()
    with torch.no_grad():
        policy = task.score(task.model, batch)
        ref = Scores(logps=torch.tensor(spec["video_probe_ref" if video else "probe_ref"], dtype=torch.float32))
        loss = float(task.loss(policy, ref, batch).loss)
    probe = {"loss": loss, "logps": policy.logps.tolist()}
    task.model.train()
    del data, batch, policy

    marks: list[tuple[float, float]] = []
    score = task.score

    def timed_score(model, batch):
        if torch.is_grad_enabled():  # the policy pass that opens a training step (the reference runs without grad)
            marks.append((time.perf_counter(), time.process_time()))
        return score(model, batch)

    task.score = timed_score
    t1 = time.perf_counter()
    mm.train(cfg, task=task)
    train_s = time.perf_counter() - t1
    return {"step_marks": marks, "setup_s": setup_s, "train_s": train_s, "import_rss_gb": import_rss,
            "probe": probe}


def child_main(variant: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if variant.startswith("trl"):
        result = run_trl(spec, frozen_vision=variant == "trl_frozen_vision")
    else:
        result = run_mmalign(spec, variant)
    result["peak_rss_gb"] = _rss_gb()
    result["threads"] = torch.get_num_threads()
    Path(out_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------------------
# Parent: set up, run the children one after another, compare


def _summary(result: dict) -> dict:
    marks = result["step_marks"][1:]  # from the start of step 2: step 1 is warm-up
    wall = [b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False)]
    cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:], strict=False)]
    step_s = statistics.median(wall) if wall else float("nan")
    return {"step_s": round(step_s, 4), "steps_per_s": round(1.0 / step_s, 4),
            "peak_rss_gb": round(result["peak_rss_gb"], 3),
            "cpu_step_s": round(statistics.median(cpu), 4) if cpu else float("nan"),
            "step_s_each": [round(s, 3) for s in wall], "setup_s": round(result["setup_s"], 2),
            "train_s": round(result["train_s"], 2), "import_rss_gb": round(result["import_rss_gb"], 3),
            "threads": result["threads"]}


def _run_child(variant: str, spec_path: Path, workdir: Path) -> dict:
    out = workdir / f"{variant}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "HF_DATASETS_CACHE": str(workdir / "hf_datasets"),
           "ACCELERATE_MIXED_PRECISION": "no"}
    proc = subprocess.run([sys.executable, __file__, "--child", variant, str(spec_path), str(out)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {variant!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _max_diff(a: dict, b: dict) -> tuple[float, float]:
    loss = abs(a["probe"]["loss"] - b["probe"]["loss"])
    logps = max(abs(x - y) for ra, rb in zip(a["probe"]["logps"], b["probe"]["logps"], strict=True)
                for x, y in zip(ra, rb, strict=True))
    return loss, logps


def _ratios(report: dict, ours: str, theirs: str, prefix: str = "") -> None:
    m, t = report[ours], report[theirs]
    report[prefix + "speedup"] = round(t["step_s"] / m["step_s"], 3)
    report[prefix + "cpu_speedup"] = round(t["cpu_step_s"] / m["cpu_step_s"], 3)
    report[prefix + "memory_ratio"] = round(m["peak_rss_gb"] / t["peak_rss_gb"], 3)


def run(shape: dict, *, variants: tuple[str, ...] = DEFAULT_VARIANTS, threads: int | None = None,
        workdir: str | None = None) -> dict:
    """Set up the shared model/data in ``workdir`` (a temporary directory by default), run each variant in a
    child process, and return the report (the JSON this script prints)."""
    from mmalign.models.vlm import save_vlm

    load_before = os.getloadavg()
    tmp = None if workdir else tempfile.TemporaryDirectory(prefix="mmalign_vlm_bench_")
    wd = Path(workdir or tmp.name)  # type: ignore[union-attr]
    try:
        (wd / "media").mkdir(parents=True, exist_ok=True)
        n = shape["batch"] * shape["steps"]
        rows = make_rows(shape, n, wd / "media", "image")
        video_rows = make_rows(shape, n, wd / "media", "video", seed=SEED + 7)
        texts = [m["content"] if isinstance(m["content"], str) else m["content"][1]["text"]
                 for r in rows + video_rows for k in ("prompt", "chosen", "rejected") for m in r[k]]
        model, inputs = build_model(shape, texts + list(WORDS))
        save_vlm(model, inputs, wd / "model")
        n_params = sum(p.numel() for p in model.parameters())
        n_visual = sum(p.numel() for p in model.model.visual.parameters())
        del model
        for name, rs in (("data.jsonl", rows), ("video.jsonl", video_rows)):
            (wd / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
        tok = inputs.tokenizer
        spec = {"shape": shape, "threads": threads, "workdir": str(wd), "model_dir": str(wd / "model"),
                "data": str(wd / "data.jsonl"), "video_data": str(wd / "video.jsonl"),
                "probe_ref": probe_reference(rows[: shape["batch"]], tok),
                "video_probe_ref": probe_reference(video_rows[: shape["batch"]], tok)}
        (wd / "spec.json").write_text(json.dumps(spec))
        results = {v: _run_child(v, wd / "spec.json", wd) for v in variants}
    finally:
        if tmp is not None:
            tmp.cleanup()

    report: dict = {"shape": {**shape, "arch": "qwen2_vl", "params": n_params, "visual_params": n_visual,
                              "rows": n, "vocab_size": len(tok)}}
    image_sides = [v for v in variants if not v.startswith("video")]
    report.update({v: _summary(results[v]) for v in image_sides})
    if "mmalign" in report and "trl" in report:
        _ratios(report, "mmalign", "trl")
    if "mmalign_frozen_vision" in report and "trl_frozen_vision" in report:
        _ratios(report, "mmalign_frozen_vision", "trl_frozen_vision", "frozen_vision_")
    report["step0_loss"] = {v: round(results[v]["probe"]["loss"], 7) for v in image_sides}
    trl = [v for v in image_sides if v.startswith("trl")]
    if trl:
        others = [v for v in image_sides if v not in trl]
        if others:
            diffs = [_max_diff(results[v], results[t]) for v in others for t in trl]
            report["step0_loss_max_abs_diff"] = max(d[0] for d in diffs)
            report["step0_logps_max_abs_diff"] = max(d[1] for d in diffs)
    if "video_mmalign" in results and "video_naive" in results:
        vid = {"video_mmalign": _summary(results["video_mmalign"]), "video_naive": _summary(results["video_naive"])}
        _ratios(vid, "video_mmalign", "video_naive")
        vid["step0_loss"] = {v: round(results[v]["probe"]["loss"], 7) for v in ("video_mmalign", "video_naive")}
        vid["step0_loss_max_abs_diff"], vid["step0_logps_max_abs_diff"] = _max_diff(results["video_mmalign"],
                                                                                    results["video_naive"])
        report["video"] = vid
    report["load_avg_1m"] = {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)}
    report["env"] = {"cpus": os.cpu_count(), **{pkg: _version(pkg) for pkg in ("torch", "transformers", "trl")}}
    return report


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape for a smoke test")
    for key in FULL:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                            help=f"default {FULL[key]} ({QUICK[key]} with --quick)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    parser.add_argument("--workdir", default=None, help="keep the model, data and run outputs here")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return {}
    shape = dict(QUICK if args.quick else FULL)
    shape.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    bad = sorted(set(variants) - set(VARIANTS))
    if bad:
        parser.error(f"--variants has {bad}; allowed: {list(VARIANTS)}")
    for width, heads in (("hidden", "heads"), ("vision_hidden", "vision_heads"), ("heads", "kv_heads")):
        if shape[width] % shape[heads]:
            parser.error(f"--{width.replace('_', '-')}={shape[width]} must be divisible by "
                         f"--{heads.replace('_', '-')}={shape[heads]}")
    for key in ("image", "video_size"):
        if shape[key] % (2 * PATCH) or shape[key] < 2 * PATCH:
            parser.error(f"--{key.replace('_', '-')}={shape[key]} must be a positive multiple of {2 * PATCH} "
                         "(patch x merge), so neither side resizes differently")
    if shape["frames"] < 2 or shape["frames"] % 2:
        parser.error(f"--frames={shape['frames']} must be even and >= 2 (Qwen2-VL's temporal patch is 2 frames)")
    if shape["steps"] < 4:
        parser.error(f"--steps={shape['steps']} must be >= 4 (step 1 is warm-up, the last step is not closed)")
    report = run(shape, variants=variants, threads=args.threads, workdir=args.workdir)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
