"""UNIMO cross-modal contrastive learning: symmetric InfoNCE for every modality pair present.

Embeddings are the uni-modal encoders' CLS outputs, projected and normalised; negatives come from the
whole global batch (gathered from all ranks with gradients), with a learnable, clamped temperature.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from opt_ds.model.fusion import MODALITY_ORDER, Fused
from opt_ds.model.opt import OPTModel, Unimodal
from opt_ds.tasks.base import Task, TaskContext
from opt_ds.tasks.encoding import EncoderRequest

PAIRS = tuple(itertools.combinations(MODALITY_ORDER, 2))


def gather_with_grad(x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, int]:
    """Concatenate x from every rank along `dim` (gradients flow back to each rank's part); -> (all, this rank's offset)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    import torch.distributed.nn.functional as dist_fn

    parts = dist_fn.all_gather(x.contiguous())
    return torch.cat(parts, dim=dim), dist.get_rank() * x.shape[dim]


def gather_flags(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


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
        return contrastive_loss(emb, {m: batch[f"has_{m}"] for m in MODALITY_ORDER}, scale)


def contrastive_loss(emb: dict[str, torch.Tensor], has: dict[str, torch.Tensor],
                     scale: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean symmetric InfoNCE over the modality pairs against the global batch's keys.

    The three modalities travel stacked: one all-gather for the embeddings and one for the presence flags per
    step, instead of one of each per modality (each collective is a sync point between ranks).
    """
    keys, offset = gather_with_grad(torch.stack([emb[m] for m in MODALITY_ORDER]), dim=1)  # [3, N, C]
    key_valid = gather_flags(torch.stack([has[m] for m in MODALITY_ORDER]), dim=1)  # [3, N]
    index = {m: i for i, m in enumerate(MODALITY_ORDER)}
    total = scale * 0.0
    metrics: dict[str, torch.Tensor] = {"temperature": (1.0 / scale).detach()}
    for a, b in PAIRS:
        rows = has[a] & has[b]
        loss_ab, acc_ab = info_nce(emb[a], keys[index[b]], key_valid[index[b]], offset, rows, scale)
        loss_ba, acc_ba = info_nce(emb[b], keys[index[a]], key_valid[index[a]], offset, rows, scale)
        total = total + (loss_ab + loss_ba) / 2
        metrics[f"{a}_{b}_acc"] = (acc_ab + acc_ba) / 2
    return total / len(PAIRS), metrics
