"""Inference with the two decoders: greedy and beam-search captions, greedy or sampled (top-k, top-p) image tokens,
with classifier-free guidance."""

from __future__ import annotations

import torch

from opt_ds.model.fusion import Fused
from opt_ds.model.opt import OPTModel


def repeated_ngram_tokens(seqs: torch.Tensor, n: int) -> torch.Tensor:
    """[S, V]-indexable mask as (rows, tokens): the tokens that would complete an n-gram already in the row."""
    rows, tokens = [], []
    if n > 0 and seqs.shape[1] >= n:
        for r, seq in enumerate(seqs.tolist()):
            prefix = tuple(seq[len(seq) - n + 1 :])
            for i in range(len(seq) - n + 1):
                if tuple(seq[i : i + n - 1]) == prefix:
                    rows.append(r)
                    tokens.append(seq[i + n - 1])
    return torch.tensor(rows, dtype=torch.long), torch.tensor(tokens, dtype=torch.long)


@torch.no_grad()
def generate_text(
    model: OPTModel,
    fused: Fused,
    bos: int,
    eos: int,
    max_len: int | None = None,
    beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram: int = 0,
) -> list[list[int]]:
    """Captions as token ids (without BOS, with EOS where it was produced); beams=1 is greedy.

    Beams are ranked by log-probability / length**length_penalty; no_repeat_ngram=n forbids any n-gram twice
    in a caption (a weak decoder otherwise repeats its most frequent word: "a picture of of of").
    """
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
        rows, tokens = repeated_ngram_tokens(seqs[:, 1:], no_repeat_ngram)
        logp[rows.to(device), tokens.to(device)] = float("-inf")
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


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top_k most likely tokens (0: all) and the smallest set whose probability reaches top_p."""
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # probability of the tokens ranked above
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate_image_tokens(
    model: OPTModel,
    fused: Fused,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    guidance: float = 1.0,
    unconditional: Fused | None = None,
) -> torch.Tensor:
    """A full grid of VQ codes [B, grid*grid]; temperature 0 is greedy, else sampling (with top-k / top-p).

    Classifier-free guidance: with `unconditional` (the same samples fused with no partner modality), the
    logits are unconditional + guidance * (conditional - unconditional), so codes the caption makes likelier
    (a small red shape) win over the codes that are likely anyway (the background). guidance 1 is plain
    conditional decoding.
    """
    if guidance != 1.0 and unconditional is None:
        raise ValueError("image guidance needs the unconditional fusion of the same samples")
    length = model.cfg.vision.grid**2
    batch = fused.tokens.shape[0]
    memory, memory_valid = fused.tokens, fused.valid
    if unconditional is not None:  # both halves in one decoder call per position
        memory, memory_valid = torch.cat([memory, unconditional.tokens]), torch.cat([memory_valid, unconditional.valid])
    seqs = torch.full((batch, 1), model.image_bos, dtype=torch.long, device=fused.tokens.device)
    for _ in range(length):
        inputs = seqs if unconditional is None else seqs.repeat(2, 1)
        logits = model.image_decoder(inputs, memory, memory_valid)[:, -1, : model.cfg.vq.codebook_size].float()
        if unconditional is not None:
            conditional, free = logits.split(batch)
            logits = free + guidance * (conditional - free)
        if temperature <= 0:
            token = logits.argmax(-1, keepdim=True)
        else:
            logits = filter_logits(logits / temperature, top_k, top_p)
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        seqs = torch.cat([seqs, token], dim=1)
    return seqs[:, 1:]
