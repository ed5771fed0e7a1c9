"""Moving batches to the compute device and picking samples out of them (no DeepSpeed import: evaluation runs
without it)."""

from __future__ import annotations

import torch

from opt_ds.data.decode import DecodeConfig
from opt_ds.data.features import with_log_mel

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the model's input statistics (CLIP's)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def image_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE_MEAN and IMAGE_STD as [3, 1, 1] tensors on `device`."""
    return torch.tensor(IMAGE_MEAN, device=device)[:, None, None], torch.tensor(IMAGE_STD, device=device)[:, None, None]


def normalised_images(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels [B, 3, H, W] (as the loader delivers them) -> the model's normalised input, on their device.
    Batches travel as bytes: a quarter of the float image's copy from worker to trainer and to the device, and
    no per-pixel float work in the loader workers."""
    mean, std = image_statistics(pixels.device)
    return ((pixels.float() / 255 - mean) / std).to(dtype)


def to_device(batch: dict, device: torch.device, dtype: torch.dtype, decode: DecodeConfig | None = None) -> dict:
    """Tensors to the device; floating ones to the compute dtype (DeepSpeed does not cast inputs); uint8 images
    normalised there, and a loader batch's waveforms made into log-mel frames there by `decode`'s settings."""
    if "waveform" in batch:
        if decode is None:
            raise ValueError("a batch of waveforms needs the decode config that makes their log-mel frames")
        batch = with_log_mel(dict(batch, waveform=batch["waveform"].to(device, non_blocking=True)), decode)
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key == "image" and value.dtype == torch.uint8:
                value = normalised_images(value, dtype)
            elif value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def take_rows(batch: dict, rows: torch.Tensor) -> dict:
    """The samples of a collated batch where rows [B] is True (tensors and per-sample lists alike)."""
    index = rows.nonzero().squeeze(1)
    return {k: (v[index] if isinstance(v, torch.Tensor) else [v[i] for i in index.tolist()]) for k, v in batch.items()}
