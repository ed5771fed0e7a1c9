"""Run one step's task plan: the weighted sum of task losses and their metrics."""

from __future__ import annotations

import torch

from opt_ds.tasks.base import TaskContext


def run_tasks(model, batch: dict, plan: list[tuple[str, float]], ctx: TaskContext,
              tasks: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """-> (weighted total loss, metrics as floats named task/metric)."""
    total = None
    metrics: dict[str, float] = {}
    for name, weight in plan:
        loss, task_metrics = tasks[name](model, batch, ctx)
        total = loss * weight if total is None else total + loss * weight
        metrics[f"{name}/loss"] = float(loss.detach())
        metrics.update({f"{name}/{k}": float(v) for k, v in task_metrics.items()})
    return total, metrics
