"""What a sample may hold inside a shard: file extensions and where its caption lives."""

from __future__ import annotations

import json

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("flac", "wav", "ogg", "mp3")
CAPTION_JSON_FIELDS = ("text", "caption")
REWRITE_JSON_FIELDS = ("paraphrases", "hard_negatives")  # UNIMO's caption rewrites, in KEY.json
CONCEPT_JSON_FIELDS = ("concepts", "tags")  # MVP's concepts: the caption's phrases, the picture's object tags
CLASS_JSON_FIELDS = ("label_name", "label")  # the sample's class as text (zero-shot classification prompts)
MODALITIES = ("image", "text", "audio")
MAX_JSON_BYTES = 1 << 20  # KEY.json holds a caption, its rewrites and a label: a larger one is not metadata


def key_json(sample: dict):
    """KEY.json parsed once per sample (cached in the sample as `__json__`), {} without one. Raises ValueError for
    one over MAX_JSON_BYTES (refused before parsing) or nested too deep for the parser."""
    if "__json__" not in sample:
        data = sample.get("json")
        if data is not None and len(data) > MAX_JSON_BYTES:
            raise ValueError(f"KEY.json of {len(data)} bytes > {MAX_JSON_BYTES}")
        try:
            sample["__json__"] = json.loads(data) if data is not None else {}
        except RecursionError:
            raise ValueError("KEY.json nested too deep") from None
    return sample["__json__"]


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
        meta = key_json(sample)
        if isinstance(meta, dict):
            for field in CAPTION_JSON_FIELDS:
                if isinstance(meta.get(field), str):
                    return meta[field]
    return None


def text_list(sample: dict, field: str) -> list[str] | None:
    """KEY.json `field` as a list of whitespace-normalised, non-empty strings (a lone string is a list of one);
    None when absent. Raises ValueError naming the field when it holds anything else."""
    meta = key_json(sample)
    value = meta.get(field) if isinstance(meta, dict) else None
    if value is None:
        return None
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"json field {field!r} must be a string or a list of strings, not {value!r:.80}")
    return [" ".join(v.split()) for v in value if v.strip()]


def caption_rewrites(sample: dict) -> dict[str, list[str]]:
    """The caption's rewrites from KEY.json: `paraphrases` (extra positives) and `hard_negatives` (captions
    with an object, attribute or count changed); absent fields give []."""
    return {field: text_list(sample, field) or [] for field in REWRITE_JSON_FIELDS}


def class_name(sample: dict) -> str | None:
    """The sample's class for zero-shot classification: KEY.json `label_name`, else a text `label` (a manifest's
    label column); a numeric label alone names no class."""
    meta = key_json(sample)
    if isinstance(meta, dict):
        for field in CLASS_JSON_FIELDS:
            if isinstance(meta.get(field), str) and meta[field].strip():
                return " ".join(meta[field].split())
    return None
