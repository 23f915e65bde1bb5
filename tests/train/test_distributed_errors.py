"""Bad input under two gloo processes (issue 18): a bad data row and a bad config value end both ranks promptly
(no rank left waiting in a collective), with exit code 2 and the clean ``error:`` block naming the row / key and
the fix, and no traceback from mmalign's code. (torchrun's own agent prints a ChildFailedError report of its
own; that is the launcher's, outside mmalign.)

Only rank 0 prints the error block (every rank exits 2). Slow tier: two process starts per case.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from mmalign.data.synthetic import addition_rows, write_jsonl

from . import _run_tiny
from .test_distributed import REPO, TINY, _free_port

WORLD = 2


def _torchrun(tmp_path, *overrides: str) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "mmalign", "train", f"run.output_dir={tmp_path}/out",
           f"model.tiny={TINY}", "loss.name=dpo", "run.max_steps=2", "run.batch_size=2", "run.progress=false",
           "run.resume=never", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=_run_tiny.cpu_env(), capture_output=True, timeout=240)
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


def _assert_clean(rc: int, out: str, headline: str, *needles: str) -> None:
    assert rc != 0, out[-3000:]
    assert re.search(r"exitcode\s*:\s*2\b", out) or "exitcode: 2" in out, out[-3000:]  # the rank's clean exit
    assert not re.search(r'File "[^"]*/mmalign/', out), f"a traceback from mmalign's code:\n{out[-4000:]}"
    copies = out.count(headline)
    assert copies == 1, out[-3000:]  # rank 0's
    for n in needles:
        assert n in out, (n, out[-3000:])


@pytest.mark.slow
def test_a_bad_row_ends_both_ranks_cleanly(tmp_path):
    data = write_jsonl(addition_rows(14, seed=2), tmp_path / "train.jsonl")
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "1+1=", "chosen": 5, "rejected": "3"}) + "\n")
    rc, out = _torchrun(tmp_path, f"data.train=[{data}]")
    _assert_clean(rc, out, "error: 1 bad row", f"{data}:15: field 'chosen'", "data.skip_bad_rows=true")


@pytest.mark.slow
def test_a_bad_config_value_ends_both_ranks_cleanly(tmp_path):
    data = write_jsonl(addition_rows(14, seed=2), tmp_path / "train.jsonl")
    rc, out = _torchrun(tmp_path, f"data.train=[{data}]", "optim.lr=-1")
    _assert_clean(rc, out, "optim.lr", "error")
