"""One pass of the shared encoders for all tasks of a step.

Every task encodes its own view of the same batch (corrupted text, masked patches, swapped pairs). Run one
after another, each encoder would run once per task, on B samples each time: under ZeRO-3 that is one
parameter fetch and one set of hooks per module and task, and many small matmuls. The tasks' views are
instead concatenated along the batch, so each encoder runs once per step on (tasks x B) samples. Every
module is per-sample, so each task's outputs are the same as if it had run alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from opt_ds.model.fusion import MODALITY_ORDER, Fused
from opt_ds.model.opt import OPTModel, Unimodal

ENCODER_INPUTS = ("text_ids", "text_mask", "image", "audio", "audio_mask", "has_text", "has_image", "has_audio")


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
    uni = model.unimodal(
        joint,
        patch_mask=_joint_mask([r.patch_mask for r in ordered]),
        audio_token_mask=_joint_mask([r.audio_token_mask for r in ordered]),
    )
    extra_text, extra_text_valid = uni.text[rows:], uni.text_valid[rows:]
    uni = replace(uni, text=uni.text[:rows, :length], text_valid=uni.text_valid[:rows, :length])
    sizes = [r.batch["text_ids"].shape[0] for r in ordered]
    fused_rows = sum(size for r, size in zip(ordered, sizes) if r.fuse)
    fused = None
    if fused_rows:
        keep = {
            m: torch.cat([(r.keep or {}).get(m, torch.ones_like(r.batch[f"has_{m}"])) for r in ordered if r.fuse])
            for m in MODALITY_ORDER
        }
        fused_batch = {f"has_{m}": joint[f"has_{m}"][:fused_rows] for m in MODALITY_ORDER}
        fused = model.fuse(uni.rows(slice(0, fused_rows)), fused_batch, keep)
    results: list[tuple[Unimodal, Fused | None]] = [None] * len(requests)  # type: ignore[list-item]
    start = extra_start = 0
    for index, request, size in zip(order, ordered, sizes):
        own = uni.rows(slice(start, start + size))
        if request.extra_text is not None:
            extra_rows = request.extra_text[0].shape[0]
            extra = slice(extra_start, extra_start + extra_rows)
            own = replace(own, extra_text=extra_text[extra], extra_text_valid=extra_text_valid[extra])
            extra_start += extra_rows
        results[index] = (own, fused.rows(slice(start, start + size)) if request.fuse else None)
        start += size
    return results
