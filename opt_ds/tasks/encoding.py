"""One pass of the shared encoders for all tasks of a step.

Every task encodes its own view of the same batch (corrupted text, masked patches, swapped pairs). Run one
after another, each encoder would run once per task, on B samples each time: under ZeRO-3 that is one
parameter fetch and one set of hooks per module and task, and many small matmuls. The tasks' views are
instead concatenated along the batch, so each encoder runs once per step on (tasks x B) samples, and the fusion
once on every task's fused rows. Every module is per-sample, so each task's outputs are the same as if it had
run alone. (Once is also what ZeRO-3 needs of a module it gathers whole: its gradients are reduced when its
backward runs, and a second run would reduce them twice.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from opt_ds.model.config import CONCEPT_PAD
from opt_ds.model.encoders import Level
from opt_ds.model.fusion import MODALITY_ORDER, Fused
from opt_ds.model.opt import OPTModel, Unimodal

ENCODER_INPUTS = ("text_ids", "text_mask", "image", "audio", "audio_mask", "has_text", "has_image", "has_audio")
CONCEPT_INPUTS = ("concept_ids", "tag_ids")  # in the batch when the data has a concept vocabulary
FUSED_FIELDS = ("text", "text_valid", "image", "audio", "audio_valid")  # the Unimodal parts the fusion reads


@dataclass
class FusionInput:
    """The rows a request puts through the fusion: uni-modal encodings, which modalities each row has, and which of
    them take part."""

    rows: Unimodal
    present: dict[str, torch.Tensor]  # modality -> [R]
    keep: dict[str, torch.Tensor]  # modality -> [R]

    @classmethod
    def of(cls, own: Unimodal, request: "EncoderRequest") -> "FusionInput":
        """The request's own rows, as its batch and `keep` say."""
        present = {m: request.batch[f"has_{m}"] for m in MODALITY_ORDER}
        return cls(own, present, {m: (request.keep or {}).get(m, torch.ones_like(present[m])) for m in MODALITY_ORDER})


@dataclass
class EncoderRequest:
    """A task's input to the encoders: the batch as the task presents it, its masks, what enters the fusion."""

    batch: dict  # the ENCODER_INPUTS, e.g. with corrupted text_ids or swapped images
    patch_mask: torch.Tensor | None = None  # [B, N] True = the patch becomes the mask token
    audio_token_mask: torch.Tensor | None = None  # [B, T'] True = the audio token becomes the mask token
    keep: dict[str, torch.Tensor] | None = None  # modality -> [B]: False keeps it out of the fusion
    fuse: bool = True  # False: the uni-modal encoders only (contrastive)
    extra_text: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, mask) [E, L]: text-only rows (caption
    # rewrites), through the text encoder alone, in the same call; they come back as Unimodal.extra_text
    concepts: bool = False  # the towers see the batch's concepts and tags (a model with concept inputs); tasks
    # whose targets a concept could give away (masked words, captions to generate) leave them out
    pairs: Callable[[OPTModel, Unimodal], FusionInput] | None = None  # instead of its own rows, the fusion takes
    # these, built from the request's uni-modal encodings (matching against hard negatives re-pairs them)


def _joint_mask(masks: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Concatenate per-request masks; a request without one masks nothing."""
    given = next((m for m in masks if m is not None), None)
    if given is None:
        return None
    return torch.cat([torch.zeros_like(given) if m is None else m for m in masks])


def encode_requests(model: OPTModel, requests: list[EncoderRequest]) -> list[tuple[Unimodal, Fused | None]]:
    """-> per request, its rows of the uni-modal and (if asked) fused encodings, from one call of each encoder."""
    order = sorted(range(len(requests)), key=lambda i: not requests[i].fuse)  # fused rows first, stable
    ordered = [requests[i] for i in order]
    joint = {key: torch.cat([r.batch[key] for r in ordered]) for key in ENCODER_INPUTS}
    rows, length = joint["text_ids"].shape
    extras = [r.extra_text for r in ordered if r.extra_text is not None]
    if extras:  # appended below the batch's text rows, padded to one length
        width = max(length, *(ids.shape[1] for ids, _ in extras))
        for key, part in (("text_ids", 0), ("text_mask", 1)):
            joint[key] = torch.cat(
                [F.pad(t, (0, width - t.shape[1])) for t in [joint[key], *(e[part] for e in extras)]]
            )
    concepts = model.cfg.concept_vocab_size > 0 and any(r.concepts for r in ordered)
    for key in CONCEPT_INPUTS if concepts and CONCEPT_INPUTS[0] in ordered[0].batch else ():
        parts = [r.batch[key] if r.concepts else torch.full_like(r.batch[key], CONCEPT_PAD) for r in ordered]
        if key == "concept_ids" and joint["text_ids"].shape[0] > rows:  # the text-only rows bring no concepts
            parts.append(parts[0].new_full((joint["text_ids"].shape[0] - rows, parts[0].shape[1]), CONCEPT_PAD))
        joint[key] = torch.cat(parts)
    uni = model.unimodal(
        joint,
        patch_mask=_joint_mask([r.patch_mask for r in ordered]),
        audio_token_mask=_joint_mask([r.audio_token_mask for r in ordered]),
        concepts=concepts,
    )
    extra_text, extra_text_valid = uni.text[rows:], uni.text_valid[rows:]
    uni = replace(uni, text=uni.text[:rows, :length], text_valid=uni.text_valid[:rows, :length])
    if uni.concepts is not None:
        uni.concepts = Level(uni.concepts.tokens[:rows], uni.concepts.valid[:rows])
    sizes = [r.batch["text_ids"].shape[0] for r in ordered]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    owns = [uni.rows(slice(start, start + size)) for start, size in zip(starts, sizes)]
    inputs = [(r.pairs(model, own) if r.pairs else FusionInput.of(own, r)) for r, own in zip(ordered, owns) if r.fuse]
    fused = None
    if inputs:  # every fused row of every task in one call
        fused = model.fuse(
            Unimodal(*(torch.cat([getattr(i.rows, f) for i in inputs]) for f in FUSED_FIELDS)),
            {f"has_{m}": torch.cat([i.present[m] for i in inputs]) for m in MODALITY_ORDER},
            {m: torch.cat([i.keep[m] for i in inputs]) for m in MODALITY_ORDER},
        )
    results: list[tuple[Unimodal, Fused | None]] = [None] * len(requests)  # type: ignore[list-item]
    extra_start = fused_start = 0
    for index, request, own in zip(order, ordered, owns):
        if request.extra_text is not None:
            extra_rows = request.extra_text[0].shape[0]
            extra = slice(extra_start, extra_start + extra_rows)
            own = replace(own, extra_text=extra_text[extra], extra_text_valid=extra_text_valid[extra])
            extra_start += extra_rows
        fused_part = None
        if request.fuse:
            fused_size = inputs.pop(0).rows.text.shape[0]
            fused_part = fused.rows(slice(fused_start, fused_start + fused_size))
            fused_start += fused_size
        results[index] = (own, fused_part)
    return results
