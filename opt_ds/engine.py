"""Build the DeepSpeed engine: the model under zero.Init (ZeRO-3), parameter groups, optimizer, LR schedule."""

from __future__ import annotations

import contextlib
import logging
import math
import types
from typing import Callable

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from opt_ds.config import ExperimentConfig, OptimConfig
from opt_ds.model.config import ModelConfig
from opt_ds.model.opt import OPTModel
from opt_ds.model.vqvae import VQVAE

log = logging.getLogger("opt_ds.engine")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def build_module(cfg: ExperimentConfig, model_cfg: ModelConfig, ds_config: dict) -> tuple[nn.Module, object]:
    """The trained module, built partitioned under ZeRO-3; -> (module, keep-alive handle for HF's ZeRO-3 path)."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights in every run of a config
    hf_handle = None
    context = contextlib.nullcontext()
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_handle = HfDeepSpeedConfig(ds_config)  # lets transformers initialise BERT inside zero.Init correctly
        context = deepspeed.zero.Init(config_dict_or_path=ds_config)
    with context:
        module = VQVAE(model_cfg.vq) if cfg.stage == "vqvae" else OPTModel(model_cfg)
    return module, hf_handle


def parameter_groups(module: nn.Module, weight_decay: float, lr: float, lr_scale: dict[str, float]) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, embeddings of positions/types and other 1-d parameters;
    each model component's learning rate is lr times its lr_scale (optim.lr_scale, e.g. faster decoders)."""
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
        skip = ndim < 2 or name.endswith(".bias") or "norm" in name or name.endswith(("pos_embed", "cls_token", "mask_token"))
        scale = lr_scale.get(component_of.get(id(p), ""), 1.0)
        group = groups.setdefault((scale, skip), {"params": [], "weight_decay": 0.0 if skip else weight_decay,
                                                   "lr": lr * scale})
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(groups: list[dict], optim: OptimConfig, ds_config: dict) -> torch.optim.Optimizer:
    """FusedAdam on CUDA, DeepSpeedCPUAdam with optimizer offload, torch's fused AdamW otherwise (all AdamW).

    torch's default AdamW on CPU loops over parameters and makes six passes over each; the fused kernel
    makes one (8x faster on a 40M-element partition here, BENCHMARKS.md).
    """
    kwargs = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps}
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if torch.cuda.is_available():
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=True, **kwargs)


def warmup_cosine(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine down to min_lr_ratio at total_steps."""
    warmup = max(0, min(optim.warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_engine(cfg: ExperimentConfig, model_cfg: ModelConfig, ds_config: dict):
    """-> (engine, lr_scheduler, hf_handle); keep hf_handle alive for the run."""
    module, hf_handle = build_module(cfg, model_cfg, ds_config)
    groups = parameter_groups(module, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.lr_scale)
    optimizer = build_optimizer(groups, cfg.optim, ds_config)
    factor = warmup_cosine(cfg.optim, cfg.train.steps)
    hooks_before = {m: (set(m._forward_pre_hooks), set(m._forward_hooks)) for m in module.modules()}
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
    if zero_stage(ds_config) == 3:
        from deepspeed.utils import get_z3_leaf_modules

        log.info("ZeRO-3: %d leaf modules gathered whole; hooks dropped from %d submodules without parameters of "
                 "their own", len(get_z3_leaf_modules(module)), drop_zero3_hooks_without_parameters(module, hooks_before))
        use_foreach_grad_norm(engine.optimizer)
        if reduce_gradients_by_all_reduce(engine.optimizer.dp_process_group):
            log.info("ZeRO-3 gradient buckets reduced by gloo's all-reduce")
    return engine, scheduler, hf_handle


def use_foreach_grad_norm(zero3_optimizer) -> bool:
    """Compute ZeRO-3's gradient norm with one foreach kernel instead of an fp64 copy and a norm per parameter.

    DeepSpeed 0.19.8's `get_grad_norm_direct` (run every step, for clipping and the logged norm) converts each
    gradient partition to fp64 and takes its norm separately: ~250 small ops and a fresh fp64 copy of all
    gradients per step on the tiny model, the largest single cost of ZeRO-3 over ZeRO-2 found there
    (BENCHMARKS.md). The replacement squares each tensor's fp32 norm and sums in fp64. It covers the plain
    data-parallel case only: partitions in memory, no model parallelism (and opt_ds has no expert layers,
    whose norm DeepSpeed also reduces over the expert group); -> whether it was installed.
    """
    if zero3_optimizer.offload_optimizer or zero3_optimizer.model_parallel_group is not None:
        return False
    zero3_optimizer.get_grad_norm_direct = types.MethodType(_foreach_grad_norm, zero3_optimizer)
    return True


def _foreach_grad_norm(self, gradients: list[torch.Tensor], params: list, norm_type: float = 2) -> torch.Tensor:
    """The L2 norm of the gradients of every rank's partitions; -1 where it is not finite (DeepSpeed's convention)."""
    if float(norm_type) != 2.0:
        return type(self).get_grad_norm_direct(self, gradients, params, norm_type)
    squares = torch.stack(torch._foreach_norm(gradients, 2.0, dtype=torch.float32)).double().square().sum()
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=self._get_param_partition_group(params[0]))
    norm = squares.sqrt().float()
    return torch.where(norm.isfinite(), norm, torch.tensor(-1.0, device=norm.device))


def reduce_gradients_by_all_reduce(dp_group) -> bool:
    """On gloo, reduce ZeRO-3's gradient buckets with gloo's all-reduce in place; -> whether it was installed.

    DeepSpeed reduce-scatters each gradient bucket into a chunk of the bucket itself, and gloo's reduce-scatter
    is slower than its own all-reduce of the whole bucket (1.36M bf16 elements: 7.9 against 4.4 ms on 2 ranks,
    13.0 against 7.2 ms on 4, BENCHMARKS.md). An all-reduce in place leaves the reduced chunk where DeepSpeed
    reads it. Other backends (NCCL) keep DeepSpeed's reduce-scatter. DeepSpeed's faster shared-memory
    all-reduce is not used: it is only set up when LOCAL_SIZE is known before `deepspeed.init_distributed`
    (not under MPI discovery, where calling it crashes), and it spins while it waits.
    """
    if dist.get_backend(dp_group) != "gloo":
        return False
    from deepspeed.runtime.comm import coalesced_collectives

    coalesced_collectives._torch_reduce_scatter_fn = _reduce_scatter_by_all_reduce
    return True


def _reduce_scatter_by_all_reduce(input_tensor: torch.Tensor, output_tensor: torch.Tensor, group=None,
                                  async_op: bool = False, prof: bool = False) -> None:
    """DeepSpeed's `_torch_reduce_scatter_fn`: `output_tensor` = this rank's chunk of the sum of `input_tensor`."""
    dist.all_reduce(input_tensor, group=group)
    chunk = input_tensor.view(-1).narrow(0, dist.get_rank(group) * output_tensor.numel(), output_tensor.numel())
    if chunk.data_ptr() != output_tensor.data_ptr():
        output_tensor.copy_(chunk.view_as(output_tensor))


def drop_zero3_hooks_without_parameters(root: nn.Module, hooks_before: dict) -> int:
    """Remove the hooks ZeRO-3 puts on submodules that hold no parameters of their own; -> how many modules.

    DeepSpeed hooks every submodule (four hooks, and autograd functions around its inputs and outputs)
    to gather its own parameters (`recurse=False`) just in time. Containers, activations, dropouts and
    identities have none to gather, so their hooks are pure overhead: about half of the modules of our
    models, and the larger part of ZeRO-3's cost over ZeRO-2 on small models (BENCHMARKS.md). Modules with
    registered external parameters, leaf modules (which gather their whole subtree) and the root (whose
    hooks start and end each forward) keep theirs.
    """
    from deepspeed.utils import z3_leaf_module

    dropped = 0
    for m in root.modules():
        if (m is root or z3_leaf_module(m) or any(True for _ in m.parameters(recurse=False))
                or getattr(m, "_external_params", None)):
            continue
        pre, post = hooks_before.get(m, (set(), set()))
        added = [(hooks, key) for hooks, keep in ((m._forward_pre_hooks, pre), (m._forward_hooks, post))
                 for key in hooks if key not in keep]
        for hooks, key in added:
            del hooks[key]
            m._forward_hooks_with_kwargs.pop(key, None)
            m._forward_pre_hooks_with_kwargs.pop(key, None)
            m._forward_hooks_always_called.pop(key, None)
        dropped += bool(added)
    return dropped


def clear_stale_gradients(engine) -> None:
    """Zero ZeRO-3's gradient buffer after an optimizer step.

    DeepSpeed 0.19.8's stage 3 keeps every parameter's gradient partition in one flat buffer and hands
    all of them to the optimizer after each backward, whether the parameter was used or not; a slot is
    only overwritten when its parameter gets a gradient. A step that leaves parameters out (one task per
    step: the other tasks' heads and decoders) would apply their previous gradient again.
    """
    buffer = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
    if engine.zero_optimization_stage() == 3 and isinstance(buffer, torch.Tensor):
        buffer.zero_()


def compute_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32
