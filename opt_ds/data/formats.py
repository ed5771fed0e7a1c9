"""What a sample may hold inside a shard: file extensions and where its caption lives."""

from __future__ import annotations

import json

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("flac", "wav", "ogg", "mp3")
CAPTION_JSON_FIELDS = ("text", "caption")
MODALITIES = ("image", "text", "audio")


def first_present(sample: dict, extensions: tuple[str, ...]) -> tuple[str, bytes] | None:
    for ext in extensions:
        if ext in sample:
            return ext, sample[ext]
    return None


def caption_bytes(sample: dict) -> str | None:
    """The caption: KEY.txt, else a `text`/`caption` field of KEY.json (audio-caption shards)."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8")
    if "json" in sample:
        meta = json.loads(sample["json"])
        if isinstance(meta, dict):
            for field in CAPTION_JSON_FIELDS:
                if isinstance(meta.get(field), str):
                    return meta[field]
    return None
