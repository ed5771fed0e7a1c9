"""What one training micro-step computes, per stage: the OPT task mix, or the VQ-VAE tokenizer."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch

from opt_ds.batch import to_device
from opt_ds.config import RANDOM_IMAGE_TOKENIZER, ExperimentConfig
from opt_ds.dataclass_config import ConfigError
from opt_ds.metrics import step_flops
from opt_ds.model.config import ModelConfig
from opt_ds.model.vqvae import VQVAE
from opt_ds.tasks import TASKS, NEEDS_IMAGE_TOKENIZER, TaskContext, TaskScheduler, TextSpecials, run_tasks, step_generator

log = logging.getLogger("opt_ds.steps")


def load_image_tokenizer(path: str, model_cfg: ModelConfig, device: torch.device) -> VQVAE:
    """The frozen VQ-VAE: exported weights (the image_tokenizer.* part of an export), or a fresh one for 'random'."""
    tokenizer = VQVAE(model_cfg.vq)
    if path == RANDOM_IMAGE_TOKENIZER:
        log.warning("image_tokenizer: random: MVM and image generation learn the codes of an untrained VQ-VAE")
    else:
        from opt_ds.export import load_bundle_part

        load_bundle_part(tokenizer, path, "image_tokenizer.")
    return tokenizer.to(device).eval().requires_grad_(False)


def check_image_tokenizer(cfg: ExperimentConfig, scheduler: TaskScheduler) -> None:
    """MVM and image generation learn the codes of the image tokenizer: without a trained one they learn noise."""
    if cfg.image_tokenizer is None and needs_image_tokenizer(scheduler):
        raise ConfigError(f"image_tokenizer: the schedule runs {' and '.join(sorted(NEEDS_IMAGE_TOKENIZER))}, which "
                          "predict the codes of a trained VQ-VAE: train one (stage: vqvae), export it and give the "
                          f"file, or '{RANDOM_IMAGE_TOKENIZER}' for speed tests only")
    if cfg.trained_image_tokenizer and not Path(cfg.trained_image_tokenizer).is_file():
        raise ConfigError(f"image_tokenizer: {cfg.trained_image_tokenizer} not found (an export of a stage: vqvae run)")


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
