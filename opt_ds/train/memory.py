"""Where a rank's memory goes: model state by category (measured on the engine's own tensors) and step peaks.

Model state is counted from the tensors the DeepSpeed engine holds, whatever the ZeRO stage:
parameters (the module's parameters and buffers, or their ZeRO-3 partitions), gradients (`.grad` and
DeepSpeed's gradient buffers), optimizer state (the fp32 master copies and moments) and other buffers
(communication buckets and the like). Each storage counts once, at its full size, in the first category
that reaches it. Peaks: CUDA's allocator peak, or the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs) on CPU.
"""

from __future__ import annotations

import contextlib
import re
import types
from collections import deque
from typing import Iterable, Iterator

import torch

CATEGORIES = ("parameters", "gradients", "optimizer", "other")  # the order in which storages are claimed
_LEAVES = (
    str,
    bytes,
    int,
    float,
    bool,
    complex,
    type(None),
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    torch.dtype,
    torch.device,
)


def reachable_tensors(roots: Iterable[object]) -> Iterator[torch.Tensor]:
    """Every tensor reachable from `roots` through attributes, containers and tensor attributes (ds_tensor, grad)."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAVES):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
            if obj.is_leaf and obj.grad is not None:
                stack.append(obj.grad)
            stack.extend(vars(obj).values())
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())


def _named(optimizer: object, word: str) -> list[object]:
    """DeepSpeed names its buffers after what they hold: grad_partitions_flat_buffer, fp32_partitioned_groups_flat..."""
    return [value for name, value in vars(optimizer).items() if word in name.lower()]


def _inner_optimizer(optimizer: object) -> torch.optim.Optimizer | None:
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, torch.optim.Optimizer) else None


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes per category held by this rank's engine (see the module docstring)."""
    module, optimizer = engine.module, engine.optimizer
    params = list(module.parameters())
    inner = _inner_optimizer(optimizer)
    masters = [p for group in inner.param_groups for p in group["params"]] if inner is not None else []
    roots = {
        "parameters": [[p.data, getattr(p, "ds_tensor", None)] for p in params] + list(module.buffers()),
        "gradients": [[p.grad for p in params + masters], _named(optimizer, "grad")],
        "optimizer": [
            [p.data for p in masters],
            list(inner.state.values()) if inner is not None else [],
            _named(optimizer, "fp32"),
        ],
        "other": [optimizer, engine],
    }
    counted: set[tuple[int, str]] = set()
    totals = dict.fromkeys(CATEGORIES, 0)
    for category in CATEGORIES:
        for t in reachable_tensors(roots[category]):
            storage = t.untyped_storage()
            key = (storage.data_ptr(), str(t.device))
            if t.device.type == "meta" or storage.nbytes() == 0 or key in counted:
                continue
            counted.add(key)
            totals[category] += storage.nbytes()
    return totals


def expected_model_state_bytes(parameters: int, zero: int, ranks: int) -> float:
    """Mixed-precision Adam, ZeRO paper accounting: 2 B weights + 2 B gradients + 12 B fp32 copy and moments per
    parameter."""
    weights, grads, optim = 2.0 * parameters, 2.0 * parameters, 12.0 * parameters
    if zero >= 1:
        optim /= ranks
    if zero >= 2:
        grads /= ranks
    if zero >= 3:
        weights /= ranks
    return weights + grads + optim


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def reset_peak() -> None:
    """Start a new peak window: CUDA's allocator peak, or the process's peak resident set on CPU."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # Linux >= 4.0; elsewhere the peak runs from process start
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def current_bytes() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else _vm_kib("VmRSS") * 1024


def peak_bytes() -> int:
    """Peak since the last reset_peak(): allocated CUDA memory, or resident memory of this process on CPU."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _vm_kib("VmHWM") * 1024
