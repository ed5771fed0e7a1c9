"""A plain PyTorch training loop (fused AdamW, optional bf16 autocast) over the same model and tasks.

The reference the DeepSpeed trainer is measured against (`step_times`), and the quickest way to check that
every task learns (`train_plain`, in the task tests).
"""

from __future__ import annotations

import itertools
import time
from functools import partial
from typing import Iterable

import torch

from opt_ds.data.batch import to_device
from opt_ds.data.decode import DecodeConfig
from opt_ds.model.config import load_model_config
from opt_ds.model.opt import OPTModel
from opt_ds.model.vqvae import VQVAE
from opt_ds.tasks import (
    DEFAULT_TASKS,
    ScheduleConfig,
    StageConfig,
    TaskContext,
    TaskScheduler,
    build_tasks,
    run_tasks,
    step_generator,
)

DEFAULT_SCHEDULE_SUMMED = TaskScheduler(
    ScheduleConfig(mode="sum", stages=[StageConfig("all", {name: 1.0 for name in DEFAULT_TASKS})])
)


def train_plain(
    model: OPTModel,
    batches: Iterable[dict],
    scheduler: TaskScheduler,
    steps: int,
    lr: float = 1e-3,
    image_tokenizer: VQVAE | None = None,
    bf16: bool = True,
    seed: int = 0,
    decode: DecodeConfig | None = None,
) -> list[dict]:
    """-> one record per step: step, task metrics, seconds (the step alone, not the wait for its batch).

    Gradients are clipped to norm 1, as `opt_ds.train` does; the model's device decides where it runs, and the
    batches move there (`decode`: the loader's, whose waveforms become log-mel frames there)."""
    tasks = build_tasks()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    device = next(model.parameters()).device
    model.train()
    history = []
    iterator = iter(batches)
    for step in range(steps):
        batch = to_device(next(iterator), device, torch.float32, decode)
        start = time.perf_counter()
        _, stage = scheduler.stage(step)
        ctx = TaskContext(step_generator(seed, step, 0), image_tokenizer, stage.isolate)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, metrics = model(partial(run_tasks, batch=batch, plan=scheduler.plan(step), ctx=ctx, tasks=tasks))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        history.append({"step": step, "seconds": time.perf_counter() - start, **metrics})
    return history


def step_times(model_name: str, batch: dict, steps: int, warmup: int) -> list[float]:
    """Seconds per step of the plain loop on one batch, every task each step, after `warmup` steps."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_model_config(model_name)
    model, vq = OPTModel(cfg).to(device), VQVAE(cfg.vq).to(device).eval()
    on_device = to_device(batch, device, torch.float32)  # once: the steps time the model, not the copy
    history = train_plain(
        model, itertools.repeat(on_device), DEFAULT_SCHEDULE_SUMMED, warmup + steps, lr=1e-4, image_tokenizer=vq
    )
    return [h["seconds"] for h in history[warmup:]]


def task_trend(history: list[dict], key: str, window: int = 10) -> tuple[float, float]:
    """Mean of `key` over its first and last `window` occurrences."""
    values = [h[key] for h in history if key in h]
    return sum(values[:window]) / len(values[:window]), sum(values[-window:]) / len(values[-window:])
