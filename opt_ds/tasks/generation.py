"""Modality-level tasks: regenerate the text, or the image's VQ tokens, from the other modalities (text-only
samples: the text from a corrupted copy of itself).

Partner masking per sample, by `partner_split` (default 30/30/40): partner A left out whole and 15% of B
masked; 15% of A masked and B left out whole; 15% of both. A modality left out whole is excluded from the
cross-modal encoder's attention. The settings are `tasks.text_gen` / `tasks.image_gen` (GenerationConfig).
"""

from __future__ import annotations

import torch

from opt_ds.model.fusion import Fused
from opt_ds.model.opt import OPTModel, Unimodal
from opt_ds.tasks.base import Task, TaskContext, bert_corrupt, choose_mask, text_candidates, weighted_cross_entropy
from opt_ds.tasks.encoding import EncoderRequest
from opt_ds.tasks.settings import GenerationConfig
from opt_ds.tasks.token import audio_token_valid


def partner_plan(batch_size: int, ctx: TaskContext, device, split: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (whole_a, whole_b) bool [B]: which partner is left out entirely (shares split[0], split[1]); the
    other is partly masked."""
    u = ctx.rand(batch_size, device=device)
    whole_a = u < split[0]
    whole_b = (u >= split[0]) & (u < split[0] + split[1])
    return whole_a, whole_b


class TextGeneration(Task):
    """Text excluded from the encoder; the text decoder regenerates it from image + audio.

    A text-only sample (unpaired text) has no partner to generate from: the encoder sees it with
    denoise_ratio of its words corrupted (80/10/10 as MLM) and the decoder regenerates the original, UNIMO's
    text-to-text generation, so text corpora train the decoder too.
    """

    name, components, settings_type = (
        "text_gen",
        ("text", "vision", "audio", "fusion", "text_decoder"),
        GenerationConfig,
    )

    def prepare(self, model: OPTModel, batch: dict, ctx: TaskContext) -> tuple[EncoderRequest, dict]:
        s = self.settings
        whole_image, whole_audio = partner_plan(batch["image"].shape[0], ctx, batch["image"].device, s.partner_split)
        patches = batch["has_image"][:, None].expand(-1, model.cfg.vision.grid**2)
        patch_mask = choose_mask(patches, ctx, s.partner_mask_ratio, whole_prob=0.0) & ~whole_image[:, None]
        audio_mask = (
            choose_mask(audio_token_valid(batch, model), ctx, s.partner_mask_ratio, 0.0) & ~whole_audio[:, None]
        )
        text_only = batch["has_text"] & ~batch["has_image"] & ~batch["has_audio"]
        noise = choose_mask(text_candidates(batch, ctx) & text_only[:, None], ctx, s.denoise_ratio, 0.0)
        corrupted = batch | {"text_ids": bert_corrupt(batch["text_ids"], noise, ctx)}
        keep = {"text": text_only, "image": ~whole_image, "audio": ~whole_audio}
        has_partner = (batch["has_image"] & ~whole_image) | (batch["has_audio"] & ~whole_audio)
        request = EncoderRequest(corrupted, patch_mask=patch_mask, audio_token_mask=audio_mask, keep=keep)
        return request, {"has_partner": has_partner | text_only}

    def score(
        self, model: OPTModel, batch: dict, state: dict, uni: Unimodal, fused: Fused | None
    ) -> tuple[torch.Tensor, dict]:
        ids = batch["text_ids"]
        logits = model.text_decoder(ids[:, :-1], fused.tokens, fused.valid)
        weight = batch["text_mask"][:, 1:] & (batch["has_text"] & state["has_partner"])[:, None]
        loss, acc = weighted_cross_entropy(logits, ids[:, 1:], weight)
        return loss, {"acc": acc, "tokens": weight.sum().float()}


class ImageGeneration(Task):
    """Image excluded from the encoder; the image decoder predicts its VQ tokens from text + audio.

    unconditional_share of the samples see neither partner (the fusion holds its CLS alone), so the one
    decoder also learns the unconditional distribution of codes that classifier-free guidance contrasts the
    conditional one with (`generate_image_tokens(..., guidance=, unconditional=)`).
    """

    name, components, settings_type = (
        "image_gen",
        ("text", "vision", "audio", "fusion", "image_decoder"),
        GenerationConfig,
    )

    def prepare(self, model: OPTModel, batch: dict, ctx: TaskContext) -> tuple[EncoderRequest, dict]:
        s = self.settings
        codes = ctx.image_codes(batch["image"])
        whole_text, whole_audio = partner_plan(codes.shape[0], ctx, codes.device, s.partner_split)
        unconditional = ctx.rand(codes.shape[0], device=codes.device) < s.unconditional_share
        text_mask = choose_mask(text_candidates(batch, ctx), ctx, s.partner_mask_ratio, 0.0) & ~whole_text[:, None]
        audio_mask = (
            choose_mask(audio_token_valid(batch, model), ctx, s.partner_mask_ratio, 0.0) & ~whole_audio[:, None]
        )
        keep = {
            "image": torch.zeros_like(batch["has_image"]),
            "text": ~whole_text & ~unconditional,
            "audio": ~whole_audio & ~unconditional,
        }
        corrupted = batch | {"text_ids": bert_corrupt(batch["text_ids"], text_mask, ctx)}
        has_partner = (batch["has_text"] & keep["text"]) | (batch["has_audio"] & keep["audio"])
        request = EncoderRequest(corrupted, audio_token_mask=audio_mask, keep=keep)
        return request, {"codes": codes, "trained": has_partner | unconditional}

    def score(
        self, model: OPTModel, batch: dict, state: dict, uni: Unimodal, fused: Fused | None
    ) -> tuple[torch.Tensor, dict]:
        codes = state["codes"]
        inputs = torch.cat([torch.full_like(codes[:, :1], model.image_bos), codes[:, :-1]], dim=1)
        logits = model.image_decoder(inputs, fused.tokens, fused.valid)
        weight = (batch["has_image"] & state["trained"])[:, None].expand_as(codes)
        loss, acc = weighted_cross_entropy(logits, codes, weight)
        return loss, {"acc": acc, "tokens": weight.sum().float()}
