"""Pad a list of decoded samples into one batch with presence flags, so any modality mix shares a shape."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from opt_ds.data.decode import DecodeConfig
from opt_ds.data.features import float_wave, frame_count, samples_for_frames
from opt_ds.model.config import CONCEPT_PAD

MIN_AUDIO_FRAMES = 16  # the audio encoder's conv stem needs a few frames even when the batch has no audio
MIN_TEXT_TOKENS = 2
NO_TEXT = torch.zeros(0, dtype=torch.long)


def pad_with_mask(seqs: list[torch.Tensor], min_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad [T_i, ...] sequences to [N, T, ...] with T >= min_length; -> (padded, mask [N, T] True on real
    steps)."""
    padded = pad_sequence([*seqs, seqs[0].new_zeros(min_length, *seqs[0].shape[1:])], batch_first=True)[:-1]
    lengths = torch.tensor([seq.shape[0] for seq in seqs])
    return padded, torch.arange(padded.shape[1])[None, :] < lengths[:, None]


def rewrite_slots(samples: list[dict], cfg: DecodeConfig) -> dict:
    """The captions' rewrites as K fixed slots per sample (paraphrases first, then hard negatives).

    K comes from the config, not the data, so every batch on every rank has the same shape. Keys (none when
    K = 0): rewrite_ids [B,K,L], rewrite_mask [B,K,L], has_rewrite [B,K], rewrite_positive [B,K] (True:
    a paraphrase).
    """
    limits = cfg.rewrite_limits
    slots = sum(limits.values())
    if not slots:
        return {}
    seqs, present = [], []
    for s in samples:
        for field, limit in limits.items():
            given = s.get(f"{field}_ids", [])[:limit]
            seqs += given + [NO_TEXT] * (limit - len(given))
            present += [True] * len(given) + [False] * (limit - len(given))
    ids, mask = pad_with_mask(seqs, MIN_TEXT_TOKENS)
    batch_size = len(samples)
    positive = torch.tensor([i < limits["paraphrases"] for i in range(slots)])
    return {
        "rewrite_ids": ids.view(batch_size, slots, -1),
        "rewrite_mask": mask.view(batch_size, slots, -1),
        "has_rewrite": torch.tensor(present).view(batch_size, slots),
        "rewrite_positive": positive.expand(batch_size, slots).clone(),
    }


def concept_slots(samples: list[dict], cfg: DecodeConfig) -> dict:
    """MVP's concepts as fixed slots (none without a vocabulary): concept_ids [B, concepts_per_sample] and tag_ids
    [B, tags_per_sample], 0 (CONCEPT_PAD) where a sample has fewer. Widths from the config: one shape on every
    rank."""
    if not cfg.concepts:
        return {}
    out = {}
    for key, width in (("concept_ids", cfg.concepts_per_sample), ("tag_ids", cfg.tags_per_sample)):
        out[key] = torch.full((len(samples), width), CONCEPT_PAD, dtype=torch.long)
        for i, s in enumerate(samples):
            ids = s.get(key, NO_TEXT)[:width]
            out[key][i, : len(ids)] = ids
    return out


def waveform_slots(samples: list[dict], cfg: DecodeConfig) -> dict:
    """The samples' waveforms zero-padded: waveform [B, N] (opt_ds.data.batch.to_device makes it `audio`
    [B, T, n_mels]) and audio_mask [B, T], the log-mel frames each makes. The waveforms stay int16 (16-bit PCM as
    stored) when every clip is, else float32."""
    waves = [s.get("audio") for s in samples]
    given = [w for w in waves if w is not None]
    dtype = torch.int16 if all(w.dtype == torch.int16 for w in given) else torch.float32
    as_batch = (lambda w: w) if dtype == torch.int16 else float_wave
    waves = [torch.zeros(0, dtype=dtype) if w is None else as_batch(w) for w in waves]
    waveform, _ = pad_with_mask(waves, samples_for_frames(MIN_AUDIO_FRAMES, cfg.sample_rate))
    frames = frame_count(torch.tensor([waveform.shape[1]] + [w.shape[0] for w in waves]), cfg.sample_rate)
    return {"waveform": waveform, "audio_mask": torch.arange(frames[0])[None] < frames[1:, None]}


def collate(samples: list[dict], cfg: DecodeConfig) -> dict:
    """Every modality tensor is always present (zeros where absent): ranks must run the same graph.

    Keys: keys, captions, labels (class names, '' where none), image [B,3,S,S] uint8, has_image [B], has_audio [B],
    text_ids [B,L], text_mask [B,L], has_text [B], and rewrite_slots', concept_slots' and waveform_slots' keys.
    Masks are True on real tokens.
    """
    batch_size = len(samples)
    size = cfg.image_size
    has_image = torch.tensor(["image" in s for s in samples])
    image = torch.zeros(batch_size, 3, size, size, dtype=torch.uint8)
    for i, s in enumerate(samples):
        if "image" in s:
            image[i] = s["image"]

    has_audio = torch.tensor(["audio" in s for s in samples])
    has_text = torch.tensor(["text_ids" in s for s in samples])
    text_ids, text_mask = pad_with_mask([s.get("text_ids", NO_TEXT) for s in samples], MIN_TEXT_TOKENS)

    return (
        rewrite_slots(samples, cfg)
        | concept_slots(samples, cfg)
        | waveform_slots(samples, cfg)
        | {
            "keys": [s["key"] for s in samples],
            "captions": [s.get("caption", "") for s in samples],
            "labels": [s.get("label", "") for s in samples],
            "image": image,
            "has_image": has_image,
            "has_audio": has_audio,
            "text_ids": text_ids,
            "text_mask": text_mask,
            "has_text": has_text,
        }
    )
