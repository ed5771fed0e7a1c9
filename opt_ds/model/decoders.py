"""Transformer decoders with cross-attention to the cross-modal output: captions and VQ image tokens."""

from __future__ import annotations

import torch
from torch import nn

from opt_ds.model.config import StackConfig
from opt_ds.model.layers import Transformer, key_padding_mask


class TokenDecoder(nn.Module):
    """Causal decoder over a token vocabulary; output head tied to the input embedding."""

    def __init__(self, cfg: StackConfig, vocab_size: int, max_len: int, memory_dim: int, use_checkpoint: bool = False):
        super().__init__()
        self.max_len = max_len
        # weights passed in at creation: init written after construction would miss ZeRO-3's partitioned tensors
        self.embed = nn.Embedding(vocab_size, cfg.hidden, _weight=torch.randn(vocab_size, cfg.hidden) * 0.02)
        self.pos_embed = nn.Embedding(max_len, cfg.hidden, _weight=torch.randn(max_len, cfg.hidden) * 0.02)
        self.transformer = Transformer(
            cfg.hidden, cfg.layers, cfg.heads, cfg.mlp_ratio, memory_dim=memory_dim, use_checkpoint=use_checkpoint
        )
        self.head = nn.Linear(cfg.hidden, vocab_size, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor, memory: torch.Tensor, memory_valid: torch.Tensor) -> torch.Tensor:
        """ids [B, L] (teacher forcing input) -> logits [B, L, V]."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.pos_embed(positions)[None]
        x = self.transformer(x, memory=memory, memory_mask=key_padding_mask(memory_valid), causal=True)
        return self.head(x)
