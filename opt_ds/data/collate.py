"""Pad a list of decoded samples into one batch with presence flags, so any modality mix shares a shape."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from opt_ds.data.decode import DecodeConfig

MIN_AUDIO_FRAMES = 16  # the audio encoder's conv stem needs a few frames even when the batch has no audio


def collate(samples: list[dict], cfg: DecodeConfig) -> dict:
    """Every modality tensor is always present (zeros where absent): ranks must run the same graph.

    Keys: keys, captions, image [B,3,S,S], has_image [B], audio [B,T,M], audio_mask [B,T],
    has_audio [B], text_ids [B,L], text_mask [B,L], has_text [B]. Masks are True on real tokens.
    """
    batch_size = len(samples)
    size = cfg.image_size
    has_image = torch.tensor(["image" in s for s in samples])
    image = torch.zeros(batch_size, 3, size, size)
    for i, s in enumerate(samples):
        if "image" in s:
            image[i] = s["image"]

    has_audio = torch.tensor(["audio" in s for s in samples])
    audio_seqs = [s.get("audio", torch.zeros(0, cfg.n_mels)) for s in samples]
    audio_seqs.append(torch.zeros(MIN_AUDIO_FRAMES, cfg.n_mels))
    audio = pad_sequence(audio_seqs, batch_first=True)[:-1]
    lengths = torch.tensor([a.shape[0] for a in audio_seqs[:-1]])
    audio_mask = torch.arange(audio.shape[1])[None, :] < lengths[:, None]

    has_text = torch.tensor(["text_ids" in s for s in samples])
    text_seqs = [s.get("text_ids", torch.zeros(0, dtype=torch.long)) for s in samples]
    text_seqs.append(torch.zeros(2, dtype=torch.long))
    text_ids = pad_sequence(text_seqs, batch_first=True, padding_value=0)[:-1]
    text_lengths = torch.tensor([t.shape[0] for t in text_seqs[:-1]])
    text_mask = torch.arange(text_ids.shape[1])[None, :] < text_lengths[:, None]

    return {
        "keys": [s["key"] for s in samples],
        "captions": [s.get("caption", "") for s in samples],
        "image": image,
        "has_image": has_image,
        "audio": audio,
        "audio_mask": audio_mask,
        "has_audio": has_audio,
        "text_ids": text_ids,
        "text_mask": text_mask,
        "has_text": has_text,
    }
