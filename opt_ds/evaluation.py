"""Evaluation on held-out shards: retrieval R@1/5/10 for every modality pair, caption-vs-hard-negative
accuracy when the shards carry caption rewrites, and sample generations.

`call(fn)` runs fn(model) through whatever wraps the model (the DeepSpeed engine or a plain module),
so ZeRO-3 sees ordinary forwards. Every rank evaluates the same samples, which keeps the ranks'
graphs (and generation lengths) identical; only rank 0 reports.
"""

from __future__ import annotations

from typing import Callable

import torch

from opt_ds.data.decode import IMAGE_MEAN, IMAGE_STD, DecodeConfig
from opt_ds.data.stream import ReaderConfig, SourceConfig, make_loader
from opt_ds.batch import to_device
from opt_ds.model.fusion import MODALITY_ORDER
from opt_ds.model.generate import generate_image_tokens, generate_text
from opt_ds.model.vqvae import VQVAE
from opt_ds.scoring import chance_recall, recall_at, same_caption
from opt_ds.tasks.base import TextSpecials
from opt_ds.tasks.contrastive import PAIRS, beats_hard_negatives, contrastive_embeddings, contrastive_request
from opt_ds.tasks.encoding import encode_requests

RECALL_AT = (1, 5, 10)


def eval_batches(shards: str, decode: DecodeConfig, batch_size: int, limit: int) -> list[dict]:
    """The first `limit` samples of the held-out shards, in shard order (the same on every rank)."""
    loader = make_loader([SourceConfig("eval", shards)], decode,
                         ReaderConfig(batch_size=batch_size, num_workers=0, shuffle_shards=False, shuffle_buffer=0, max_epochs=1))
    batches, seen = [], 0
    for batch in loader:
        batches.append(batch)
        seen += len(batch["keys"])
        if seen >= limit:
            break
    return batches


@torch.no_grad()
def retrieval(call: Callable, batches: list[dict], device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Recall@K in both directions for each modality pair, over the samples that have both; duplicate captions
    count as correct and ties with a wrong candidate as misses (opt_ds.scoring), chance under the same rule."""
    embeddings: dict[str, list[torch.Tensor]] = {m: [] for m in MODALITY_ORDER}
    present: dict[str, list[torch.Tensor]] = {m: [] for m in embeddings}
    hard_negative_wins: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        b = to_device(batch, device, dtype)
        emb, _, rewrites = call(lambda m: contrastive_embeddings(m, b, encode_requests(m, [contrastive_request(b)])[0][0]))
        for m in embeddings:
            embeddings[m].append(emb[m].float().cpu())
            present[m].append(batch[f"has_{m}"])
        if rewrites is not None:
            for m, (wins, rows) in beats_hard_negatives(emb, {m: b[f"has_{m}"] for m in MODALITY_ORDER}, rewrites).items():
                hard_negative_wins.setdefault(m, []).append(wins[rows].cpu())
    emb = {m: torch.cat(v) for m, v in embeddings.items()}
    has = {m: torch.cat(v) for m, v in present.items()}
    out: dict[str, float] = {}
    for m, parts in hard_negative_wins.items():  # caption above all of its hard negatives (UNIMO rewrites)
        wins = torch.cat(parts)
        if wins.numel():
            out[f"eval/{m}->text/hard_negative_acc"] = float(wins.float().mean())
    captions = [c for batch in batches for c in batch["captions"]]
    for a, b in PAIRS:
        rows = has[a] & has[b]
        n = int(rows.sum())
        if n < 2:
            continue
        sim = emb[a][rows] @ emb[b][rows].t()
        correct = (same_caption([c for c, r in zip(captions, rows.tolist()) if r]) if "text" in (a, b)
                   else torch.eye(n, dtype=torch.bool))
        for query, scores in ((f"{a}->{b}", sim), (f"{b}->{a}", sim.t())):
            for k, recall in recall_at(scores, correct, RECALL_AT).items():
                out[f"eval/{query}/R@{k}"] = recall
        out[f"eval/{a}_{b}/samples"] = float(n)
        for k, chance in chance_recall(correct, RECALL_AT).items():
            out[f"eval/{a}_{b}/chance_R@{k}"] = chance
    return out


def denormalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGE_MEAN, device=images.device)[:, None, None]
    std = torch.tensor(IMAGE_STD, device=images.device)[:, None, None]
    return (images.float() * std + mean).clamp(0, 1)


@torch.no_grad()
def generations(call: Callable, batch: dict, device: torch.device, dtype: torch.dtype, tokenizer,
                image_tokenizer: VQVAE | None, count: int, beams: int = 1) -> tuple[list[str], torch.Tensor | None]:
    """Captions from image+audio (text hidden) and images from text+audio (image hidden) for `count` samples."""
    specials = TextSpecials.from_tokenizer(tokenizer)
    small = {k: v[:count] for k, v in batch.items()}
    b = to_device(small, device, dtype)

    def captions(m):
        fused = m.fuse(m.unimodal(b), b, keep={"text": torch.zeros_like(b["has_text"])})
        return generate_text(m, fused, specials.cls, specials.sep, beams=beams)

    lines = []
    for ids, reference, key in zip(call(captions), small["captions"], small["keys"]):
        generated = tokenizer.decode([t for t in ids if t != specials.sep], skip_special_tokens=True)
        lines.append(f"{key}: generated '{generated}' | reference '{reference}'")
    if image_tokenizer is None:
        return lines, None

    def images(m):
        fused = m.fuse(m.unimodal(b), b, keep={"image": torch.zeros_like(b["has_image"])})
        return generate_image_tokens(m, fused)

    codes = call(images)
    pictures = denormalise(image_tokenizer.decode(codes.to(next(image_tokenizer.parameters()).device)))
    originals = denormalise(small["image"].to(pictures.device))
    return lines, torch.cat([originals, pictures])  # first row: originals, second: generated
