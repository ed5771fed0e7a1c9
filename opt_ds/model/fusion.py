"""The cross-modal encoder: one transformer over [CLS; text; image; audio] with modality-type embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opt_ds.model.config import StackConfig
from opt_ds.model.layers import Transformer, key_padding_mask

MODALITY_TYPES = {"cls": 0, "text": 1, "image": 2, "audio": 3}
MODALITY_ORDER = ("text", "image", "audio")


@dataclass
class Fused:
    tokens: torch.Tensor  # [B, S, D]
    valid: torch.Tensor  # [B, S] bool
    spans: dict[str, slice]  # where each modality's tokens sit in the sequence

    def part(self, modality: str) -> torch.Tensor:
        return self.tokens[:, self.spans[modality]]

    def rows(self, rows: slice) -> "Fused":
        return Fused(self.tokens[rows], self.valid[rows], self.spans)


class CrossModalEncoder(nn.Module):
    """Absent or excluded modalities are masked out of attention; the fusion CLS is always valid."""

    def __init__(self, cfg: StackConfig, text_dim: int, image_dim: int, audio_dim: int, use_checkpoint: bool = False):
        super().__init__()
        self.proj = nn.ModuleDict(
            {
                "text": nn.Linear(text_dim, cfg.hidden),
                "image": nn.Linear(image_dim, cfg.hidden),
                "audio": nn.Linear(audio_dim, cfg.hidden),
            }
        )
        self.type_embed = nn.Embedding(len(MODALITY_TYPES), cfg.hidden)
        self.transformer = Transformer(cfg.hidden, cfg.layers, cfg.heads, cfg.mlp_ratio, use_checkpoint=use_checkpoint)

    def forward(self, parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """parts: modality -> (tokens [B, L, D_m], valid [B, L]) -> (tokens [B, S, D], valid [B, S]).

        Plain tensors in and out: ZeRO-3's backward hooks must see them.
        """
        first = parts["text"][0]
        batch, device = first.shape[0], first.device
        projected = [self.proj[name](parts[name][0]) for name in MODALITY_ORDER]
        cls = torch.zeros(batch, 1, projected[0].shape[-1], dtype=projected[0].dtype, device=device)
        lengths = {"cls": 1, **{name: parts[name][0].shape[1] for name in MODALITY_ORDER}}
        types = torch.cat(
            [
                torch.full((batch, length), MODALITY_TYPES[name], dtype=torch.long, device=device)
                for name, length in lengths.items()
            ],
            dim=1,
        )
        tokens = torch.cat([cls, *projected], dim=1) + self.type_embed(types)  # one call: one ZeRO-3 fetch
        valids = [torch.ones(batch, 1, dtype=torch.bool, device=device)] + [parts[name][1] for name in MODALITY_ORDER]
        valid = torch.cat(valids, dim=1)
        return self.transformer(tokens, mask=key_padding_mask(valid)), valid


def spans(lengths: dict[str, int]) -> dict[str, slice]:
    """Where each modality's tokens sit in the fused sequence (after the fusion CLS)."""
    out, start = {}, 1
    for name in MODALITY_ORDER:
        out[name] = slice(start, start + lengths[name])
        start += lengths[name]
    return out
