"""Every patch opt_ds makes to DeepSpeed's internals, in one place.

Each patch says what it fixes and what was measured, and holds for the DeepSpeed versions in VERIFIED_VERSIONS
(requirements.txt pins one of them). On another version a speed patch is left out with a warning (DeepSpeed's
own path is correct, only slower), and the one patch results depend on (`clear_stale_gradients`) is applied
only if the buffer it clears is still there, else the run stops with an error at start-up. tests/test_engine.py
checks each ZeRO-3 patch against DeepSpeed's own behaviour on real partitions; tests/test_faults.py fills a disk
during a save for the recorded checkpoint writes.
"""

from __future__ import annotations

import functools
import logging
import types

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)
VERIFIED_VERSIONS = ("0.19.8",)


class UnverifiedDeepSpeed(RuntimeError):
    """A patch that results depend on cannot be applied to the installed DeepSpeed."""


def verified(patch: str, version: str | None = None) -> bool:
    """Whether `patch` was verified on the installed DeepSpeed (or `version`); warns when not."""
    version = version or deepspeed.__version__
    if version in VERIFIED_VERSIONS:
        return True
    log.warning(
        "DeepSpeed %s: %s was verified on %s only; left out (DeepSpeed's own, slower path runs)",
        version,
        patch,
        ", ".join(VERIFIED_VERSIONS),
    )
    return False


def apply_zero3(engine, module: nn.Module, hooks_before: dict) -> None:
    """The ZeRO-3 patches, once the engine exists; `hooks_before`: each submodule's hooks before DeepSpeed's."""
    from deepspeed.utils import get_z3_leaf_modules

    check_stale_gradient_buffer(engine.optimizer)
    if verified("drop_zero3_hooks_without_parameters"):
        log.info(
            "ZeRO-3: %d leaf modules gathered whole; hooks dropped from %d submodules without parameters of their own",
            len(get_z3_leaf_modules(module)),
            drop_zero3_hooks_without_parameters(module, hooks_before),
        )
    if verified("use_foreach_grad_norm"):
        use_foreach_grad_norm(engine.optimizer)
    if verified("reduce_gradients_by_all_reduce") and reduce_gradients_by_all_reduce(engine.optimizer.dp_process_group):
        log.info("ZeRO-3 gradient buckets reduced by gloo's all-reduce")


def check_stale_gradient_buffer(zero3_optimizer) -> None:
    """`clear_stale_gradients` needs DeepSpeed's flat gradient buffer: without it a step that leaves parameters
    out would apply their old gradients again, so an unknown layout is an error, not a warning."""
    if not isinstance(getattr(zero3_optimizer, "grad_partitions_flat_buffer", None), torch.Tensor):
        raise UnverifiedDeepSpeed(
            f"DeepSpeed {deepspeed.__version__}: ZeRO-3's optimizer has no grad_partitions_flat_buffer, so gradients "
            f"of parameters a step leaves out cannot be cleared (verified on {', '.join(VERIFIED_VERSIONS)}; "
            "install one of those, see requirements.txt)"
        )


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


def _reduce_scatter_by_all_reduce(
    input_tensor: torch.Tensor, output_tensor: torch.Tensor, group=None, async_op: bool = False, prof: bool = False
) -> None:
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
        if (
            m is root
            or z3_leaf_module(m)
            or any(True for _ in m.parameters(recurse=False))
            or getattr(m, "_external_params", None)
        ):
            continue
        pre, post = hooks_before.get(m, (set(), set()))
        added = [
            (hooks, key)
            for hooks, keep in ((m._forward_pre_hooks, pre), (m._forward_hooks, post))
            for key in hooks
            if key not in keep
        ]
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


def record_checkpoint_write_failures(engine) -> None:
    """A full disk during `engine.save_checkpoint`: the rank whose write failed raised out of it while the other
    ranks waited in its last barrier (a hang until the collective timeout), and said only `basic_ios::clear:
    iostream error`. Its two writes, the checkpoint engine's `save` and rank 0's copy of the recovery script (both
    after every collective but that last barrier), now record their error in `engine.write_failures` and return,
    so every rank gets through save_checkpoint; the Checkpointer then agrees on the failure across ranks. Left out
    (`engine.write_failures` None: a failed write raises as before) on an unverified DeepSpeed. Tested on a full
    tmpfs by tests/test_faults.py."""
    engine.write_failures = None
    if not verified("record_checkpoint_write_failures"):
        return
    failures: list[Exception] = []

    def recorded(write):
        @functools.wraps(write)
        def call(*args, **kwargs):
            try:
                return write(*args, **kwargs)
            except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
                failures.append(exc)

        return call

    engine.checkpoint_engine.save = recorded(engine.checkpoint_engine.save)
    engine._copy_recovery_script = recorded(engine._copy_recovery_script)
    engine.write_failures = failures
