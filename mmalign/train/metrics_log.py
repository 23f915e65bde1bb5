"""Metrics sinks: an append-only JSONL file, TensorBoard, and wandb when asked.

JSONL is opened in append mode and flushed after every record, so an interrupted run keeps everything it had
logged, and a resumed run continues the same file after :func:`truncate_metrics` dropped the records of the
steps after its checkpoint (they are trained again, so each step is logged once).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _scalar(v) -> float | None:
    if torch.is_tensor(v):
        v = v.detach().float().mean().item() if v.numel() else None
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        return float(v)
    return None


class MetricsLogger:
    def __init__(self, output_dir: str | Path, report_to: list[str], *, enabled: bool = True,
                 config: dict | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                log.warning("tensorboard is not installed: report_to=tensorboard ignored")
        if "wandb" in report_to:
            try:
                import wandb

                self._wandb = wandb.init(project="mmalign", dir=str(output_dir), config=config or {})
            except ImportError:
                raise ImportError("report_to includes wandb but wandb is not installed: pip install 'mmalign[wandb]'") \
                    from None
        self._jsonl = "jsonl" in report_to

    def log(self, step: int, metrics: dict, **fields) -> dict:
        record = {"step": step, "time": round(time.time(), 3), **fields}
        for k, v in metrics.items():
            s = _scalar(v)
            if s is not None:
                record[k] = s if math.isfinite(s) else str(s)
        if not self.enabled:
            return record
        if self._jsonl:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, float) and k not in ("time",)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        return record

    def log_image(self, tag: str, path: str | Path, step: int) -> None:
        """A PNG (validation images) to TensorBoard and wandb; metrics.jsonl records its path in the eval line."""
        if not self.enabled or (self._tb is None and self._wandb is None):
            return
        if self._tb is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                self._tb.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep the records of ``path`` at or before ``step`` (and drop a last line cut by a kill); returns how many
    were dropped. The file is rewritten atomically (a temporary file renamed over it)."""
    p = Path(path)
    if not p.is_file():
        return 0
    kept, dropped = [], 0
    for line in p.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            keep = int(record["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False  # a record cut by the kill, or not ours
        if keep:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, p)
        log.info("%s: dropped %d record(s) after step %d, the step the run resumes from", p, dropped, step)
    return dropped
