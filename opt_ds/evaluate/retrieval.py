"""Evaluation of the contrastive embeddings on held-out shards: retrieval R@1/5/10 for every modality pair,
caption-vs-hard-negative accuracy when the shards carry caption rewrites, zero-shot classification where
samples name their class, modality-matching accuracy per class, and matching against hard negatives. What the
decoders generate is scored in opt_ds.evaluate.generation.

`call(fn)` runs fn(model) through whatever wraps the model (the DeepSpeed engine or a plain module),
so ZeRO-3 sees ordinary forwards. Every rank evaluates the same samples, which keeps the ranks'
graphs (and generation lengths) identical; only rank 0 reports.
"""

from __future__ import annotations

from typing import Callable

import torch

from opt_ds.data.batch import take_rows, to_device
from opt_ds.data.collate import collate
from opt_ds.data.decode import DecodeConfig, SampleDecoder
from opt_ds.data.features import with_log_mel
from opt_ds.data.stream import ReaderConfig, SourceConfig, make_loader
from opt_ds.evaluate.scoring import attribute_scores, chance_recall, recall_at, same_caption
from opt_ds.model.fusion import MODALITY_ORDER
from opt_ds.tasks.base import TaskContext, step_generator
from opt_ds.tasks.contrastive import PAIRS, Rewrites, beats_hard_negatives, contrastive_embeddings, contrastive_request
from opt_ds.tasks.encoding import encode_requests
from opt_ds.tasks.matching import CLASS_NAMES, swap
from opt_ds.tasks.pair_matching import HardNegativeMatching

RECALL_AT = (1, 5, 10)


def eval_batches(shards: str, decode: DecodeConfig, batch_size: int, limit: int) -> list[dict]:
    """The first `limit` samples of the held-out shards, in shard order (the same on every rank), their log-mel
    frames made once, here."""
    loader = make_loader(
        [SourceConfig("eval", shards)],
        decode,
        ReaderConfig(batch_size=batch_size, num_workers=0, shuffle_shards=False, shuffle_buffer=0, max_epochs=1),
    )
    batches, seen = [], 0
    for batch in loader:
        size = len(batch["keys"])
        batch = with_log_mel(batch, decode)
        batches.append(batch if seen + size <= limit else take_rows(batch, torch.arange(size) < limit - seen))
        seen += len(batches[-1]["keys"])
        if seen >= limit:
            break
    return batches


@torch.no_grad()
def embed(
    call: Callable, batch: dict, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], Rewrites | None]:
    """The contrastive embeddings of every modality of the batch (and of its caption rewrites, if batched)."""
    b = to_device(batch, device, dtype)
    emb, _, rewrites = call(lambda m: contrastive_embeddings(m, b, encode_requests(m, [contrastive_request(b)])[0][0]))
    return emb, rewrites


@torch.no_grad()
def embed_eval_set(
    call: Callable, batches: list[dict], device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """-> (every sample's embedding [N, C] and presence [N] per modality, the caption-above-its-hard-negatives
    accuracy per modality when the batches carry caption rewrites), in one pass over the held-out set."""
    embeddings: dict[str, list[torch.Tensor]] = {m: [] for m in MODALITY_ORDER}
    present: dict[str, list[torch.Tensor]] = {m: [] for m in embeddings}
    hard_negative_wins: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        emb, rewrites = embed(call, batch, device, dtype)
        for m in embeddings:
            embeddings[m].append(emb[m].float().cpu())
            present[m].append(batch[f"has_{m}"])
        if rewrites is not None:
            for m, (wins, rows) in beats_hard_negatives(
                emb, {m: batch[f"has_{m}"].to(device) for m in MODALITY_ORDER}, rewrites
            ).items():
                hard_negative_wins.setdefault(m, []).append(wins[rows].cpu())
    hard_negatives = {}
    for m, parts in hard_negative_wins.items():  # caption above all of its hard negatives (UNIMO rewrites)
        wins = torch.cat(parts)
        if wins.numel():
            hard_negatives[f"eval/{m}->text/hard_negative_acc"] = float(wins.float().mean())
    return (
        {m: torch.cat(v) for m, v in embeddings.items()},
        {m: torch.cat(v) for m, v in present.items()},
        hard_negatives,
    )


def retrieval(emb: dict[str, torch.Tensor], has: dict[str, torch.Tensor], captions: list[str]) -> dict[str, float]:
    """Recall@K in both directions for each modality pair, over the samples that have both; duplicate captions
    count as correct and ties with a wrong candidate as misses (opt_ds.evaluate.scoring), chance under the same rule."""
    out: dict[str, float] = {}
    for a, b in PAIRS:
        rows = has[a] & has[b]
        n = int(rows.sum())
        if n < 2:
            continue
        sim = emb[a][rows] @ emb[b][rows].t()
        correct = (
            same_caption([c for c, r in zip(captions, rows.tolist()) if r])
            if "text" in (a, b)
            else torch.eye(n, dtype=torch.bool)
        )
        for query, scores in ((f"{a}->{b}", sim), (f"{b}->{a}", sim.t())):
            for k, recall in recall_at(scores, correct, RECALL_AT).items():
                out[f"eval/{query}/R@{k}"] = recall
        out[f"eval/{a}_{b}/samples"] = float(n)
        for k, chance in chance_recall(correct, RECALL_AT).items():
            out[f"eval/{a}_{b}/chance_R@{k}"] = chance
    return out


@torch.no_grad()
def zero_shot(
    call: Callable,
    emb: dict[str, torch.Tensor],
    has: dict[str, torch.Tensor],
    labels: list[str],
    device: torch.device,
    dtype: torch.dtype,
    decode: DecodeConfig,
) -> dict[str, float]:
    """Zero-shot classification where samples name their class (KEY.json `label_name`, or a text `label`):
    each image (audio clip) takes the class whose name, through the text encoder, scores highest. Chance is
    1 / the number of classes. Synthetic class names are also scored by the colour, shape and count they name
    (`{modality}_shape`, ...): what the contrastive embedding knows of each, beside which a caption decoder's
    `captions_from_*/shape` can be read."""
    names = sorted({n for n in labels if n})
    if len(names) < 2:
        return {}
    text = SampleDecoder(decode).text
    classes = collate([{"key": str(i), "caption": n, "text_ids": text(n)} for i, n in enumerate(names)], decode)
    classes = with_log_mel(classes, decode)
    class_emb = embed(call, classes, device, dtype)[0]["text"].float().cpu()
    truth = torch.tensor([names.index(n) if n else -1 for n in labels])
    out = {"eval/zero_shot/classes": float(len(names)), "eval/zero_shot/chance": 1.0 / len(names)}
    for m in (m for m in MODALITY_ORDER if m != "text"):
        rows = has[m] & (truth >= 0)
        if rows.any():
            guesses = (emb[m][rows] @ class_emb.t()).argmax(1)
            out[f"eval/zero_shot/{m}_acc"] = float((guesses == truth[rows]).float().mean())
            named = attribute_scores([names[g] for g in guesses.tolist()], [names[t] for t in truth[rows].tolist()])
            out |= {f"eval/zero_shot/{m}_{score}": share for score, share in named.items()}
    return out


@torch.no_grad()
def matching(call: Callable, batches: list[dict], device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """5-way modality-matching accuracy per class: every held-out triplet is shown in each of the five
    constructions (not drawn), so each class is scored on the same samples. Chance is 0.2."""
    hits: dict[str, list[torch.Tensor]] = {name: [] for name in CLASS_NAMES}
    for batch in batches:
        if len(batch["keys"]) < 3:  # a sample swapped from two others needs three
            continue
        b = to_device(batch, device, dtype)
        for label, name in enumerate(CLASS_NAMES):
            swapped, rows = swap(b, torch.full_like(b["has_text"], label, dtype=torch.long))
            logits = call(lambda m: m.matching_head(m.fuse(m.unimodal(swapped), swapped).tokens[:, 0]))
            hits[name].append((logits.argmax(-1) == label)[rows].cpu())
    out = {
        f"eval/matching/{name}_acc": float(torch.cat(h).float().mean())
        for name, h in hits.items()
        if h and torch.cat(h).numel()
    }
    if out:
        out["eval/matching/acc"] = sum(out.values()) / len(out)
    return out


@torch.no_grad()
def pair_matching(call: Callable, batches: list[dict], device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Matching against the hardest negatives of each held-out batch, as the hard_matching task builds them:
    accuracy on the matched pairs, on the hard pairs, and their mean (chance 0.5)."""
    task, ctx = HardNegativeMatching(), TaskContext(step_generator(0, 0, 0))
    hits = {"matched": 0.0, "hard": 0.0}
    counts = dict.fromkeys(hits, 0.0)
    for batch in batches:
        b = to_device(batch, device, dtype)
        _, metrics = call(lambda m: task(m, b, ctx))
        for name in hits:
            hits[name] += float(metrics[f"{name}_acc"] * metrics[name])
            counts[name] += float(metrics[name])
    if not all(counts.values()):
        return {}
    out = {f"eval/pair_matching/{name}_acc": hits[name] / counts[name] for name in hits}
    return out | {"eval/pair_matching/acc": sum(out.values()) / 2}
