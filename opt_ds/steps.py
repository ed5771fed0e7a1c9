"""What one training micro-step computes, per stage: the OPT task mix, or the VQ-VAE tokenizer."""

from __future__ import annotations

import logging
from functools import partial

import torch

from opt_ds.batch import to_device
from opt_ds.metrics import step_flops
from opt_ds.model.config import ModelConfig
from opt_ds.model.vqvae import VQVAE
from opt_ds.tasks import TASKS, NEEDS_IMAGE_TOKENIZER, TaskContext, TaskScheduler, TextSpecials, run_tasks, step_generator

log = logging.getLogger("opt_ds.steps")


def load_image_tokenizer(path: str | None, model_cfg: ModelConfig, device: torch.device) -> VQVAE:
    """The frozen VQ-VAE: exported weights (the image_tokenizer.* part of an export), or a fresh one."""
    tokenizer = VQVAE(model_cfg.vq)
    if path:
        from opt_ds.export import load_bundle_part

        load_bundle_part(tokenizer, path, "image_tokenizer.")
    else:
        log.warning("no image_tokenizer given: MVM and image generation use a randomly initialised VQ-VAE")
    return tokenizer.to(device).eval().requires_grad_(False)


class PretrainStep:
    def __init__(self, model_cfg: ModelConfig, scheduler: TaskScheduler, image_tokenizer: VQVAE | None,
                 specials: TextSpecials, seed: int, rank: int):
        self.model_cfg, self.scheduler, self.image_tokenizer = model_cfg, scheduler, image_tokenizer
        self.specials, self.seed, self.rank = specials, seed, rank
        self.tasks = {name: cls() for name, cls in TASKS.items()}

    def plan(self, step: int) -> list[tuple[str, float]]:
        return self.scheduler.plan(step)

    def __call__(self, engine, batch: dict, step: int, plan: list[tuple[str, float]], device,
                 dtype) -> tuple[torch.Tensor, dict, float]:
        _, stage = self.scheduler.stage(step)
        ctx = TaskContext(step_generator(self.seed, step, self.rank), self.image_tokenizer, stage.isolate, self.specials)
        on_device = to_device(batch, device, dtype)
        loss, metrics = engine(partial(run_tasks, batch=on_device, plan=plan, ctx=ctx, tasks=self.tasks))
        return loss, metrics, step_flops(self.model_cfg, self.tasks, plan, batch)


class TokenizerStep:
    """The VQ-VAE stage: reconstruction + commitment loss on the images of the batch."""

    def plan(self, step: int) -> list[tuple[str, float]]:
        return [("vqvae", 1.0)]

    def __call__(self, engine, batch: dict, step: int, plan: list[tuple[str, float]], device,
                 dtype) -> tuple[torch.Tensor, dict, float]:
        loss, metrics = engine(batch["image"].to(device, dtype))
        return loss, {f"vqvae/{k}": float(v) for k, v in metrics.items()} | {"vqvae/loss": float(loss.detach())}, 0.0


def needs_image_tokenizer(scheduler: TaskScheduler) -> bool:
    return any(set(stage.tasks) & NEEDS_IMAGE_TOKENIZER for stage in scheduler.cfg.stages)
