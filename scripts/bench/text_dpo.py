"""Benchmark (DESIGN.md §5): text DPO with mmalign vs TRL 1.16 ``DPOTrainer``, same model, data and settings.

One command runs everything and prints one JSON object::

    .venv/bin/python scripts/bench/text_dpo.py            # full shape (minutes on 2 CPU cores)
    .venv/bin/python scripts/bench/text_dpo.py --quick    # tiny shape, a smoke test (20-50 s)

The parent process builds a random Llama (``LlamaConfig``, fixed seed) and an offline 32k word-level tokenizer,
saves both to a temporary directory with ``save_pretrained`` and writes synthetic preference rows
(``prompt``/``chosen``/``rejected`` strings of word tokens) to a jsonl file. Each trainer then runs in its own
child process, so that its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss`` of that child) is its own:

- ``trl``: ``DPOTrainer(model=<dir>, ...)`` with the default reference (a second copy of the model, live
  forward every step), the way a TRL user trains from a checkpoint directory;
- ``trl_precomputed``: the same with ``precompute_ref_log_probs=True`` (reference log-probs computed once
  before training; the reference model is not kept);
- ``mmalign``: ``mmalign.api.build_task`` + ``mmalign.train`` with ``reference.strategy=precomputed``, loading
  the same directory through ``model.name_or_path`` (the public API; only a timer is wrapped around
  ``task.score``, see Timing).

Equal settings: fp32 weights and math, no gradient checkpointing (TRL defaults to it, and to bf16), the same
attention implementation, batch size, max_length (1024), AdamW (lr 1e-6, betas (0.9, 0.999), eps 1e-8, no weight
decay), linear schedule without warmup, grad-norm clipping at 1.0, sigmoid DPO loss with beta 0.1, metrics
logged every step. TRL's Trainer uses the fused AdamW kernel on torch >= 2.8; mmalign uses ``optim.name=adamw``.

Timing: each side marks the start of every optimizer step with wall and process CPU time (TRL: a
``TrainerCallback.on_step_begin``; mmalign: the policy scoring call that opens each step, seen through a thin
wrapper around ``task.score`` that only records the time). Step i lasts from mark i to mark i+1; step 1 is
warm-up and the last step has no closing mark, so ``--steps N`` times steps 2..N-1 and reports their median
(``step_s``, wall) and the median process CPU time (``cpu_step_s``: with ``--threads 1`` a measure of work
that other jobs on the machine barely disturb). Reference precomputation happens before step 1 in both
precomputed variants, so it is not in the step time; each child's ``train_s`` includes it.

Step-0 loss check: at initialisation the policy equals its reference, so the true step-0 DPO loss is ``log 2`` for
any implementation. To make the comparison informative, each child also scores the first ``--batch`` rows with
its own code path (TRL: its collator and ``compute_loss``; mmalign: its dataset collate, ``task.score`` and
``task.loss``) against a fixed synthetic reference (``-log(V)`` per token plus a seeded offset, the same numbers
for both); the report gives the largest difference of those losses and of the per-sequence policy log-probs.
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

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3; words are "t0", "t1", ... after them
FULL = dict(steps=7, batch=4, prompt_len=384, completion_len=64, vocab=32768, layers=4, hidden=256, heads=4,
            intermediate=768)
QUICK = dict(steps=4, batch=2, prompt_len=24, completion_len=8, vocab=1000, layers=2, hidden=64, heads=4,
             intermediate=128)
VARIANTS = ("trl", "trl_precomputed", "mmalign")
BETA, LR, SEED = 0.1, 1e-6, 0


# ----------------------------------------------------------------------------------------------------------
# Shared setup (parent)


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with ``vocab_size`` entries (4 specials + words ``t0..``), built in-process.

    Words are split on whitespace and specials are matched before that, so ``prompt + chosen + "<eos>"``
    tokenises to exactly the prompt's ids followed by the completion's: TRL (which tokenises the concatenation)
    and mmalign (which tokenises prompt and completion apart) see the same ids. BOS is prepended like Llama's.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"t{i}": i + len(SPECIALS) for i in range(vocab_size - len(SPECIALS))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", model_max_length=4096)


def build_model(shape: dict, attn: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                         intermediate_size=shape["intermediate"],
                         max_position_embeddings=max(1024, shape["prompt_len"] + shape["completion_len"]),
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attn)
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def make_rows(shape: dict, n: int, seed: int = SEED) -> list[dict]:
    """``n`` rows of random words: prompts of 7/8..1 x ``prompt_len`` tokens (BOS included), completions of
    3/4..1 x ``completion_len`` tokens (EOS included), so both trainers pad."""
    rng = random.Random(seed)
    n_words = shape["vocab"] - len(SPECIALS)
    P, C = shape["prompt_len"], shape["completion_len"]

    def words(lo: int, hi: int) -> str:
        return " ".join(f"t{rng.randrange(n_words)}" for _ in range(rng.randint(lo, hi)))

    return [{"prompt": words(max(1, P * 7 // 8 - 1), P - 1), "chosen": " " + words(max(1, C * 3 // 4 - 1), C - 1),
             "rejected": " " + words(max(1, C * 3 // 4 - 1), C - 1)} for _ in range(n)]


def probe_reference(rows: list[dict], vocab: int, seed: int = SEED + 1) -> list[list[float]]:
    """Synthetic reference log-probs ``[B, 2]`` for the step-0 check: ``-log(V)`` per completion token (EOS
    included) plus a seeded offset in [-3, 3] nats, so the DPO margin is not 0 and the loss depends on the
    policy's log-probs."""
    rng = random.Random(seed)
    return [[-math.log(vocab) * (len(r[k].split()) + 1) + rng.uniform(-3, 3) for k in ("chosen", "rejected")]
            for r in rows]


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------------
# Children: each runs one trainer and writes its result JSON


def run_trl(spec: dict, precompute: bool) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    import_rss = _rss_gb()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    B, steps = spec["shape"]["batch"], spec["shape"]["steps"]
    marks: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), time.process_time()))

    args = DPOConfig(output_dir=str(Path(spec["workdir"]) / ("trl_pre" if precompute else "trl")),
                     per_device_train_batch_size=B, max_steps=steps, learning_rate=LR, lr_scheduler_type="linear",
                     warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"],
                     max_length=1024, precompute_ref_log_probs=precompute, bf16=False, gradient_checkpointing=False,
                     use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
                     dataloader_num_workers=0, seed=SEED,
                     model_init_kwargs={"dtype": "float32", "attn_implementation": spec["attn"]})
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=spec["model_dir"], args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=_load_tokenizer(spec["model_dir"]), callbacks=[StepTimer()])
    setup_s = time.perf_counter() - t0

    # Step-0 probe: TRL's own collator and loss on rows 0..B-1, reference log-probs replaced by the probe's.
    model = trainer.model
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(B)])
    ref = torch.tensor(spec["probe_ref"], dtype=torch.float32)
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
    saved, trainer.precompute_ref_logps = trainer.precompute_ref_logps, True
    model.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(model, inputs))
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                    fused_lm_head=True, use_cache=False)
        chosen, rejected = out.log_probs.sum(1).chunk(2)
    trainer.precompute_ref_logps = saved
    trainer._metrics["eval"].clear()

    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    return {"step_marks": marks, "setup_s": setup_s, "train_s": train_s, "import_rss_gb": import_rss,
            "probe": {"loss": loss, "logps": [[float(c), float(r)] for c, r in zip(chosen, rejected, strict=True)]}}


def run_mmalign(spec: dict) -> dict:
    import torch

    import mmalign.api as mm
    from mmalign.schema import StageConfig
    from mmalign.types import Scores

    import_rss = _rss_gb()
    shape = spec["shape"]
    out_dir = Path(spec["workdir"]) / "mmalign"
    config = {
        "model": {"name_or_path": spec["model_dir"], "attn_implementation": spec["attn"], "dtype": "float32"},
        "data": {"train": [spec["data"]], "max_length": 1024},
        "loss": {"name": "dpo", "kwargs": {"beta": BETA, "loss_type": "sigmoid"}},
        "reference": {"strategy": "precomputed"},
        "optim": {"name": "adamw", "lr": LR, "scheduler": "linear", "warmup_steps": 0, "weight_decay": 0.0,
                  "max_grad_norm": 1.0},
        "run": {"output_dir": str(out_dir), "batch_size": shape["batch"], "max_steps": shape["steps"],
                "seed": SEED, "log_every": 1, "report_to": ["jsonl"], "progress": False, "save_final": False,
                "resume": "never"},
    }
    t0 = time.perf_counter()
    cfg = mm.load_train_config(config)
    task = mm.build_task(cfg)  # loads the tokenizer and the model from model_dir, as `mmalign train` does
    setup_s = time.perf_counter() - t0

    # Step-0 probe: mmalign's dataset, collate, adapter and loss on rows 0..B-1 against the probe reference.
    data = task.stage_data(StageConfig())
    batch = data.collate([data.train[i] for i in range(shape["batch"])])
    with torch.no_grad():
        policy = task.score(task.model, batch)
        ref = Scores(logps=torch.tensor(spec["probe_ref"], dtype=torch.float32))
        loss = float(task.loss(policy, ref, batch).loss)
    probe = {"loss": loss, "logps": policy.logps.tolist()}
    del data, batch, policy

    marks: list[tuple[float, float]] = []
    score = task.score

    def timed_score(model, batch):
        if torch.is_grad_enabled():  # the policy pass that opens a training step (precompute runs without grad)
            marks.append((time.perf_counter(), time.process_time()))
        return score(model, batch)

    task.score = timed_score
    t1 = time.perf_counter()
    mm.train(cfg, task=task)
    train_s = time.perf_counter() - t1
    return {"step_marks": marks, "setup_s": setup_s, "train_s": train_s, "import_rss_gb": import_rss,
            "probe": probe}


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def child_main(variant: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if variant == "mmalign":
        result = run_mmalign(spec)
    else:
        result = run_trl(spec, precompute=variant == "trl_precomputed")
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
    return {
        "step_s": round(step_s, 4),
        "steps_per_s": round(1.0 / step_s, 4),
        "peak_rss_gb": round(result["peak_rss_gb"], 3),
        "cpu_step_s": round(statistics.median(cpu), 4) if cpu else float("nan"),
        "step_s_each": [round(s, 3) for s in wall],
        "setup_s": round(result["setup_s"], 2),
        "train_s": round(result["train_s"], 2),
        "import_rss_gb": round(result["import_rss_gb"], 3),
        "threads": result["threads"],
    }


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


def run(shape: dict, *, variants: tuple[str, ...] = VARIANTS, attn: str = "sdpa", threads: int | None = None,
        workdir: str | None = None) -> dict:
    """Set up the shared model/data in ``workdir`` (a temporary directory by default), run each variant in a
    child process, and return the report (the JSON this script prints)."""
    load_before = os.getloadavg()
    tmp = None if workdir else tempfile.TemporaryDirectory(prefix="mmalign_bench_")
    wd = Path(workdir or tmp.name)  # type: ignore[union-attr]
    try:
        wd.mkdir(parents=True, exist_ok=True)
        tokenizer = build_tokenizer(shape["vocab"])
        model = build_model(shape, attn)
        model.save_pretrained(wd / "model")
        tokenizer.save_pretrained(wd / "model")
        n_params = sum(p.numel() for p in model.parameters())
        del model
        rows = make_rows(shape, shape["batch"] * shape["steps"])
        (wd / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = {"shape": shape, "attn": attn, "threads": threads, "workdir": str(wd), "model_dir": str(wd / "model"),
                "data": str(wd / "data.jsonl"), "probe_ref": probe_reference(rows[: shape["batch"]], shape["vocab"])}
        (wd / "spec.json").write_text(json.dumps(spec))
        results = {v: _run_child(v, wd / "spec.json", wd) for v in variants}
    finally:
        if tmp is not None:
            tmp.cleanup()

    report: dict = {"shape": {**shape, "attn": attn, "params": n_params, "rows": len(rows)}}
    report.update({v: _summary(r) for v, r in results.items()})
    m = report.get("mmalign")
    for v, suffix in (("trl", ""), ("trl_precomputed", "_vs_trl_precomputed")):
        if m and v in report:
            report["speedup" + suffix] = round(report[v]["step_s"] / m["step_s"], 3)
            report["cpu_speedup" + suffix] = round(report[v]["cpu_step_s"] / m["cpu_step_s"], 3)
            report["memory_ratio" + suffix] = round(m["peak_rss_gb"] / report[v]["peak_rss_gb"], 3)
    losses = {v: r["probe"]["loss"] for v, r in results.items()}
    logps = {v: r["probe"]["logps"] for v, r in results.items()}
    report["step0_loss"] = {v: round(x, 7) for v, x in losses.items()}
    if "mmalign" in results and len(results) > 1:
        others = [v for v in results if v != "mmalign"]
        report["step0_loss_max_abs_diff"] = max(abs(losses[v] - losses["mmalign"]) for v in others)
        report["step0_logps_max_abs_diff"] = max(abs(a - b) for v in others
                                                 for ra, rb in zip(logps[v], logps["mmalign"], strict=True)
                                                 for a, b in zip(ra, rb, strict=True))
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
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation (both)")
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
    if shape["hidden"] % shape["heads"]:
        parser.error(f"--hidden={shape['hidden']} must be divisible by --heads={shape['heads']}")
    if shape["vocab"] < len(SPECIALS) + 1 or shape["prompt_len"] < 2 or shape["completion_len"] < 2:
        parser.error("--vocab must be >= 5 and --prompt-len/--completion-len >= 2")
    if shape["steps"] < 4:
        parser.error(f"--steps={shape['steps']} must be >= 4 (step 1 is warm-up, the last step is not closed)")
    report = run(shape, variants=variants, attn=args.attn, threads=args.threads, workdir=args.workdir)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
