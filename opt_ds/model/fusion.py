"""The cross-modal encoder: one transformer over [CLS; text; image; audio] with modality-type embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opt_ds.model.config import StackConfig
from opt_ds.model.layers import Transformer, key_padding_mask

MODALITY_TYPES = {"cls": 0, "text": 1, "image": 2, "audio": 3}


@dataclass
class Fused:
    tokens: torch.Tensor  # [B, S, D]
    valid: torch.Tensor  # [B, S] bool
    spans: dict[str, slice]  # where each modality's tokens sit in the sequence

    def part(self, modality: str) -> torch.Tensor:
        return self.tokens[:, self.spans[modality]]


class CrossModalEncoder(nn.Module):
    """Absent or excluded modalities are masked out of attention; the fusion CLS is always valid."""

    def __init__(self, cfg: StackConfig, text_dim: int, image_dim: int, audio_dim: int, use_checkpoint: bool = False):
        super().__init__()
        self.proj = nn.ModuleDict({"text": nn.Linear(text_dim, cfg.hidden), "image": nn.Linear(image_dim, cfg.hidden),
                                   "audio": nn.Linear(audio_dim, cfg.hidden)})
        self.type_embed = nn.Embedding(len(MODALITY_TYPES), cfg.hidden)
        self.transformer = Transformer(cfg.hidden, cfg.layers, cfg.heads, cfg.mlp_ratio, use_checkpoint=use_checkpoint)

    def forward(self, parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Fused:
        """parts: modality -> (tokens [B, L, D_m], valid [B, L]), in the order text, image, audio."""
        batch = next(iter(parts.values()))[0].shape[0]
        device = next(iter(parts.values()))[0].device
        cls_type = torch.zeros(batch, 1, dtype=torch.long, device=device)
        pieces = [self.type_embed(cls_type)]
        valids = [torch.ones(batch, 1, dtype=torch.bool, device=device)]
        spans, start = {}, 1
        for name in ("text", "image", "audio"):
            tokens, valid = parts[name]
            types = torch.full(tokens.shape[:2], MODALITY_TYPES[name], dtype=torch.long, device=device)
            pieces.append(self.proj[name](tokens) + self.type_embed(types))
            valids.append(valid)
            spans[name] = slice(start, start + tokens.shape[1])
            start += tokens.shape[1]
        x = torch.cat(pieces, dim=1)
        valid = torch.cat(valids, dim=1)
        return Fused(self.transformer(x, mask=key_padding_mask(valid)), valid, spans)
