"""Inference with the two decoders: greedy and beam-search captions, greedy or sampled image tokens."""

from __future__ import annotations

import torch

from opt_ds.model.fusion import Fused
from opt_ds.model.opt import OPTModel


@torch.no_grad()
def generate_text(model: OPTModel, fused: Fused, bos: int, eos: int, max_len: int | None = None,
                  beams: int = 1, length_penalty: float = 1.0) -> list[list[int]]:
    """Captions as token ids (without BOS, with EOS where it was produced); beams=1 is greedy."""
    max_len = min(max_len or model.cfg.text.max_len, model.cfg.text.max_len)
    memory, memory_valid = fused.tokens, fused.valid
    batch = memory.shape[0]
    device = memory.device
    # every sequence is a beam; start with one live beam per sample (others at -inf)
    memory = memory.repeat_interleave(beams, 0)
    memory_valid = memory_valid.repeat_interleave(beams, 0)
    seqs = torch.full((batch * beams, 1), bos, dtype=torch.long, device=device)
    scores = torch.zeros(batch, beams, device=device)
    scores[:, 1:] = float("-inf")
    finished = torch.zeros(batch * beams, dtype=torch.bool, device=device)
    for _ in range(max_len - 1):
        logits = model.text_decoder(seqs, memory, memory_valid)[:, -1].float()
        logp = torch.log_softmax(logits, -1)
        vocab = logp.shape[-1]
        # finished beams only extend with EOS at no cost
        logp[finished] = float("-inf")
        logp[finished, eos] = 0.0
        total = (scores.view(-1, 1) + logp).view(batch, beams * vocab)
        best, index = total.topk(beams, dim=1)
        beam_index = index // vocab + torch.arange(batch, device=device)[:, None] * beams
        token = (index % vocab).view(-1, 1)
        seqs = torch.cat([seqs[beam_index.view(-1)], token], dim=1)
        finished = finished[beam_index.view(-1)] | (token.view(-1) == eos)
        scores = best
        if finished.all():
            break
    is_eos = seqs[:, 1:] == eos
    lengths = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, seqs.shape[1] - 1)
    normalised = scores.view(-1) / lengths.float() ** length_penalty
    pick = normalised.view(batch, beams).argmax(1) + torch.arange(batch, device=device) * beams
    results = []
    for row in seqs[pick, 1:].tolist():
        results.append(row[: row.index(eos) + 1] if eos in row else row)
    return results


@torch.no_grad()
def generate_image_tokens(model: OPTModel, fused: Fused, temperature: float = 0.0, top_k: int | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """A full grid of VQ codes [B, grid*grid]; temperature 0 is greedy, else (top-k) sampling."""
    length = model.cfg.vision.grid ** 2
    batch = fused.tokens.shape[0]
    seqs = torch.full((batch, 1), model.image_bos, dtype=torch.long, device=fused.tokens.device)
    for _ in range(length):
        logits = model.image_decoder(seqs, fused.tokens, fused.valid)[:, -1, : model.cfg.vq.codebook_size].float()
        if temperature <= 0:
            token = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        seqs = torch.cat([seqs, token], dim=1)
    return seqs[:, 1:]
