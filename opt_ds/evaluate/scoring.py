"""Evaluation scores with stated rules: retrieval recall with ties and duplicate captions, its chance level,
and caption scores (BLEU-4 and CIDEr from pycocoevalcap, word error rate from jiwer).

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
