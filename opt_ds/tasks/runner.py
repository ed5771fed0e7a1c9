"""Run one step's task plan: the weighted sum of task losses and their metrics.

All tasks of the plan are prepared first, then encoded together in one pass (see tasks/encoding.py),
then scored. In a stage that trains no encoder, the encoders run without gradients: the backward pass runs
through the decoders and heads alone.
"""

from __future__ import annotations

import contextlib

import torch

from opt_ds.tasks.base import TaskContext
from opt_ds.tasks.encoding import encode_requests


def run_tasks(
    model, batch: dict, plan: list[tuple[str, float]], ctx: TaskContext, tasks: dict
) -> tuple[torch.Tensor, dict[str, float]]:
    """-> (weighted total loss, metrics as floats named task/metric). The metrics reach the host in one copy: on
    CUDA each `float()` of a device value is a sync, and a step of seven tasks has some thirty metrics."""
    prepared = [tasks[name].prepare(model, batch, ctx) for name, _ in plan]
    with torch.no_grad() if ctx.encoders_frozen else contextlib.nullcontext():
        encoded = encode_requests(model, [request for request, _ in prepared])
    total = None
    names: list[str] = []
    values: list[torch.Tensor] = []
    for (name, weight), (_, state), (uni, fused) in zip(plan, prepared, encoded):
        loss, task_metrics = tasks[name].score(model, batch, state, uni, fused)
        total = loss * weight if total is None else total + loss * weight
        for key, value in {"loss": loss, **task_metrics}.items():
            names.append(f"{name}/{key}")
            values.append(torch.as_tensor(value).detach().to(device=loss.device, dtype=torch.float32).reshape(()))
    return total, dict(zip(names, torch.stack(values).tolist()))
