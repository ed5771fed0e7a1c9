"""A plain PyTorch training loop (fused AdamW, optional bf16 autocast) over the same model and tasks.

The reference the DeepSpeed trainer is measured against, and the quickest way to check that every
task learns.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Iterable

import torch

from opt_ds.model.opt import OPTModel
from opt_ds.model.vqvae import VQVAE
from opt_ds.tasks import TASKS, TaskContext, TaskScheduler, run_tasks, step_generator


def train_plain(model: OPTModel, batches: Iterable[dict], scheduler: TaskScheduler, steps: int, lr: float = 1e-3,
                image_tokenizer: VQVAE | None = None, bf16: bool = True, seed: int = 0) -> list[dict]:
    """-> one record per step: step, task metrics, seconds."""
    tasks = {name: cls() for name, cls in TASKS.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    model.train()
    history = []
    iterator = iter(batches)
    for step in range(steps):
        batch = next(iterator)
        start = time.perf_counter()
        _, stage = scheduler.stage(step)
        ctx = TaskContext(step_generator(seed, step, 0), image_tokenizer, stage.isolate)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, metrics = model(partial(run_tasks, batch=batch, plan=scheduler.plan(step), ctx=ctx, tasks=tasks))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append({"step": step, "seconds": time.perf_counter() - start, **metrics})
    return history


def task_trend(history: list[dict], key: str, window: int = 10) -> tuple[float, float]:
    """Mean of `key` over its first and last `window` occurrences."""
    values = [h[key] for h in history if key in h]
    return sum(values[:window]) / len(values[:window]), sum(values[-window:]) / len(values[-window:])
