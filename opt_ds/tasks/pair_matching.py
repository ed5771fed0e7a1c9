"""Matching against the hardest in-batch negatives (MVP, ALBEF): the cross-modal level's check that a caption and a
picture (or a sound) belong together, with negatives close enough to be hard.

The uni-modal encodings come from the step's shared pass; the contrastive head's similarities (no gradient) pick,
for each caption, the most similar other picture of the batch and, for each picture, the most similar other
caption; the fusion (in the pass's one fusion call) then encodes the matched pairs and both kinds of hard pair,
and a binary head on its CLS tells them apart. A sample whose caption is word for word another's is never that
one's negative. OPT's 5-way matching (tasks/matching.py) draws its swaps at random instead.
"""

from __future__ import annotations

from functools import partial

import torch

from opt_ds.model.fusion import Fused
from opt_ds.model.opt import OPTModel, Unimodal
from opt_ds.tasks.base import Task, TaskContext, weighted_cross_entropy
from opt_ds.tasks.encoding import EncoderRequest, FusionInput
from opt_ds.tasks.settings import PairMatchingConfig


@torch.no_grad()
def hardest_negatives(
    similarity: torch.Tensor, allowed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """similarity [B, B] (caption i, partner j), allowed [B, B] -> (for each caption its hardest partner, whether it
    has one; for each partner its hardest caption, whether it has one)."""
    scores = similarity.masked_fill(~allowed, float("-inf"))
    return scores.argmax(1), allowed.any(1), scores.argmax(0), allowed.any(0)


class HardNegativeMatching(Task):
    name, components = "hard_matching", ("text", "vision", "audio", "fusion", "heads")
    settings_type = PairMatchingConfig

    @property
    def fused_rows_per_sample(self) -> int:
        return 3 * len(self.settings.partners)  # matched, hardest partner, hardest caption

    def prepare(self, model: OPTModel, batch: dict, ctx: TaskContext) -> tuple[EncoderRequest, dict]:
        state: dict = {}  # the pairs' labels and weights, known once the encodings have picked them
        return EncoderRequest(batch, concepts=True, pairs=partial(self.pairs, batch=batch, state=state)), state

    def pairs(self, model: OPTModel, uni: Unimodal, batch: dict, state: dict) -> FusionInput:
        """For each partner modality: the matched pairs, each caption with its hardest partner, each partner with
        its hardest caption (the third modality kept out of the fusion)."""
        with torch.no_grad():
            emb, _ = model.contrastive_head(uni.pooled())
        own = torch.arange(batch["text_ids"].shape[0], device=batch["text_ids"].device)
        same_caption = (batch["text_ids"][:, None] == batch["text_ids"][None]).all(-1)
        index: dict[str, list[torch.Tensor]] = {"text": [], "image": [], "audio": []}
        keep: dict[str, list[torch.Tensor]] = {"text": [], "image": [], "audio": []}
        labels, weights = [], []
        for partner in self.settings.partners:
            has_pair = batch["has_text"] & batch[f"has_{partner}"]
            allowed = has_pair[:, None] & has_pair[None, :] & ~same_caption
            hard_partner, has_hard_partner, hard_caption, has_hard_caption = hardest_negatives(
                emb["text"] @ emb[partner].t(), allowed
            )
            captions, partners = torch.cat([own, own, hard_caption]), torch.cat([own, hard_partner, own])
            for m in index:
                index[m].append(partners if m == partner else captions)
                keep[m].append(torch.full_like(captions, m in ("text", partner), dtype=torch.bool))
            labels.append(torch.cat([torch.ones_like(own), torch.zeros_like(own), torch.zeros_like(own)]))
            weights.append(torch.cat([has_pair, has_pair & has_hard_partner, has_pair & has_hard_caption]))
        state["labels"], state["weight"] = torch.cat(labels), torch.cat(weights)
        rows = {m: torch.cat(parts) for m, parts in index.items()}
        picked = Unimodal(
            uni.text[rows["text"]],
            uni.text_valid[rows["text"]],
            uni.image[rows["image"]],
            uni.audio[rows["audio"]],
            uni.audio_valid[rows["audio"]],
        )
        present = {m: batch[f"has_{m}"][rows[m]] for m in rows}
        return FusionInput(picked, present, {m: torch.cat(parts) for m, parts in keep.items()})

    def score(
        self, model: OPTModel, batch: dict, state: dict, uni: Unimodal, fused: Fused | None
    ) -> tuple[torch.Tensor, dict]:
        logits = model.pair_matching_head(fused.tokens[:, 0])
        weight, target = state["weight"], state["labels"]
        loss, acc = weighted_cross_entropy(logits, target, weight)
        right = logits.detach().argmax(-1) == target
        metrics = {"acc": acc}
        for name, rows in (("matched", weight & (target == 1)), ("hard", weight & (target == 0))):
            metrics |= {f"{name}_acc": (right & rows).sum() / rows.sum().clamp(min=1), name: rows.sum().float()}
        return loss, metrics
