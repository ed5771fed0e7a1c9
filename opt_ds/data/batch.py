"""Moving batches to the compute device and picking samples out of them (no DeepSpeed import: evaluation runs
without it)."""

from __future__ import annotations

import torch


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors to the device; floating ones to the compute dtype (DeepSpeed does not cast inputs)."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def take_rows(batch: dict, rows: torch.Tensor) -> dict:
    """The samples of a collated batch where rows [B] is True (tensors and per-sample lists alike)."""
    index = rows.nonzero().squeeze(1)
    return {k: (v[index] if isinstance(v, torch.Tensor) else [v[i] for i in index.tolist()]) for k, v in batch.items()}
