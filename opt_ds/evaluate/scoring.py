"""Evaluation scores with stated rules: retrieval recall with ties and duplicate captions, its chance level,
caption scores (BLEU-4 and CIDEr from pycocoevalcap, word error rate from jiwer), and on synthetic data the share of
captions or class names naming the right colour, shape and count.

Retrieval rule: a candidate is correct for a query when it is the query's own partner or shares its caption
word for word (two identical captions describe both images equally well, and their embeddings are identical,
so no model can tell them apart). A query's rank is the number of wrong candidates scoring at least as high
as its best correct one: a tie with a wrong candidate is a miss. Chance is the expected recall of a random
ranking under the same rule.
"""

from __future__ import annotations

import re

import jiwer
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from opt_ds.data.synthetic import named_attributes

# Scored on synthetic data: the share of captions (or zero-shot class names) naming each attribute right, and colour
# and shape both right. Each alone shows which attribute a model does not read: a shape named at chance (1 in 4)
# holds colour_and_shape near a quarter of the colour share.
NAMED_ATTRIBUTES = {
    "colour": ("colour",),
    "shape": ("shape",),
    "count": ("count",),
    "colour_and_shape": ("colour", "shape"),
}

WORD = re.compile(r"[a-z0-9']+")


def normalise_caption(text: str) -> str:
    """Lower-case words without punctuation: the form captions are compared and scored in."""
    return " ".join(WORD.findall(text.lower()))


def same_caption(captions: list[str]) -> torch.Tensor:
    """[N, N] True where two samples' captions are the same words (the diagonal always)."""
    ids = {}
    group = torch.tensor([ids.setdefault(normalise_caption(c), len(ids)) for c in captions])
    return group[:, None] == group[None, :]


def recall_at(scores: torch.Tensor, correct: torch.Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """scores [Q, N] of each query against every candidate; correct [Q, N] (at least one per row)."""
    best_correct = scores.masked_fill(~correct, float("-inf")).amax(1, keepdim=True)
    rank = ((scores >= best_correct) & ~correct).sum(1)
    return {k: float((rank < k).float().mean()) for k in ks}


def chance_recall(correct: torch.Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """Expected recall@k of a uniformly random ranking: 1 - C(n-g, k) / C(n, k) for g correct among n."""
    n = correct.shape[1]
    g = correct.sum(1).double()
    out = {}
    for k in ks:
        miss = torch.ones_like(g)
        for i in range(min(k, n)):
            miss = miss * ((n - g - i) / (n - i)).clamp(min=0)
        out[k] = float((1 - miss).mean())
    return out


def caption_scores(generated: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr(-D) of generated captions against their references (normalised words)."""
    gts = {i: [normalise_caption(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [normalise_caption(g) or "<empty>"] for i, g in enumerate(generated)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"BLEU-4": float(bleu[3]), "CIDEr": float(cider)}


def word_error_rate(generated: list[str], references: list[str]) -> float:
    """Corpus WER (substitutions + deletions + insertions over reference words), normalised words."""
    return float(jiwer.wer([normalise_caption(r) for r in references], [normalise_caption(g) for g in generated]))


def attribute_share(generated: list[str], references: list[str], attributes: tuple[str, ...]) -> float | None:
    """Share of the samples whose reference names `attributes` where the generated caption names the same ones
    (None when no reference names them: not synthetic data)."""
    hits = []
    for text, reference in zip(generated, references):
        wanted = named_attributes(reference)
        if all(a in wanted for a in attributes):
            got = named_attributes(text)
            hits.append(all(got.get(a) == wanted[a] for a in attributes))
    return sum(hits) / len(hits) if hits else None


def attribute_scores(predicted: list[str], references: list[str]) -> dict[str, float]:
    """NAMED_ATTRIBUTES' shares (the ones some reference names: none on data that is not synthetic)."""
    shares = {score: attribute_share(predicted, references, named) for score, named in NAMED_ATTRIBUTES.items()}
    return {score: share for score, share in shares.items() if share is not None}
