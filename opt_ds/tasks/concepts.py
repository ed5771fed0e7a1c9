"""MVP's concept-level tasks, at the uni-modal level (on the towers' outputs, not through the cross-modal encoder):
masked concept recovery and weakly supervised concept grounding. Both need a model with concept inputs
(`concept_vocab_size`) and data with a concept vocabulary (`data.decode.concepts`).
"""

from __future__ import annotations

import torch

from opt_ds.model.config import CONCEPT_MASK, CONCEPT_PAD
from opt_ds.model.fusion import Fused
from opt_ds.model.opt import OPTModel, Unimodal
from opt_ds.tasks.base import Task, TaskContext, choose_mask, weighted_cross_entropy, zero_if_empty
from opt_ds.tasks.encoding import EncoderRequest
from opt_ds.tasks.settings import MaskingConfig, NoSettings

UNIMODAL_COMPONENTS = ("text", "vision", "audio", "heads")
LEVELS = {"concept_ids": "concepts", "tag_ids": "tags"}  # batch key -> its Unimodal level


class MaskedConceptRecovery(Task):
    """mask_ratio of a sample's caption concepts, and of its picture's tags, become the masked concept (all of them
    with whole_modality_prob); the text tower recovers the caption's from its words and other concepts, the vision
    tower the picture's from its patches and other tags."""

    name, components, settings_type = "mcr", UNIMODAL_COMPONENTS, MaskingConfig

    def prepare(self, model: OPTModel, batch: dict, ctx: TaskContext) -> tuple[EncoderRequest, dict]:
        ratio, whole = self.settings.mask_ratio, self.settings.whole_modality_prob
        masks = {key: choose_mask(batch[key] != CONCEPT_PAD, ctx, ratio, whole) for key in LEVELS}
        masked = batch | {key: batch[key].masked_fill(mask, CONCEPT_MASK) for key, mask in masks.items()}
        return EncoderRequest(masked, fuse=False, concepts=True), masks

    def score(
        self, model: OPTModel, batch: dict, state: dict, uni: Unimodal, fused: Fused | None
    ) -> tuple[torch.Tensor, dict]:
        total = 0.0
        metrics = {}
        for (key, level), head in zip(LEVELS.items(), (model.concept_head, model.tag_head)):
            mask = state[key]
            logits = head(getattr(uni, level).tokens[mask])
            targets = batch[key][mask]
            loss, acc = weighted_cross_entropy(logits, targets, torch.ones_like(targets))
            total = total + zero_if_empty(loss, logits)
            metrics |= {f"{level}_loss": loss.detach(), f"{level}_acc": acc, f"{level}_masked": mask.sum().float()}
        return total, metrics


class ConceptGrounding(Task):
    """Weakly supervised grounding of the caption's concepts in its picture's patches (no boxes needed): a concept
    scores each picture of the batch by its best-matching patch (the largest cosine similarity in the grounding
    head's space), and an InfoNCE over the pictures asks its own picture to score highest. A picture whose caption
    or tags hold the same concept is no negative: it shows the concept too."""

    name, components, settings_type = "grounding", UNIMODAL_COMPONENTS, NoSettings

    def prepare(self, model: OPTModel, batch: dict, ctx: TaskContext) -> tuple[EncoderRequest, dict]:
        return EncoderRequest(batch, fuse=False, concepts=True), {}

    def score(
        self, model: OPTModel, batch: dict, state: dict, uni: Unimodal, fused: Fused | None
    ) -> tuple[torch.Tensor, dict]:
        emb, scale = model.grounding_head({"concept": uni.concepts.tokens, "patch": uni.image[:, 1:]})
        best_patch = torch.einsum("bkc,jnc->bkjn", emb["concept"], emb["patch"]).amax(-1)  # [B, K, B]
        ids = batch["concept_ids"]
        shown = (ids[:, :, None, None] == ids[None, None]).any(-1) | (ids[:, :, None, None] == batch["tag_ids"]).any(-1)
        own = torch.eye(ids.shape[0], dtype=torch.bool, device=ids.device)[:, None, :]
        candidates = batch["has_image"][None, None, :] & (own | ~shown)
        rows = uni.concepts.valid & batch["has_text"][:, None] & batch["has_image"][:, None]
        rows = rows & (candidates & ~own).any(-1)  # a concept every other picture shows teaches nothing
        logits = (best_patch * scale).masked_fill(~candidates, float("-inf")).masked_fill(~rows[..., None], 0.0)
        targets = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        loss, acc = weighted_cross_entropy(logits, targets, rows)
        return loss, {"acc": acc, "concepts": rows.sum().float(), "temperature": (1.0 / scale).detach()}
