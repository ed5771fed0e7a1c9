"""Sample-level modality matching: 5-way classification of the fusion CLS.

Classes (drawn with `tasks.matching.class_probs`, default 0.2 each): 0 matched; 1 image swapped; 2 audio swapped;
3 image and audio swapped together from one other sample; 4 image and audio swapped from two different samples.
Only samples whose own and partner modalities are all present count.
"""

from __future__ import annotations

import torch

from opt_ds.model.fusion import Fused
from opt_ds.model.opt import OPTModel, Unimodal
from opt_ds.tasks.base import Task, TaskContext, weighted_cross_entropy
from opt_ds.tasks.encoding import EncoderRequest
from opt_ds.tasks.settings import MatchingConfig

MATCHED, IMAGE_SWAPPED, AUDIO_SWAPPED, BOTH_FROM_ONE, BOTH_FROM_TWO = range(5)
CLASS_NAMES = ("matched", "image_swapped", "audio_swapped", "both_from_one", "both_from_two")


def swap_sources(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the index its image and its audio come from (neighbours at distance 1 and 2)."""
    n = labels.shape[0]
    own = torch.arange(n, device=labels.device)
    next1, next2 = (own + 1) % n, (own + 2) % n
    image_from = torch.where(
        (labels == IMAGE_SWAPPED) | (labels == BOTH_FROM_ONE) | (labels == BOTH_FROM_TWO), next1, own
    )
    audio_from = torch.where(
        (labels == AUDIO_SWAPPED) | (labels == BOTH_FROM_ONE), next1, torch.where(labels == BOTH_FROM_TWO, next2, own)
    )
    return image_from, audio_from


def swap(batch: dict, labels: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """-> (the batch with images and audio swapped as `labels` say, which samples count: every modality
    present, own and swapped in)."""
    image_from, audio_from = swap_sources(labels)
    swapped = batch | {
        "image": batch["image"][image_from],
        "has_image": batch["has_image"][image_from],
        "audio": batch["audio"][audio_from],
        "audio_mask": batch["audio_mask"][audio_from],
        "has_audio": batch["has_audio"][audio_from],
    }
    triplet = batch["has_text"] & batch["has_image"] & batch["has_audio"]
    return swapped, triplet & swapped["has_image"] & swapped["has_audio"] & (labels.shape[0] > 1)


class ModalityMatching(Task):
    name, components, settings_type = "matching", ("text", "vision", "audio", "fusion", "heads"), MatchingConfig

    def prepare(self, model: OPTModel, batch: dict, ctx: TaskContext) -> tuple[EncoderRequest, dict]:
        n = batch["image"].shape[0]
        bounds = torch.tensor(self.settings.class_probs, device=batch["image"].device).cumsum(0)[:-1]
        labels = (ctx.rand(n, device=batch["image"].device)[:, None] >= bounds[None]).sum(1)
        if n < 3:  # two distinct other samples need a batch of three
            labels = torch.where(labels == BOTH_FROM_TWO, torch.full_like(labels, BOTH_FROM_ONE), labels)
        swapped, weight = swap(batch, labels)
        return EncoderRequest(swapped), {"labels": labels, "weight": weight}

    def score(
        self, model: OPTModel, batch: dict, state: dict, uni: Unimodal, fused: Fused | None
    ) -> tuple[torch.Tensor, dict]:
        logits = model.matching_head(fused.tokens[:, 0])
        loss, acc = weighted_cross_entropy(logits, state["labels"], state["weight"])
        return loss, {"acc": acc, "samples": state["weight"].sum().float()}
