"""Build the DeepSpeed engine: the model under zero.Init (ZeRO-3), parameter groups, optimizer, LR schedule;
under ZeRO-3, the patches of `opt_ds.zero.patches`."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable

import deepspeed
import torch
from torch import nn

from opt_ds.config.experiment import ExperimentConfig, OptimConfig
from opt_ds.tasks.schedule import TaskScheduler
from opt_ds.zero import patches

log = logging.getLogger("opt_ds.zero.engine")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def build_module(
    cfg: ExperimentConfig, make_module: Callable[[], nn.Module], ds_config: dict
) -> tuple[nn.Module, object]:
    """The trained module (the stage's `make_module()`), built partitioned under ZeRO-3; -> (module, keep-alive
    handle for HF's ZeRO-3 path)."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights in every run of a config
    hf_handle = None
    context = contextlib.nullcontext()
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_handle = HfDeepSpeedConfig(ds_config)  # lets transformers initialise BERT inside zero.Init correctly
        context = deepspeed.zero.Init(config_dict_or_path=ds_config)
    with context:
        module = make_module()
    return module, hf_handle


def parameter_groups(module: nn.Module, weight_decay: float, lr: float, lr_scale: dict[str, float]) -> list[dict]:
    """AdamW groups, one per model component (its name in the group's "component", for the stages' rates) and
    decay: no weight decay on biases, norms, embeddings of positions/types and other 1-d parameters; each
    component's learning rate is lr times its lr_scale (optim.lr_scale, e.g. faster decoders)."""
    component_of: dict[int, str] = {}
    components = module.component_modules() if hasattr(module, "component_modules") else {}
    for component, modules in components.items():
        for m in modules:
            for p in m.parameters():
                component_of.setdefault(id(p), component)
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        skip = (
            ndim < 2
            or name.endswith(".bias")
            or "norm" in name
            or name.endswith(("pos_embed", "cls_token", "mask_token"))
        )
        component = component_of.get(id(p), "")
        scale = lr_scale.get(component, 1.0)
        group = groups.setdefault(
            (component, skip),
            {"params": [], "weight_decay": 0.0 if skip else weight_decay, "lr": lr * scale, "component": component},
        )
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(groups: list[dict], optim: OptimConfig, ds_config: dict) -> torch.optim.Optimizer:
    """AdamW: DeepSpeedCPUAdam with optimizer offload; on CUDA DeepSpeed's FusedAdam when its op builds, else
    torch's fused AdamW; torch's fused AdamW on CPU. The choice is logged.

    FusedAdam is JIT-built and needs nvcc, which PyPI's torch wheels do not bring: on a machine without a CUDA
    toolkit torch's fused kernel, which needs no build, takes its place. On CPU torch's default AdamW loops over
    parameters and makes six passes over each; the fused kernel makes one (8x faster on a 40M-element partition
    here, BENCHMARKS.md).
    """
    kwargs = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps}
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        log.info("optimizer: DeepSpeedCPUAdam (optimizer offload)")
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if torch.cuda.is_available():
        try:
            from deepspeed.ops.adam import FusedAdam

            optimizer = FusedAdam(groups, adam_w_mode=True, **kwargs)
            log.info("optimizer: DeepSpeed FusedAdam")
            return optimizer
        except Exception as exc:  # noqa: BLE001  a failed op build raises many types (no nvcc, a compiler error)
            log.warning("optimizer: DeepSpeed's FusedAdam did not build (%s); torch's fused AdamW instead", exc)
    log.info("optimizer: torch AdamW (fused)")
    return torch.optim.AdamW(groups, fused=True, **kwargs)


def cosine(min_ratio: float, progress: float) -> float:
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine down to min_lr_ratio at total_steps."""
    warmup = max(0, min(optim.warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return cosine(optim.min_lr_ratio, (step - warmup) / max(1, total_steps - warmup))

    return factor


def component_rate(
    optim: OptimConfig, scheduler: TaskScheduler, total_steps: int, component: str
) -> Callable[[int], float]:
    """LR multiplier of one component's groups: the run's warm-up and cosine; 0 in a stage that does not train the
    component; in a stage with its own `lr`, a cosine from it over the stage's steps."""
    run_factor = warmup_cosine(optim, total_steps)

    def factor(step: int) -> float:
        index, stage = scheduler.stage(step)
        if not stage.updates(component):
            return 0.0
        if stage.lr is None:
            return run_factor(step)
        first, end = scheduler.span(index, total_steps)
        return stage.lr / optim.lr * cosine(optim.min_lr_ratio, (step - first) / max(1, end - first))

    return factor


def build_engine(cfg: ExperimentConfig, make_module: Callable[[], nn.Module], ds_config: dict):
    """-> (engine, lr_scheduler, hf_handle); keep hf_handle alive for the run."""
    module, hf_handle = build_module(cfg, make_module, ds_config)
    groups = parameter_groups(module, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.lr_scale)
    optimizer = build_optimizer(groups, cfg.optim, ds_config)
    stages = TaskScheduler(cfg.schedule)
    hooks_before = {m: (set(m._forward_pre_hooks), set(m._forward_hooks)) for m in module.modules()}
    engine, _, _, scheduler = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, [component_rate(cfg.optim, stages, cfg.train.steps, g.get("component", "")) for g in opt.param_groups]
        ),
    )
    if zero_stage(ds_config) == 3:
        patches.apply_zero3(engine, module, hooks_before)
    patches.record_checkpoint_write_failures(engine)
    return engine, scheduler, hf_handle


def compute_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32
