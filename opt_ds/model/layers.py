"""Pre-norm transformer blocks on scaled_dot_product_attention, with optional cross-attention."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def key_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, S] bool (True = real token) -> SDPA boolean mask [B, 1, 1, S] (True = may attend)."""
    return valid[:, None, None, :]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, memory_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.cross = memory_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(memory_dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        batch, length, dim = x.shape
        head_dim = dim // self.heads
        if self.cross:
            q = self.q(x).view(batch, length, self.heads, head_dim).transpose(1, 2)
            k, v = self.kv(memory).view(batch, memory.shape[1], 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.qkv(x).view(batch, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Self-attention (optionally causal), optional cross-attention to a memory, MLP; all pre-norm."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, memory_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        if memory_dim is not None:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, heads, memory_dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask, causal=causal)
        if memory is not None:
            x = x + self.cross_attn(self.norm_cross(x), memory=memory, mask=memory_mask)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, use_checkpoint: bool, *args, **kwargs) -> torch.Tensor:
    """Run blocks in order; with use_checkpoint, recompute each block's activations in backward.

    Non-reentrant checkpointing: the only kind that is correct under DeepSpeed ZeRO-3, whose parameter
    gathering hooks fire again on recomputation.
    """
    for block in blocks:
        if use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(block, x, *args, use_reentrant=False, **kwargs)
        else:
            x = block(x, *args, **kwargs)
    return x


class Transformer(nn.Module):
    """A stack of Blocks and a final LayerNorm."""

    def __init__(
        self,
        dim: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        memory_dim: int | None = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, memory_dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        x = run_blocks(
            self.blocks, x, self.use_checkpoint, mask=mask, memory=memory, memory_mask=memory_mask, causal=causal
        )
        return self.norm(x)
