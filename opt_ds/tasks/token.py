"""Token-level tasks: MLM (text), MVM (image patches -> VQ codes), MAM (audio frames)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opt_ds.model.config import FRAMES_PER_AUDIO_TOKEN, subsampled_length
from opt_ds.model.fusion import Fused
from opt_ds.model.opt import OPTModel, Unimodal
from opt_ds.tasks.base import (
    Task,
    TaskContext,
    bert_corrupt,
    choose_mask,
    text_candidates,
    weighted_cross_entropy,
    zero_if_empty,
)
from opt_ds.tasks.encoding import EncoderRequest
from opt_ds.tasks.settings import AudioMaskingConfig, MaskingConfig

COMPONENTS_ALL_ENCODERS = ("text", "vision", "audio", "fusion", "heads")


def partners(batch: dict, own: str, ctx: TaskContext) -> dict[str, torch.Tensor]:
    """Which other modalities take part in the fusion: none in an isolated (uni-modal) stage."""
    return {m: torch.full_like(batch[f"has_{m}"], not ctx.isolate) for m in ("text", "image", "audio") if m != own}


def audio_token_valid(batch: dict, model: OPTModel) -> torch.Tensor:
    """[B, T'] validity of subsampled audio tokens (after the encoder's max_frames cut)."""
    frames = batch["audio_mask"][:, : model.cfg.audio.max_frames]
    tokens = subsampled_length(frames.shape[1])
    lengths = subsampled_length(frames.sum(1))
    valid = torch.arange(tokens, device=frames.device)[None, :] < lengths[:, None]
    return valid & batch["has_audio"][:, None]


class MaskedLanguageModeling(Task):
    name, components, settings_type = "mlm", COMPONENTS_ALL_ENCODERS, MaskingConfig

    def prepare(self, model: OPTModel, batch: dict, ctx: TaskContext) -> tuple[EncoderRequest, dict]:
        mask = choose_mask(
            text_candidates(batch, ctx), ctx, self.settings.mask_ratio, self.settings.whole_modality_prob
        )
        corrupted = batch | {"text_ids": bert_corrupt(batch["text_ids"], mask, ctx)}
        return EncoderRequest(corrupted, keep=partners(batch, "text", ctx)), {"mask": mask}

    def score(
        self, model: OPTModel, batch: dict, state: dict, uni: Unimodal, fused: Fused | None
    ) -> tuple[torch.Tensor, dict]:
        mask = state["mask"]
        logits = model.mlm_head(fused.part("text")[mask])
        targets = batch["text_ids"][mask]
        loss, acc = weighted_cross_entropy(logits, targets, torch.ones_like(targets))
        return zero_if_empty(loss, logits), {"acc": acc, "masked": mask.sum().float()}


class MaskedVisionModeling(Task):
    """Mask mask_ratio of the patches (or the whole image, p=whole_modality_prob) and predict their VQ codes."""

    name, components, settings_type = "mvm", COMPONENTS_ALL_ENCODERS, MaskingConfig

    def prepare(self, model: OPTModel, batch: dict, ctx: TaskContext) -> tuple[EncoderRequest, dict]:
        codes = ctx.image_codes(batch["image"])
        mask = choose_mask(
            batch["has_image"][:, None].expand_as(codes),
            ctx,
            self.settings.mask_ratio,
            self.settings.whole_modality_prob,
        )
        return EncoderRequest(batch, patch_mask=mask, keep=partners(batch, "image", ctx)), {
            "mask": mask,
            "codes": codes,
        }

    def score(
        self, model: OPTModel, batch: dict, state: dict, uni: Unimodal, fused: Fused | None
    ) -> tuple[torch.Tensor, dict]:
        mask, codes = state["mask"], state["codes"]
        logits = model.mvm_head(fused.part("image")[:, 1:][mask])
        loss, acc = weighted_cross_entropy(logits, codes[mask], torch.ones_like(codes[mask]))
        return zero_if_empty(loss, logits), {"acc": acc, "masked": mask.sum().float()}


class MaskedAudioModeling(Task):
    """Mask mask_ratio of the audio tokens (4 frames each; all, p=whole_modality_prob); regress their frames, plus an
    InfoNCE term that picks each token's true frames among all masked tokens of the batch."""

    name, components, settings_type = "mam", COMPONENTS_ALL_ENCODERS, AudioMaskingConfig

    def prepare(self, model: OPTModel, batch: dict, ctx: TaskContext) -> tuple[EncoderRequest, dict]:
        mask = choose_mask(
            audio_token_valid(batch, model), ctx, self.settings.mask_ratio, self.settings.whole_modality_prob
        )
        return EncoderRequest(batch, audio_token_mask=mask, keep=partners(batch, "audio", ctx)), {"mask": mask}

    def score(
        self, model: OPTModel, batch: dict, state: dict, uni: Unimodal, fused: Fused | None
    ) -> tuple[torch.Tensor, dict]:
        mask = state["mask"]
        frames = batch["audio"][:, : model.cfg.audio.max_frames]
        pad = mask.shape[1] * FRAMES_PER_AUDIO_TOKEN - frames.shape[1]
        targets = F.pad(frames, (0, 0, 0, pad)).reshape(frames.shape[0], mask.shape[1], -1)[mask].float()
        predicted = model.mam_head(fused.part("audio")[:, 1:][mask]).float()
        regression = F.mse_loss(predicted, targets) if predicted.numel() else predicted.sum() * 0.0
        sim = F.normalize(predicted, dim=-1) @ F.normalize(targets, dim=-1).t() / self.settings.temperature
        labels = torch.arange(sim.shape[0], device=sim.device)
        nce = F.cross_entropy(sim, labels) if sim.numel() else sim.sum() * 0.0
        acc = (sim.argmax(-1) == labels).float().mean() if sim.numel() else sim.sum().detach()
        loss = regression + self.settings.contrastive_weight * nce
        return loss, {
            "regression": regression.detach(),
            "nce": nce.detach(),
            "acc": acc.detach(),
            "masked": mask.sum().float(),
        }
