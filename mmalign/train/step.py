"""One optimizer step: ``grad_accum`` micro-batches → scores → reference scores → loss → backward, then clip,
step, schedule and the per-step hooks; and the step's metrics, averaged over micro-batches and processes."""

from __future__ import annotations

import torch

from .evaluate import mean_metrics
from .run_state import Run
from .stage import Batches, Stage


def train_step(run: Run, stage: Stage, batches: Batches, aux_batches: Batches | None) -> dict[str, float]:
    """Advance the run by one optimizer step; returns the step's metrics (loss, method metrics, grad_norm, lr)."""
    task, cfg, accelerator, state = run.task, run.cfg, run.accelerator, run.state
    model, optimizer = stage.model, stage.optimizer
    step_metrics, grad_norm = [], None
    for _ in range(cfg.run.grad_accum):
        batch = next(batches)
        aux_batch = next(aux_batches) if aux_batches else None
        # online methods generate/score candidates with the current policy here (a no-op for the others)
        batch = task.prepare_batch(task.model, batch, state.global_step)
        # accumulate(): no DDP all-reduce and no optimizer step except on the last micro-batch, and
        # accelerator.backward divides each micro-batch loss by grad_accum, so the step's gradient is
        # the mean over all grad_accum × processes × batch_size examples (for per-example-mean losses).
        with accelerator.accumulate(model), accelerator.autocast():
            pol = model(batch)
            ref = run.reference.scores(batch) if task.needs_reference else None
            aux = model(aux_batch) if aux_batch is not None else None
            out = task.loss(pol, ref, batch, aux)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(
                    f"non-finite loss {out.loss.item()} at step {state.global_step + 1} (stage "
                    f"{stage.config.name!r}); lower optim.lr, enable optim.max_grad_norm, or check the data")
            accelerator.backward(out.loss)
            if accelerator.sync_gradients and cfg.optim.max_grad_norm:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_metrics.append({"loss": out.loss.detach(), **out.metrics})
    lr = stage.scheduler.get_last_lr()[0]  # the rate this step used (read before the scheduler moves on)
    stage.scheduler.step()
    state.step_in_stage += 1
    state.global_step += 1
    run.reference.after_step(state.global_step, task.model)
    task.after_step(state.global_step)  # per-step recipe state (weight averages, logit-scale clamps)
    return _step_metrics(accelerator, step_metrics, grad_norm, lr)


def _step_metrics(accelerator, micro: list[dict], grad_norm, lr: float) -> dict[str, float]:
    metrics = mean_metrics([{k: float(v) for k, v in m.items()} for m in micro])
    metrics = {k: _reduce(accelerator, v) for k, v in metrics.items()}
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    metrics["lr"] = lr
    return metrics


def _reduce(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor(value, device=accelerator.device, dtype=torch.float64)
    return accelerator.reduce(t, reduction="mean").item()
