"""UNIMO cross-modal contrastive learning: symmetric InfoNCE for every modality pair present.

Embeddings are the uni-modal encoders' CLS outputs, projected and normalised; negatives come from the
whole global batch (gathered from all ranks with gradients), with a learnable, clamped temperature.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from opt_ds.model.fusion import Fused
from opt_ds.model.opt import OPTModel, Unimodal
from opt_ds.tasks.base import Task, TaskContext
from opt_ds.tasks.encoding import EncoderRequest

PAIRS = tuple(itertools.combinations(("text", "image", "audio"), 2))


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate x from every rank (gradients flow back to each rank's part); -> (all, this rank's offset)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    import torch.distributed.nn.functional as dist_fn

    parts = dist_fn.all_gather(x)
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def gather_flags(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def info_nce(query: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor, offset: int, rows: torch.Tensor,
             scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B,C] against all keys [N,C]; row i's positive is key offset+i; only `rows` count."""
    logits = (query @ keys.t() * scale).masked_fill(~key_valid[None, :], float("-inf"))
    targets = torch.arange(query.shape[0], device=query.device) + offset
    ce = F.cross_entropy(logits.masked_fill(~rows[:, None], 0.0), targets, reduction="none")
    count = rows.sum().clamp(min=1)
    loss = (ce * rows).sum() / count
    acc = ((logits.argmax(-1) == targets) & rows).sum() / count
    return loss, acc.detach()


class CrossModalContrastive(Task):
    name, components = "contrastive", ("text", "vision", "audio", "heads")

    def prepare(self, model: OPTModel, batch: dict, ctx: TaskContext) -> tuple[EncoderRequest, dict]:
        return EncoderRequest(batch, fuse=False), {}

    def score(self, model: OPTModel, batch: dict, state: dict, uni: Unimodal,
              fused: Fused | None) -> tuple[torch.Tensor, dict]:
        emb, scale = model.contrastive_head(uni.pooled())
        has = {m: batch[f"has_{m}"] for m in ("text", "image", "audio")}
        gathered = {m: gather_with_grad(e) for m, e in emb.items()}
        gathered_has = {m: gather_flags(h) for m, h in has.items()}
        total = scale * 0.0
        metrics: dict[str, torch.Tensor] = {"temperature": (1.0 / scale).detach()}
        active = 0
        for a, b in PAIRS:
            rows = has[a] & has[b]
            (keys_b, offset), (keys_a, _) = gathered[b], gathered[a]
            loss_ab, acc_ab = info_nce(emb[a], keys_b, gathered_has[b], offset, rows, scale)
            loss_ba, acc_ba = info_nce(emb[b], keys_a, gathered_has[a], offset, rows, scale)
            total = total + (loss_ab + loss_ba) / 2
            active += 1
            metrics[f"{a}_{b}_acc"] = (acc_ab + acc_ba) / 2
        return total / active, metrics
