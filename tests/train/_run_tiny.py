"""Launch one tiny training run in its own process; the loop tests start it as a subprocess.

Usage: ``python tests/train/_run_tiny.py key=value ...`` (``mmalign.train`` overrides), also under
``python -m torch.distributed.run --nproc_per_node 2 tests/train/_run_tiny.py ...`` for the gloo test.

``MMALIGN_TEST_STEP_SLEEP=<seconds>`` sleeps after every micro-batch loss, so that a test can SIGKILL the run
between two checkpoints however fast the machine is; ``MMALIGN_TEST_SAVE_SLEEP=<seconds>`` sleeps after the final
model's files are written (before they are verified and renamed into ``final/``), and
``MMALIGN_TEST_CKPT_SLEEP=<seconds>:<step>`` before the checksums of checkpoint ``<step>`` are written, so that a
test can kill the run during the final save or during a checkpoint write. The summary of the run is written as JSON to
``<output_dir>/summary-rank<r>.json``, which also tells the test that the process got to the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process (and per in-process run, see main): the tests run 2 processes on 2 shared cores, and
# a fixed thread count keeps the CPU kernels' reduction order, hence the bits, the same in every run compared.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _slowed(task, seconds: float):
    loss = task.loss

    def slow_loss(*args, **kwargs):
        time.sleep(seconds)
        return loss(*args, **kwargs)

    task.loss = slow_loss
    return task


def _slow_export(task, seconds: float):
    save = task.save_pretrained

    def slow_save(model, path, state_dict=None):
        save(model, path, state_dict=state_dict)
        time.sleep(seconds)

    task.save_pretrained = slow_save
    return task


def _slow_checkpoint(spec: str) -> None:
    from mmalign.train import checkpoint

    seconds, step = spec.split(":")
    write = checkpoint.write_manifest

    def slow_write(directory):
        if directory.name.startswith(f"checkpoint-{int(step):07d}"):
            time.sleep(float(seconds))
        write(directory)

    checkpoint.write_manifest = slow_write


def main(argv: list[str]) -> dict:
    """Run once; also called in-process by the tests (the thread count is restored afterwards)."""
    import torch

    from mmalign.api import build_task, load_train_config, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_train_config(None, argv)
        task = build_task(cfg)
        sleep = float(os.environ.get("MMALIGN_TEST_STEP_SLEEP", "0") or 0)
        if sleep:
            task = _slowed(task, sleep)
        if os.environ.get("MMALIGN_TEST_SAVE_SLEEP"):
            task = _slow_export(task, float(os.environ["MMALIGN_TEST_SAVE_SLEEP"]))
        if os.environ.get("MMALIGN_TEST_CKPT_SLEEP"):
            _slow_checkpoint(os.environ["MMALIGN_TEST_CKPT_SLEEP"])
        summary = train(cfg, task=task)
    finally:
        torch.set_num_threads(threads)
    rank = int(os.environ.get("RANK", "0"))
    out = Path(cfg.run.output_dir) / f"summary-rank{rank}.json"
    out.write_text(json.dumps(summary, default=str, indent=1))
    return summary


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for a CPU-only run in a subprocess (GPUs hidden, one thread, the repo importable)."""
    repo = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": repo, **extra}


def run_cpu(argv: list[str]) -> dict:
    """One CPU run: in this process where there is no GPU (no start-up cost), else in a subprocess with the GPUs
    hidden, so that runs compared bit for bit use the same kernels."""
    import torch

    if not torch.cuda.is_available():
        return main(argv)
    out = next(a.split("=", 1)[1] for a in argv if a.startswith("run.output_dir="))
    subprocess.run([sys.executable, __file__, *argv], check=True, env=cpu_env(),
                   cwd=Path(__file__).resolve().parents[2])
    return json.loads((Path(out) / "summary-rank0.json").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else gloo's teardown at interpreter exit takes seconds
    sys.exit(0)

