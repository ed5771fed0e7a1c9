"""The training stages, each an object that knows its module, its step, what it evaluates and what it exports:
pre-training OPT on the task mix (`pretrain`), or training the VQ-VAE image tokenizer (`vqvae`).

`stage_of(cfg)` is the one place the config's `stage` string is read.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from torch import nn

from opt_ds.config.experiment import RANDOM_IMAGE_TOKENIZER, STAGES, ExperimentConfig
from opt_ds.config.fields import ConfigError
from opt_ds.data.batch import normalised_images, to_device
from opt_ds.data.decode import DecodeConfig
from opt_ds.model.config import ModelConfig
from opt_ds.model.opt import OPTModel
from opt_ds.model.vqvae import VQVAE
from opt_ds.tasks import (
    NEEDS_IMAGE_TOKENIZER,
    TaskContext,
    TaskScheduler,
    TextSpecials,
    build_tasks,
    run_tasks,
    step_generator,
)
from opt_ds.train.metrics import step_flops

log = logging.getLogger("opt_ds.train.stages")


def load_image_tokenizer(path: str, model_cfg: ModelConfig, device: torch.device, seed: int) -> VQVAE:
    """The frozen VQ-VAE: exported weights (the image_tokenizer.* part of an export), or for 'random' a fresh one
    drawn from `seed`, the same one in a resumed run (it was drawn from the RNG state the checkpoint restored, so a
    resumed run learned other codes than the uninterrupted one)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = VQVAE(model_cfg.vq)
    if path == RANDOM_IMAGE_TOKENIZER:
        log.warning("image_tokenizer: random: MVM and image generation learn the codes of an untrained VQ-VAE")
    else:
        from opt_ds.export.bundle import load_bundle_part

        load_bundle_part(tokenizer, path, "image_tokenizer.")
    return tokenizer.to(device).eval().requires_grad_(False)


def check_image_tokenizer(cfg: ExperimentConfig, scheduler: TaskScheduler) -> None:
    """MVM and image generation learn the codes of the image tokenizer: without a trained one they learn noise."""
    if cfg.image_tokenizer is None and needs_image_tokenizer(scheduler):
        raise ConfigError(
            f"image_tokenizer: the schedule runs {' and '.join(sorted(NEEDS_IMAGE_TOKENIZER))}, which "
            "predict the codes of a trained VQ-VAE: train one (stage: vqvae), export it and give the "
            f"file, or '{RANDOM_IMAGE_TOKENIZER}' for speed tests only"
        )
    if cfg.trained_image_tokenizer and not Path(cfg.trained_image_tokenizer).is_file():
        raise ConfigError(f"image_tokenizer: {cfg.trained_image_tokenizer} not found (an export of a stage: vqvae run)")


class PretrainStep:
    def __init__(
        self,
        model_cfg: ModelConfig,
        scheduler: TaskScheduler,
        tasks: list[dict],  # per schedule stage, its tasks built with its settings
        image_tokenizer: VQVAE | None,
        specials: TextSpecials,
        decode: DecodeConfig,
        seed: int,
        rank: int,
    ):
        self.model_cfg, self.scheduler, self.tasks, self.image_tokenizer = model_cfg, scheduler, tasks, image_tokenizer
        self.specials, self.decode, self.seed, self.rank = specials, decode, seed, rank

    def plan(self, step: int) -> list[tuple[str, float]]:
        return self.scheduler.plan(step)

    def __call__(
        self, engine, batch: dict, step: int, plan: list[tuple[str, float]], device, dtype
    ) -> tuple[torch.Tensor, dict, float]:
        index, stage = self.scheduler.stage(step)
        tasks = self.tasks[index]
        ctx = TaskContext(
            step_generator(self.seed, step, self.rank),
            self.image_tokenizer,
            stage.isolate,
            self.specials,
            encoders_frozen=stage.encoders_frozen,
        )
        on_device = to_device(batch, device, dtype, self.decode)
        loss, metrics = engine(partial(run_tasks, batch=on_device, plan=plan, ctx=ctx, tasks=tasks))
        return loss, metrics, step_flops(self.model_cfg, tasks, plan, batch, stage.encoders_frozen)


class TokenizerStep:
    """The VQ-VAE stage: reconstruction + commitment loss on the images of the batch."""

    def plan(self, step: int) -> list[tuple[str, float]]:
        return [("vqvae", 1.0)]

    def __call__(
        self, engine, batch: dict, step: int, plan: list[tuple[str, float]], device, dtype
    ) -> tuple[torch.Tensor, dict, float]:
        loss, metrics = engine(normalised_images(batch["image"].to(device), dtype))
        return loss, {f"vqvae/{k}": float(v) for k, v in metrics.items()} | {"vqvae/loss": float(loss.detach())}, 0.0


def needs_image_tokenizer(scheduler: TaskScheduler) -> bool:
    return any(set(stage.tasks) & NEEDS_IMAGE_TOKENIZER for stage in scheduler.cfg.stages)


class Pretraining:
    """OPT on the task schedule: evaluated on held-out shards, exported with the image tokenizer it learned from."""

    name, evaluates, exports_model, restores_buffers = "pretrain", True, True, False

    def check(self, cfg: ExperimentConfig, scheduler: TaskScheduler) -> None:
        check_image_tokenizer(cfg, scheduler)

    def build_module(self, model_cfg: ModelConfig) -> nn.Module:
        return OPTModel(model_cfg)

    def step(
        self,
        cfg: ExperimentConfig,
        model_cfg: ModelConfig,
        scheduler: TaskScheduler,
        specials: TextSpecials,
        rank: int,
        device: torch.device,
    ) -> tuple[PretrainStep, VQVAE | None]:
        """-> (the step, the frozen image tokenizer it encodes images with, if any)."""
        image_tokenizer = None
        if cfg.image_tokenizer is not None:
            image_tokenizer = load_image_tokenizer(cfg.image_tokenizer, model_cfg, device, cfg.train.seed)
        step = PretrainStep(
            model_cfg,
            scheduler,
            [build_tasks(cfg.stage_tasks(stage)) for stage in scheduler.cfg.stages],
            image_tokenizer,
            specials,
            cfg.data.decode,
            cfg.train.seed,
            rank,
        )
        return step, image_tokenizer

    def exported(self, bundle) -> nn.Module:
        return bundle.model

    def finish_export(self, bundle, checkpoint: Path, cfg: ExperimentConfig) -> None:
        """The image tokenizer the run learned from goes into the export beside the model."""
        if cfg.trained_image_tokenizer:
            from opt_ds.export.bundle import load_bundle_part

            load_bundle_part(bundle.image_tokenizer, cfg.trained_image_tokenizer, "image_tokenizer.")


class TokenizerTraining:
    """The VQ-VAE image tokenizer: no held-out evaluation; exported alone, for a pre-training config to name."""

    name, evaluates, exports_model = "vqvae", False, False
    restores_buffers = True  # its codebook: DeepSpeed keeps buffers out of the ZeRO shards (`finish_export`)

    def check(self, cfg: ExperimentConfig, scheduler: TaskScheduler) -> None:
        pass

    def build_module(self, model_cfg: ModelConfig) -> nn.Module:
        return VQVAE(model_cfg.vq)

    def step(
        self,
        cfg: ExperimentConfig,
        model_cfg: ModelConfig,
        scheduler: TaskScheduler,
        specials: TextSpecials,
        rank: int,
        device: torch.device,
    ) -> tuple[TokenizerStep, None]:
        return TokenizerStep(), None

    def exported(self, bundle) -> nn.Module:
        return bundle.image_tokenizer

    def finish_export(self, bundle, checkpoint: Path, cfg: ExperimentConfig) -> None:
        """The codebook lives in buffers, which DeepSpeed keeps in the rank-0 module states file, not in ZeRO shards."""
        from opt_ds.export.bundle import restore_vq_buffers

        restore_vq_buffers(bundle.image_tokenizer, checkpoint)


STAGE_OBJECTS = {stage.name: stage for stage in (Pretraining(), TokenizerTraining())}
assert set(STAGE_OBJECTS) == set(STAGES)


def stage_of(cfg: ExperimentConfig) -> Pretraining | TokenizerTraining:
    return STAGE_OBJECTS[cfg.stage]
