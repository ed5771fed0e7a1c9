"""UNIMO cross-modal contrastive learning: symmetric InfoNCE for every modality pair present.

Embeddings are the uni-modal encoders' pooled outputs (the text's mean token, the image's and audio's CLS),
projected and normalised; negatives come from the whole global batch (gathered from all ranks with gradients),
with a learnable, clamped temperature.
Optionally each caption brings rewrites (UNIMO's text rewriting): paraphrases as more positives and hard
negatives as more negatives of its own sample's image and audio.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from opt_ds.model.encoders import mean_pool
from opt_ds.model.fusion import MODALITY_ORDER, Fused
from opt_ds.model.opt import OPTModel, Unimodal
from opt_ds.tasks.base import Task, TaskContext
from opt_ds.tasks.encoding import EncoderRequest
from opt_ds.tasks.settings import NoSettings

PAIRS = tuple(itertools.combinations(MODALITY_ORDER, 2))


def gather_with_grad(x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, int]:
    """Concatenate x from every rank along `dim` (gradients flow back to each rank's part); -> (all, this rank's
    offset)."""
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


@dataclass
class Rewrites:
    """UNIMO's caption rewrites, K slots per sample: paraphrases are more positives for the sample's image
    and audio, hard negatives (a changed object, attribute or count) more negatives for them."""

    emb: torch.Tensor  # [B, K, C], normalised
    present: torch.Tensor  # [B, K]
    positive: torch.Tensor  # [B, K] True: a paraphrase


def info_nce(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_valid: torch.Tensor,
    offset: int,
    rows: torch.Tensor,
    scale: torch.Tensor,
    rewrites: Rewrites | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B,C] against all keys [N,C]; row i's positive is key offset+i; only `rows` count.

    With rewrites, row i also scores its own sample's K rewrites: paraphrases are more positives (the summed
    probability of the positives is maximised, as in UNIMO), hard negatives more negatives. Another sample's
    hard negative may well describe this one, so rewrites never meet the other rows' queries.
    Accuracy: the best-scoring key is a positive.
    """
    logits = (query @ keys.t() * scale).masked_fill(~key_valid[None, :], float("-inf"))
    positive = torch.zeros_like(logits, dtype=torch.bool)
    positive[torch.arange(query.shape[0]), torch.arange(query.shape[0]) + offset] = True
    if rewrites is not None:
        own = (torch.einsum("bc,bkc->bk", query, rewrites.emb) * scale).masked_fill(~rewrites.present, float("-inf"))
        logits, positive = torch.cat([logits, own], 1), torch.cat([positive, rewrites.positive], 1)
    logits = logits.masked_fill(~rows[:, None], 0.0)  # uncounted rows stay finite: no NaN in the backward
    positive = positive | ~rows[:, None]
    per_row = torch.logsumexp(logits, -1) - torch.logsumexp(logits.masked_fill(~positive, float("-inf")), -1)
    count = rows.sum().clamp(min=1)
    loss = (per_row * rows).sum() / count
    acc = (positive.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1) & rows).sum() / count
    return loss, acc.detach()


class CrossModalContrastive(Task):
    name, components, extra_text_key = "contrastive", ("text", "vision", "audio", "heads"), "rewrite_ids"
    settings_type = NoSettings

    def prepare(self, model: OPTModel, batch: dict, ctx: TaskContext) -> tuple[EncoderRequest, dict]:
        return contrastive_request(batch), {}

    def score(
        self, model: OPTModel, batch: dict, state: dict, uni: Unimodal, fused: Fused | None
    ) -> tuple[torch.Tensor, dict]:
        emb, scale, rewrites = contrastive_embeddings(model, batch, uni)
        return contrastive_loss(emb, {m: batch[f"has_{m}"] for m in MODALITY_ORDER}, scale, rewrites)


def contrastive_request(batch: dict) -> EncoderRequest:
    """The uni-modal encoders on the batch, with its concepts (for a model with concept inputs); the captions'
    rewrites, if batched, through the text encoder too."""
    rewrites = None
    if CrossModalContrastive.extra_text_key in batch:
        rewrites = (batch["rewrite_ids"].flatten(0, 1), batch["rewrite_mask"].flatten(0, 1))
    return EncoderRequest(batch, fuse=False, extra_text=rewrites, concepts=True)


def contrastive_embeddings(
    model: OPTModel, batch: dict, uni: Unimodal
) -> tuple[dict[str, torch.Tensor], torch.Tensor, Rewrites | None]:
    """-> (normalised embedding per modality [B,C], logit scale, the rewrites' embeddings) from one head call."""
    pooled = uni.pooled()
    if uni.extra_text is not None:
        pooled["text"] = torch.cat([pooled["text"], mean_pool(uni.extra_text, uni.extra_text_valid)])
    emb, scale = model.contrastive_head(pooled)
    if uni.extra_text is None:
        return emb, scale, None
    batch_size, slots = batch["has_rewrite"].shape
    emb["text"], rewrite_emb = emb["text"].split([batch_size, batch_size * slots])
    return (
        emb,
        scale,
        Rewrites(
            rewrite_emb.unflatten(0, (batch_size, slots)),
            batch["has_rewrite"] & batch["has_text"][:, None],
            batch["rewrite_positive"],
        ),
    )


def contrastive_loss(
    emb: dict[str, torch.Tensor], has: dict[str, torch.Tensor], scale: torch.Tensor, rewrites: Rewrites | None = None
) -> tuple[torch.Tensor, dict]:
    """Mean symmetric InfoNCE over the modality pairs the global batch holds, against its keys.

    Pairs no sample of the global batch holds are left out of the mean (every rank sees the same flags, so all
    agree): on image-text shards the loss is the image-text loss, not a third of it, and its weight against
    the other tasks in a `sum` schedule is the one configured.

    The three modalities travel stacked: one all-gather for the embeddings and one for the presence flags per
    step, instead of one of each per modality (each collective is a sync point between ranks). Rewrites
    join the image->text and audio->text directions (see info_nce).
    """
    keys, offset = gather_with_grad(torch.stack([emb[m] for m in MODALITY_ORDER]), dim=1)  # [3, N, C]
    key_valid = gather_flags(torch.stack([has[m] for m in MODALITY_ORDER]), dim=1)  # [3, N]
    index = {m: i for i, m in enumerate(MODALITY_ORDER)}
    total = scale * 0.0
    metrics: dict[str, torch.Tensor] = {"temperature": (1.0 / scale).detach()}
    for a, b in PAIRS:
        rows = has[a] & has[b]
        loss_ab, acc_ab = info_nce(
            emb[a], keys[index[b]], key_valid[index[b]], offset, rows, scale, rewrites if b == "text" else None
        )
        loss_ba, acc_ba = info_nce(
            emb[b], keys[index[a]], key_valid[index[a]], offset, rows, scale, rewrites if a == "text" else None
        )
        pair_loss = (loss_ab + loss_ba) / 2
        total = total + pair_loss
        metrics[f"{a}_{b}_loss"] = pair_loss.detach()
        metrics[f"{a}_{b}_acc"] = (acc_ab + acc_ba) / 2
    if rewrites is not None:
        metrics.update(hard_negative_accuracy(emb, has, rewrites))
    held = torch.stack([(key_valid[index[a]] & key_valid[index[b]]).any() for a, b in PAIRS]).sum()
    return total / held.clamp(min=1), metrics  # a tensor: no host sync per step on a GPU


def hard_negative_accuracy(
    emb: dict[str, torch.Tensor], has: dict[str, torch.Tensor], rewrites: Rewrites
) -> dict[str, torch.Tensor]:
    """<m>_hard_negative_acc: the share of the samples with m, a caption and hard negatives whose m embedding
    scores its own caption above every one of its hard negatives."""
    return {
        f"{m}_hard_negative_acc": wins.sum() / rows.sum().clamp(min=1)
        for m, (wins, rows) in beats_hard_negatives(emb, has, rewrites).items()
    }


@torch.no_grad()
def beats_hard_negatives(
    emb: dict[str, torch.Tensor], has: dict[str, torch.Tensor], rewrites: Rewrites
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per non-text modality m: (wins [B], rows [B]): whether m's embedding scores its caption above every hard
    negative of it, on the rows that have m, a caption and at least one hard negative."""
    negative = rewrites.present & ~rewrites.positive
    out = {}
    for m in (m for m in MODALITY_ORDER if m != "text"):
        caption = (emb[m] * emb["text"]).sum(-1)
        hardest = torch.einsum("bc,bkc->bk", emb[m], rewrites.emb).masked_fill(~negative, float("-inf")).amax(-1)
        rows = has[m] & has["text"] & negative.any(-1)
        out[m] = ((caption > hardest) & rows, rows)
    return out
