"""VQ-VAE image tokenizer: conv encoder -> EMA codebook -> conv decoder.

Trained as its own stage, then frozen: `encode` gives the MVM / image-generation targets (a grid of
codes per image) and `decode` renders generated codes back to pixels. Under torch.distributed the
codebook statistics are all-reduced so every rank keeps the same codebook.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from opt_ds.model.config import VQConfig

DEAD_USAGE = 0.03
RESTART_USAGE = 0.1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, 1, 1), nn.ReLU(), nn.Conv2d(channels, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class EMAQuantizer(nn.Module):
    """Nearest-code quantisation; codes move by exponential moving averages, not by gradients."""

    def __init__(self, size: int, dim: int, decay: float, eps: float = 1e-5):
        super().__init__()
        self.decay, self.eps = decay, eps
        embed = torch.randn(size, dim) / math.sqrt(dim)
        self.register_buffer("embed", embed)
        # zero statistics: the first update sets used codes to batch means and restarts the rest on data
        self.register_buffer("cluster_size", torch.zeros(size))
        self.register_buffer("embed_sum", torch.zeros(size, dim))

    def keep_fp32(self) -> None:
        """Engines that cast modules to bf16 cast buffers too (through .data); EMA statistics need fp32."""
        for name, buf in self._buffers.items():
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, D] -> nearest code index [N]."""
        self.keep_fp32()
        distances = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.embed.t() + self.embed.pow(2).sum(1)[None]
        return distances.argmin(1)

    @torch.no_grad()
    def update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        onehot = F.one_hot(codes, self.embed.shape[0]).type(z.dtype)
        counts = _all_reduce(onehot.sum(0))
        sums = _all_reduce(onehot.t() @ z)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.embed.shape[0] * self.eps) * n
        self.embed.copy_(self.embed_sum / smoothed[:, None])
        # restart codes that fell out of use (EMA count below DEAD_USAGE per step) at encoder outputs of
        # this batch, the same on every rank; a restarted code that stays unused is restarted again soon
        dead = self.cluster_size < DEAD_USAGE
        if dead.any():
            picks = z[torch.randint(0, z.shape[0], (int(dead.sum()),), device=z.device)]
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(picks, src=0)
            self.embed[dead] = picks
            self.embed_sum[dead] = picks * RESTART_USAGE
            self.cluster_size[dead] = RESTART_USAGE

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = z.float().reshape(-1, z.shape[-1])
        codes = self.codes(flat)
        if self.training:
            self.update(flat, codes)
        quantized = F.embedding(codes, self.embed).view_as(z).to(z.dtype)
        return quantized, codes.view(z.shape[:-1])


class VQVAE(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        downs = int(math.log2(cfg.downsample))
        enc: list[nn.Module] = [nn.Conv2d(3, c, 4, 2, 1)]
        for _ in range(downs - 1):
            enc += [nn.ReLU(), nn.Conv2d(c, c, 4, 2, 1)]
        enc += [ResBlock(c), ResBlock(c), nn.ReLU(), nn.Conv2d(c, cfg.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = EMAQuantizer(cfg.codebook_size, cfg.code_dim, cfg.decay)
        dec: list[nn.Module] = [nn.Conv2d(cfg.code_dim, c, 3, 1, 1), ResBlock(c), ResBlock(c)]
        for _ in range(downs - 1):
            dec += [nn.ReLU(), nn.ConvTranspose2d(c, c, 4, 2, 1)]
        dec += [nn.ReLU(), nn.ConvTranspose2d(c, 3, 4, 2, 1)]
        self.decoder = nn.Sequential(*dec)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (loss, metrics): reconstruction MSE + commitment; codebook perplexity and usage."""
        z = self.encoder(images).permute(0, 2, 3, 1)
        quantized, codes = self.quantizer(z)
        commitment = F.mse_loss(z, quantized.detach())
        straight_through = z + (quantized - z).detach()
        recon = self.decoder(straight_through.permute(0, 3, 1, 2))
        recon_loss = F.mse_loss(recon, images)
        usage = torch.bincount(codes.flatten(), minlength=self.cfg.codebook_size).float()
        probs = usage / usage.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        loss = recon_loss + self.cfg.commitment * commitment
        return loss, {
            "recon_loss": recon_loss.detach(),
            "commitment": commitment.detach(),
            "perplexity": perplexity,
            "codes_used": (usage > 0).float().sum(),
        }

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] -> codes [B, grid*grid] (row-major)."""
        z = self.encoder(images).permute(0, 2, 3, 1)
        return self.quantizer.codes(z.float().reshape(-1, z.shape[-1])).view(images.shape[0], -1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, grid*grid] -> images [B,3,H,W] (normalised like the inputs)."""
        g = self.cfg.grid
        self.quantizer.keep_fp32()
        z = F.embedding(codes.view(-1, g, g), self.quantizer.embed).permute(0, 3, 1, 2)
        return self.decoder(z.to(self.decoder[0].weight.dtype))
