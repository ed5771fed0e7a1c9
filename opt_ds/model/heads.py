"""Task heads: each owns its parameters and touches them only inside its own forward (ZeRO-3 safe)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MATCH_CLASSES = 5
MAX_LOGIT_SCALE = math.log(100.0)


class MLMHead(nn.Module):
    """BERT-style transform, then vocabulary logits through the text encoder's (tied) word embeddings."""

    def __init__(self, dim: int, text_dim: int, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(dim, text_dim)
        self.norm = nn.LayerNorm(text_dim)
        self.decoder = nn.Linear(text_dim, word_embeddings.num_embeddings)
        self.decoder.weight = word_embeddings.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))


class LinearHead(nn.Module):
    """LayerNorm + Linear: VQ code logits (MVM), frame regression (MAM)."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class MatchingHead(nn.Module):
    """Matching classes from the fusion CLS: OPT's 5-way modality matching, or matched / not matched."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.pool = nn.Linear(dim, dim)
        self.classify = nn.Linear(dim, classes)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.classify(torch.tanh(self.pool(cls)))


class ContrastiveHead(nn.Module):
    """Projects each input (each encoder's pooled output; concepts and patches) into one normalised space; owns the
    learnable temperature."""

    def __init__(self, dims: dict[str, int], out_dim: int, init_temperature: float = 0.07):
        super().__init__()
        self.proj = nn.ModuleDict({m: nn.Linear(d, out_dim) for m, d in dims.items()})
        self.logit_scale = nn.Parameter(
            torch.full((1,), math.log(1 / init_temperature))
        )  # 1-d: zero.Init cannot broadcast 0-d

    def forward(self, pooled: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        emb = {m: F.normalize(self.proj[m](x).float(), dim=-1) for m, x in pooled.items()}
        return emb, self.logit_scale.clamp(0, MAX_LOGIT_SCALE).exp().squeeze(0)
