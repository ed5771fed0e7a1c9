"""OPTModel: three encoders, the cross-modal encoder, two decoders and the task heads."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, TypeVar

import torch
from timm.models.vision_transformer import Block as VitBlock
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer

from opt_ds.model.config import CONCEPT_PAD, FRAMES_PER_AUDIO_TOKEN, ModelConfig
from opt_ds.model.decoders import TokenDecoder
from opt_ds.model.encoders import AudioEncoder, Level, TextEncoder, VisionEncoder, mean_pool
from opt_ds.model.fusion import CrossModalEncoder, Fused, spans
from opt_ds.model.heads import MATCH_CLASSES, ContrastiveHead, LinearHead, MatchingHead, MLMHead
from opt_ds.model.layers import Block

T = TypeVar("T")
COMPONENTS = ("text", "vision", "audio", "fusion", "text_decoder", "image_decoder", "heads")
ENCODER_COMPONENTS = ("text", "vision", "audio", "fusion")  # what the decoders' memory is made by
# One transformer layer of each tower, decoder and the fusion: the unit ZeRO-3 gathers whole (leaf modules)
LAYER_CLASSES: tuple[type[nn.Module], ...] = (BertLayer, VitBlock, Block)


@dataclass
class Unimodal:
    text: torch.Tensor  # [B, L, Dt]; [:, 0] is [CLS]
    text_valid: torch.Tensor  # [B, L]
    image: torch.Tensor  # [B, 1+N, Dv]; [:, 0] is CLS
    audio: torch.Tensor  # [B, 1+T', Da]; [:, 0] is CLS
    audio_valid: torch.Tensor
    concepts: Level | None = None  # MVP's second level (models with concept inputs): the caption's concepts' outputs
    tags: Level | None = None  # ... and the picture's tags' outputs from the vision tower
    extra_text: torch.Tensor | None = None  # [E, L', Dt]: text-only rows a task asked for (caption rewrites)
    extra_text_valid: torch.Tensor | None = None  # [E, L']

    def pooled(self) -> dict[str, torch.Tensor]:
        """One vector per modality: the text's mean token (see mean_pool), the image's and audio's CLS."""
        return {"text": mean_pool(self.text, self.text_valid), "image": self.image[:, 0], "audio": self.audio[:, 0]}

    def rows(self, rows: slice | torch.Tensor) -> "Unimodal":
        """These samples' encodings (a slice, or an index tensor); extra text rows are not per sample: left out."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Level):
                value = Level(value.tokens[rows], value.valid[rows])
            elif value is not None and not f.name.startswith("extra_"):
                value = value[rows]
            picked[f.name] = None if f.name.startswith("extra_") else value
        return Unimodal(**picked)


class OPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ckpt = cfg.activation_checkpointing
        d = cfg.fusion.hidden
        self.text = TextEncoder(cfg.text, ckpt)
        concept_dim = cfg.text.hidden if cfg.concept_vocab_size else 0
        self.vision = VisionEncoder(cfg.vision, ckpt, concept_dim)
        self.audio = AudioEncoder(cfg.audio, ckpt)
        self.fusion = CrossModalEncoder(cfg.fusion, cfg.text.hidden, cfg.vision.hidden, cfg.audio.hidden, ckpt)
        self.text_decoder = TokenDecoder(cfg.text_decoder, cfg.text.vocab_size, cfg.text.max_len, d, ckpt)
        self.image_decoder = TokenDecoder(cfg.image_decoder, cfg.vq.codebook_size + 1, cfg.vision.grid**2, d, ckpt)
        self.mlm_head = MLMHead(d, cfg.text.hidden, self.text.word_embeddings)
        self.mvm_head = LinearHead(d, cfg.vq.codebook_size)
        self.mam_head = LinearHead(d, FRAMES_PER_AUDIO_TOKEN * cfg.audio.n_mels)
        self.matching_head = MatchingHead(d, MATCH_CLASSES)
        self.pair_matching_head = MatchingHead(d, 2)  # matched or not, against the hardest in-batch negatives
        self.contrastive_head = ContrastiveHead(
            {"text": cfg.text.hidden, "image": cfg.vision.hidden, "audio": cfg.audio.hidden}, cfg.contrastive_dim
        )
        self.concept_modules: list[nn.Module] = []
        if cfg.concept_vocab_size:  # MVP's concepts: one embedding for caption concepts and picture tags
            self.concept_embed = nn.Embedding(cfg.concept_vocab_size, cfg.text.hidden)
            self.concept_head = LinearHead(cfg.text.hidden, cfg.concept_vocab_size)  # masked concept recovery
            self.tag_head = LinearHead(cfg.vision.hidden, cfg.concept_vocab_size)
            self.grounding_head = ContrastiveHead({"concept": cfg.text.hidden, "patch": cfg.vision.hidden}, d)
            self.concept_modules = [self.concept_head, self.tag_head, self.grounding_head]

    def forward(self, run: Callable[["OPTModel"], T]) -> T:
        """The engine's entry point: `run(model)` calls the task code, so DeepSpeed sees one forward per step."""
        return run(self)

    @property
    def image_bos(self) -> int:
        return self.cfg.vq.codebook_size

    def component_modules(self) -> dict[str, list[nn.Module]]:
        return {
            "text": [self.text, *([self.concept_embed] if self.cfg.concept_vocab_size else [])],
            "vision": [self.vision],
            "audio": [self.audio],
            "fusion": [self.fusion],
            "text_decoder": [self.text_decoder],
            "image_decoder": [self.image_decoder],
            "heads": [
                self.mlm_head,
                self.mvm_head,
                self.mam_head,
                self.matching_head,
                self.pair_matching_head,
                self.contrastive_head,
                *self.concept_modules,
            ],
        }

    def unimodal(
        self,
        batch: dict,
        text_ids: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
        audio_token_mask: torch.Tensor | None = None,
        concepts: bool = False,
    ) -> Unimodal:
        """Run all three encoders on the whole batch (always: every rank runs the same graph).

        With `concepts` (a model with concept inputs only), the batch's concept_ids [B, K] and tag_ids [B, K'] (none:
        no slots filled) enter the text and vision towers beside the tokens and patches.
        """
        text_ids = batch["text_ids"] if text_ids is None else text_ids
        concepts_in, tags = None, None
        if concepts:
            if not self.cfg.concept_vocab_size:
                raise ValueError("this model has no concept inputs (model concept_vocab_size: 0)")
            concepts_in, tags = self.concept_levels(batch)
        text = self.text(text_ids, batch["text_mask"], concepts_in)
        image = self.vision(batch["image"], patch_mask, tags)
        audio, audio_valid = self.audio(batch["audio"], batch["audio_mask"], audio_token_mask)
        uni = Unimodal(text, batch["text_mask"], image, audio, audio_valid)
        if concepts_in is None:
            return uni
        words, patches = text_ids.shape[1], self.cfg.vision.grid**2 + 1
        return replace(
            uni,
            text=text[:, :words],
            image=image[:, :patches],
            concepts=Level(text[:, words:], concepts_in.valid),
            tags=Level(image[:, patches:], tags.valid),
        )

    def concept_levels(self, batch: dict) -> tuple[Level, Level]:
        """The caption concepts' and picture tags' embeddings, from one call of the shared embedding."""

        def ids(key: str, rows: int) -> torch.Tensor:  # a batch without them: one empty slot per sample
            none = torch.full((rows, 1), CONCEPT_PAD, dtype=torch.long, device=batch["text_ids"].device)
            return batch.get(key, none)

        concept_ids, tag_ids = ids("concept_ids", batch["text_ids"].shape[0]), ids("tag_ids", batch["image"].shape[0])
        embedded = self.concept_embed(torch.cat([concept_ids.flatten(), tag_ids.flatten()]))
        concepts, tags = embedded.split([concept_ids.numel(), tag_ids.numel()])
        width = embedded.shape[-1]
        return (
            Level(concepts.view(*concept_ids.shape, width), concept_ids != CONCEPT_PAD),
            Level(tags.view(*tag_ids.shape, width), tag_ids != CONCEPT_PAD),
        )

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
