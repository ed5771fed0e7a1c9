"""OPTModel: three encoders, the cross-modal encoder, two decoders and the task heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from timm.models.vision_transformer import Block as VitBlock
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer

from opt_ds.model.config import FRAMES_PER_AUDIO_TOKEN, ModelConfig
from opt_ds.model.decoders import TokenDecoder
from opt_ds.model.encoders import AudioEncoder, TextEncoder, VisionEncoder, mean_pool
from opt_ds.model.fusion import CrossModalEncoder, Fused, spans
from opt_ds.model.heads import ContrastiveHead, LinearHead, MatchingHead, MLMHead
from opt_ds.model.layers import Block

T = TypeVar("T")
COMPONENTS = ("text", "vision", "audio", "fusion", "text_decoder", "image_decoder", "heads")
# One transformer layer of each tower, decoder and the fusion: the unit ZeRO-3 gathers whole (leaf modules)
LAYER_CLASSES: tuple[type[nn.Module], ...] = (BertLayer, VitBlock, Block)


@dataclass
class Unimodal:
    text: torch.Tensor  # [B, L, Dt]; [:, 0] is [CLS]
    text_valid: torch.Tensor  # [B, L]
    image: torch.Tensor  # [B, 1+N, Dv]; [:, 0] is CLS
    audio: torch.Tensor  # [B, 1+T', Da]; [:, 0] is CLS
    audio_valid: torch.Tensor
    extra_text: torch.Tensor | None = None  # [E, L', Dt]: text-only rows a task asked for (caption rewrites)
    extra_text_valid: torch.Tensor | None = None  # [E, L']

    def pooled(self) -> dict[str, torch.Tensor]:
        """One vector per modality: the text's mean token (see mean_pool), the image's and audio's CLS."""
        return {"text": mean_pool(self.text, self.text_valid), "image": self.image[:, 0], "audio": self.audio[:, 0]}

    def rows(self, rows: slice) -> "Unimodal":
        return Unimodal(
            self.text[rows], self.text_valid[rows], self.image[rows], self.audio[rows], self.audio_valid[rows]
        )


class OPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ckpt = cfg.activation_checkpointing
        d = cfg.fusion.hidden
        self.text = TextEncoder(cfg.text, ckpt)
        self.vision = VisionEncoder(cfg.vision, ckpt)
        self.audio = AudioEncoder(cfg.audio, ckpt)
        self.fusion = CrossModalEncoder(cfg.fusion, cfg.text.hidden, cfg.vision.hidden, cfg.audio.hidden, ckpt)
        self.text_decoder = TokenDecoder(cfg.text_decoder, cfg.text.vocab_size, cfg.text.max_len, d, ckpt)
        self.image_decoder = TokenDecoder(cfg.image_decoder, cfg.vq.codebook_size + 1, cfg.vision.grid**2, d, ckpt)
        self.mlm_head = MLMHead(d, cfg.text.hidden, self.text.word_embeddings)
        self.mvm_head = LinearHead(d, cfg.vq.codebook_size)
        self.mam_head = LinearHead(d, FRAMES_PER_AUDIO_TOKEN * cfg.audio.n_mels)
        self.matching_head = MatchingHead(d)
        self.contrastive_head = ContrastiveHead(
            {"text": cfg.text.hidden, "image": cfg.vision.hidden, "audio": cfg.audio.hidden}, cfg.contrastive_dim
        )

    def forward(self, run: Callable[["OPTModel"], T]) -> T:
        """The engine's entry point: `run(model)` calls the task code, so DeepSpeed sees one forward per step."""
        return run(self)

    @property
    def image_bos(self) -> int:
        return self.cfg.vq.codebook_size

    def component_modules(self) -> dict[str, list[nn.Module]]:
        return {
            "text": [self.text],
            "vision": [self.vision],
            "audio": [self.audio],
            "fusion": [self.fusion],
            "text_decoder": [self.text_decoder],
            "image_decoder": [self.image_decoder],
            "heads": [self.mlm_head, self.mvm_head, self.mam_head, self.matching_head, self.contrastive_head],
        }

    def unimodal(
        self,
        batch: dict,
        text_ids: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
        audio_token_mask: torch.Tensor | None = None,
    ) -> Unimodal:
        """Run all three encoders on the whole batch (always: every rank runs the same graph)."""
        text_ids = batch["text_ids"] if text_ids is None else text_ids
        text = self.text(text_ids, batch["text_mask"])
        image = self.vision(batch["image"], patch_mask)
        audio, audio_valid = self.audio(batch["audio"], batch["audio_mask"], audio_token_mask)
        return Unimodal(text, batch["text_mask"], image, audio, audio_valid)

    def fuse(self, uni: Unimodal, batch: dict, keep: dict[str, torch.Tensor] | None = None) -> Fused:
        """Cross-modal encoding; a modality takes part for sample b only if present and keep[m][b]."""
        keep = keep or {}

        def part(m: str, tokens: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            take = batch[f"has_{m}"] & keep.get(m, torch.ones_like(batch[f"has_{m}"]))
            return tokens, valid & take[:, None]

        image_valid = torch.ones(uni.image.shape[:2], dtype=torch.bool, device=uni.image.device)
        parts = {
            "text": part("text", uni.text, uni.text_valid),
            "image": part("image", uni.image, image_valid),
            "audio": part("audio", uni.audio, uni.audio_valid),
        }
        tokens, valid = self.fusion(parts)
        return Fused(tokens, valid, spans({m: t.shape[1] for m, (t, _) in parts.items()}))

    def encode(self, batch: dict, keep: dict[str, torch.Tensor] | None = None, **masks) -> tuple[Unimodal, Fused]:
        uni = self.unimodal(batch, **masks)
        return uni, self.fuse(uni, batch, keep)


def parameter_counts(model: OPTModel) -> dict[str, int]:
    """Parameters per component of a built model (works on the meta device); tied weights counted once."""
    seen: set[int] = set()
    counts = {}
    for name, modules in model.component_modules().items():
        total = 0
        for module in modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += int(getattr(p, "ds_numel", p.numel()))
        counts[name] = total
    counts["total"] = sum(counts.values())
    return counts
