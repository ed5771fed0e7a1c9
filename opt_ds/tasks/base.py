"""What every task shares: the two-phase task protocol, the per-step context, masking helpers, and
graph-stable losses.

Graph stability: under ZeRO-3 every rank must run the same modules in the same order, so a task
never branches on the data. A rank whose batch holds nothing for a task still runs the same modules
and gets a zero loss that is connected to the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from opt_ds.model.fusion import Fused
from opt_ds.model.opt import OPTModel, Unimodal
from opt_ds.model.vqvae import VQVAE
from opt_ds.tasks.encoding import EncoderRequest, encode_requests


@dataclass(frozen=True)
class TextSpecials:
    """Ids of the BERT uncased WordPiece vocabulary (the offline default tokenizer)."""

    pad: int = 0
    cls: int = 101
    sep: int = 102
    mask: int = 103
    first_word: int = 999  # ids below are [PAD], [unusedN], [UNK], [CLS], [SEP], [MASK]
    vocab_size: int = 30522

    @classmethod
    def from_tokenizer(cls, tok) -> "TextSpecials":
        return cls(
            tok.pad_token_id,
            tok.cls_token_id,
            tok.sep_token_id,
            tok.mask_token_id,
            min(999, tok.vocab_size - 1),
            tok.vocab_size,
        )


@dataclass
class TaskContext:
    """Per-step inputs beyond the batch: random masks come from `generator`, seeded by (seed, step, rank)."""

    generator: torch.Generator
    image_tokenizer: VQVAE | None = None
    isolate: bool = False  # MVP stage 1: token-level tasks see only their own modality
    specials: TextSpecials = TextSpecials()
    encoders_frozen: bool = False  # a stage that trains no encoder: they run without gradients

    _image_codes: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def rand(self, *shape: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator).to(device)

    def image_codes(self, images: torch.Tensor) -> torch.Tensor:
        """VQ codes [B, N] of `images`, computed once per step however many tasks ask."""
        if self.image_tokenizer is None:
            raise RuntimeError("this task needs the VQ image tokenizer (model.image_tokenizer in the config)")
        if self._image_codes is None or self._image_codes[0] is not images:
            dtype = next(self.image_tokenizer.parameters()).dtype
            self._image_codes = (images, self.image_tokenizer.encode(images.to(dtype)))
        return self._image_codes[1]


class Task:
    """A pre-training task in two phases, so the runner can encode every task of a step in one pass:
    `prepare` draws the task's masks and says what to encode (all its randomness happens here), `score`
    turns its rows of the encodings into a loss. `task(model, batch, ctx)` runs both for this task alone.
    """

    name: str
    components: tuple[str, ...]  # model components the task runs (for the FLOP count)
    extra_text_key: str | None = None  # batch key [B, K, L] of text-only rows it encodes too (for the FLOP count)
    settings_type: type  # its section of the `tasks:` config (opt_ds.tasks.settings)

    def __init__(self, settings=None):
        self.settings = settings if settings is not None else self.settings_type()

    @property
    def fused_rows_per_sample(self) -> int:
        """Rows the task puts through the fusion per sample (for the FLOP count)."""
        return int("fusion" in self.components)

    def prepare(self, model: OPTModel, batch: dict, ctx: TaskContext) -> tuple[EncoderRequest, dict]:
        """-> (what to encode, the state `score` needs)."""
        raise NotImplementedError

    def score(
        self, model: OPTModel, batch: dict, state: dict, uni: Unimodal, fused: Fused | None
    ) -> tuple[torch.Tensor, dict]:
        """-> (loss, metrics) from this task's rows of the encodings."""
        raise NotImplementedError

    def __call__(self, model: OPTModel, batch: dict, ctx: TaskContext) -> tuple[torch.Tensor, dict]:
        request, state = self.prepare(model, batch, ctx)
        ((uni, fused),) = encode_requests(model, [request])
        return self.score(model, batch, state, uni, fused)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_000_007 + step * 65_537 + rank)


def choose_mask(candidates: torch.Tensor, ctx: TaskContext, ratio: float, whole_prob: float) -> torch.Tensor:
    """Mask round(ratio * candidates) positions per row, at least one; with whole_prob, every candidate."""
    batch, length = candidates.shape
    n_cand = candidates.sum(1)
    n_mask = (n_cand.float() * ratio).round().long().clamp(min=1)
    whole = ctx.rand(batch, device=candidates.device) < whole_prob
    n_mask = torch.where(whole, n_cand, torch.minimum(n_mask, n_cand))
    scores = ctx.rand(batch, length, device=candidates.device).masked_fill(~candidates, 2.0)
    ranks = scores.argsort(1).argsort(1)
    return (ranks < n_mask[:, None]) & candidates


def bert_corrupt(ids: torch.Tensor, mask: torch.Tensor, ctx: TaskContext) -> torch.Tensor:
    """80% of masked positions -> [MASK], 10% -> a random word, 10% unchanged."""
    sp = ctx.specials
    r = ctx.rand(*ids.shape, device=ids.device)
    random_words = (ctx.rand(*ids.shape, device=ids.device) * (sp.vocab_size - sp.first_word)).long() + sp.first_word
    out = torch.where(mask & (r < 0.8), torch.full_like(ids, sp.mask), ids)
    return torch.where(mask & (r >= 0.8) & (r < 0.9), random_words, out)


def text_candidates(batch: dict, ctx: TaskContext) -> torch.Tensor:
    """Real word positions of samples with text: not padding, [CLS] or [SEP]."""
    ids = batch["text_ids"]
    sp = ctx.specials
    return batch["text_mask"] & batch["has_text"][:, None] & (ids != sp.cls) & (ids != sp.sep) & (ids != sp.pad)


def weighted_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE over positions with weight > 0 (zero, still in the graph, if none) and accuracy there."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    targets, weight = targets.reshape(-1), weight.reshape(-1).float()
    ce = F.cross_entropy(logits, targets, reduction="none")
    count = weight.sum()
    loss = (ce * weight).sum() / count.clamp(min=1)
    correct = ((logits.argmax(-1) == targets).float() * weight).sum() / count.clamp(min=1)
    return loss, correct.detach()


def zero_if_empty(loss: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """NaN-free loss for an empty selection, still connected to the graph through `anchor`."""
    return loss if anchor.numel() else anchor.float().sum() * 0.0
