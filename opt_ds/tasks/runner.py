"""Run one step's task plan: the weighted sum of task losses and their metrics.

All tasks of the plan are prepared first, then encoded together in one pass (see tasks/encoding.py),
then scored. In a stage that trains no encoder, the encoders run as at inference and without gradients: the
backward pass runs through the decoders and heads alone.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from opt_ds.model.opt import ENCODER_COMPONENTS, OPTModel
from opt_ds.tasks.base import TaskContext
from opt_ds.tasks.encoding import encode_requests


@contextlib.contextmanager
def frozen_encoders(model: OPTModel) -> Iterator[None]:
    """No gradients, and the encoders in eval mode (no dropout, BatchNorm statistics not updated), so a stage that
    trains none of them leaves them exactly as they were, buffers included."""
    modules = [m for c in ENCODER_COMPONENTS for m in model.component_modules()[c]]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def run_tasks(
    model, batch: dict, plan: list[tuple[str, float]], ctx: TaskContext, tasks: dict
) -> tuple[torch.Tensor, dict[str, float]]:
    """-> (weighted total loss, metrics as floats named task/metric). The metrics reach the host in one copy: on
    CUDA each `float()` of a device value is a sync, and a step of seven tasks has some thirty metrics."""
    prepared = [tasks[name].prepare(model, batch, ctx) for name, _ in plan]
    with frozen_encoders(model) if ctx.encoders_frozen else contextlib.nullcontext():
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
