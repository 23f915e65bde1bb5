"""Two CPU processes (torch.distributed.run, gloo) with per-process batch b train the same weights as one
process with batch b and grad_accum 2: same global batch of 2b per optimizer step, the same samples (the
union of the ranks' micro-batches is the single process's accumulation micro-batches), and the same mean
over the global batch (DDP averages gradients over ranks; accelerate divides each micro-batch loss by
grad_accum). fp32, no dropout; losses that are means over examples only (in-batch contrastive losses are
not equivalent under sharding by construction).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from mmalign.data.synthetic import addition_rows, write_jsonl
from mmalign.train.data_order import BatchOrder
from mmalign.train.metrics_log import read_metrics

from . import _run_tiny

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TINY = "{hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 64}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(out: Path, data: Path, grad_accum: int) -> list[str]:
    # 14 rows, batch 2: an optimizer step takes 4 rows, 3 steps per epoch (the 2-row tail is dropped in both
    # runs: the single process must not fill its 4th step with a ragged 7th micro-batch of epoch 0).
    return [f"run.output_dir={out}", f"data.train=[{data}]", f"model.tiny={TINY}", "loss.name=dpo",
            "reference.strategy=copy", "optim.lr=1e-3", "optim.scheduler=linear", "optim.max_grad_norm=1.0",
            "run.max_steps=4", "run.batch_size=2", f"run.grad_accum={grad_accum}", "run.seed=5",
            "run.deterministic=true", "run.progress=false", "run.report_to=[jsonl]", "run.resume=never"]


def test_batch_order_shards_the_global_batch_like_accumulation():
    """Per optimizer step, the two ranks' batches together are the single process's two micro-batches."""
    single = BatchOrder(14, 2, seed=5, grad_accum=2)
    ranks = [BatchOrder(14, 2, seed=5, world_size=2, rank=r) for r in range(2)]
    for _ in range(7):  # across two epoch boundaries
        assert [single.next_indices(), single.next_indices()] == [r.next_indices() for r in ranks]


def test_two_gloo_processes_equal_one_process_with_grad_accum(tmp_path):
    data = write_jsonl(addition_rows(14, seed=2), tmp_path / "train.jsonl")
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = _run_tiny.cpu_env()  # gloo on CPU even where there is a GPU
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(HERE / "_run_tiny.py"), *_argv(ddp, data, grad_accum=1)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _run_tiny.run_cpu(_argv(single, data, grad_accum=2))  # in-process while the two ranks start up
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode(errors="replace")[-4000:]

    summaries = [json.loads((ddp / f"summary-rank{r}.json").read_text()) for r in range(2)]
    assert all(s["global_step"] == 4 for s in summaries)
    a, b = load_file(str(single / "final" / "model.safetensors")), load_file(str(ddp / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"max |Δw| = {worst}"

    # Only rank 0 logs; the logged loss is the mean over the global batch in both runs.
    steps = {name: [r for r in read_metrics(d) if "loss" in r] for name, d in (("single", single), ("ddp", ddp))}
    assert [r["step"] for r in steps["ddp"]] == [1, 2, 3, 4]
    for rs, rd in zip(steps["single"], steps["ddp"], strict=True):
        for key in ("loss", "rewards/accuracies", "grad_norm", "lr"):
            assert abs(rs[key] - rd[key]) <= 1e-5, (rs["step"], key, rs[key], rd[key])
    assert steps["ddp"][-1]["epoch"] == 1  # the 4th step began the second epoch in both runs
