"""Decode one raw shard sample (bytes per extension) into model-ready tensors.

A part that cannot be decoded is dropped and its reason counted; the rest of the sample is kept.
Nothing is ever unpickled: only images, audio, UTF-8 text and JSON are read.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import partial
from typing import Callable, TypeVar

import soundfile
import torch
import torchaudio
from PIL import Image
from torchvision.transforms import v2 as T

from opt_ds.data.concepts import ConceptVocabulary, concepts_in
from opt_ds.data.features import float_wave, frame_geometry
from opt_ds.data.formats import (
    AUDIO_EXTS,
    IMAGE_EXTS,
    caption_bytes,
    caption_rewrites,
    class_name,
    first_present,
    text_list,
)
from opt_ds.data.tars import UnreadMember
from opt_ds.data.tokenizer import load_tokenizer

Parsed = TypeVar("Parsed")
# Audio at these rates only: resampling from an odd rate (say 12503 Hz) builds a kernel sized by the rates'
# greatest common divisor, gigabytes for one clip. Every common recording rate is here.
SAMPLE_RATES = (8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000, 88_200, 96_000)
CHARS_PER_TOKEN = 32  # a caption is cut to this many characters per text token before tokenising
# PIL reads an image only as one of the formats the image extensions name (a PNG saved as .jpg, common on the web,
# still decodes): a file in any other format never reaches that format's parser (EPS runs Ghostscript; PSD, FITS,
# and the other rarely used decoders are where PIL's security fixes land) and is counted as bad_image.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "MPO")  # MPO: the JPEG variant many cameras write


@dataclass(frozen=True)
class DecodeConfig:
    image_size: int = 64
    max_image_pixels: int = 40_000_000
    sample_rate: int = 16_000
    max_audio_seconds: float = 10.0
    n_mels: int = 80
    fbank_mean: float = -4.27  # AudioSet log-mel statistics (AST), waveform in [-1, 1]
    fbank_std: float = 4.57
    max_text_tokens: int = 64
    paraphrases_per_sample: int = 0  # caption rewrites (KEY.json) batched for the contrastive task: extra positives
    hard_negatives_per_sample: int = 0  # ... and extra negatives; 0 and 0: no rewrites in the batch
    # MVP's concepts: a concepts.json of `python -m opt_ds.data.concepts` puts each sample's caption concepts (KEY.json
    # `concepts`, else the vocabulary's phrases its caption holds) and picture tags (`tags`) in the batch as ids
    concepts: str | None = None
    concepts_per_sample: int = 6  # slots in the batch (0: none of the kind)
    tags_per_sample: int = 6
    max_sample_bytes: int = 64 * 1024 * 1024
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        for name in ("paraphrases_per_sample", "hard_negatives_per_sample", "concepts_per_sample", "tags_per_sample"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def rewrite_limits(self) -> dict[str, int]:
        """KEY.json rewrite field -> how many of them a sample brings (its slots in the batch, in this order)."""
        return {"paraphrases": self.paraphrases_per_sample, "hard_negatives": self.hard_negatives_per_sample}


class SampleDecoder:
    """Callable: raw sample dict -> (decoded dict or None, list of (reason, detail))."""

    def __init__(self, cfg: DecodeConfig):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.vocabulary = ConceptVocabulary.load(cfg.concepts) if cfg.concepts else None
        self.image_transform = T.Compose(
            [
                T.Resize(cfg.image_size, antialias=True),
                T.CenterCrop(cfg.image_size),
                T.PILToTensor(),  # uint8: normalised on the device (opt_ds.data.batch.normalised_images)
            ]
        )

    def picture(self, data: bytes) -> Image.Image:
        """The decoded RGB picture, its pixel count checked first; a JPEG is decoded at the smallest DCT scale that
        still covers image_size."""
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            width, height = img.size
            if width * height > self.cfg.max_image_pixels:
                raise OversizeError(f"{width}x{height} pixels > {self.cfg.max_image_pixels}")
            img.draft("RGB", (self.cfg.image_size, self.cfg.image_size))
            return img.convert("RGB")

    def image(self, data: bytes) -> torch.Tensor:
        """uint8 RGB [3, S, S]: resized (short side) and centre-cropped."""
        return self.image_transform(self.picture(data))

    def waveform(self, data: bytes) -> torch.Tensor:
        """Mono waveform at sample_rate, its first max_audio_seconds: the sample's audio. A mono 16-bit PCM file at
        that rate (most FLAC) stays int16 as stored, half the bytes to the trainer, made float (`float_wave`) where
        its log-mel is made; anything else is float32 in [-1, 1]."""
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            rate = f.samplerate
            if rate not in SAMPLE_RATES:
                raise ValueError(f"sample rate {rate} Hz is not one of {', '.join(map(str, SAMPLE_RATES))}")
            wanted = int(self.cfg.max_audio_seconds * rate)
            dtype = "int16" if f.subtype == "PCM_16" else "float32"
            frames = f.read(wanted if f.frames <= 0 else min(f.frames, wanted), dtype=dtype, always_2d=True)
        if frames.shape[0] == 0:
            raise ValueError("no audio frames")
        wave = torch.from_numpy(frames)
        if wave.shape[1] == 1 and rate == self.cfg.sample_rate:
            wave = wave[:, 0].contiguous()
        else:
            wave = float_wave(wave).mean(dim=1)
            if rate != self.cfg.sample_rate:
                wave = torchaudio.functional.resample(wave, rate, self.cfg.sample_rate)
        if wave.numel() < frame_geometry(self.cfg.sample_rate)[0]:  # shorter than one 25 ms window
            raise ValueError(f"audio too short: {wave.numel()} samples")
        return wave

    def text(self, caption: str) -> torch.Tensor:
        """WordPiece ids, truncated; the caption is cut to CHARS_PER_TOKEN x max_text_tokens characters first, so a
        megabyte caption costs no more than a long one (tokenisers truncate only after tokenising it all)."""
        caption = caption[: CHARS_PER_TOKEN * self.cfg.max_text_tokens]
        ids = self.tokenizer(caption, truncation=True, max_length=self.cfg.max_text_tokens)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def rewrites(self, raw: dict, out: dict) -> list[tuple[str, str]]:
        """Tokenize up to the configured number of the caption's paraphrases and hard negatives into `out`."""
        limits = self.cfg.rewrite_limits
        if not any(limits.values()):
            return []
        problems: list[tuple[str, str]] = []
        rewrites = parse_or_count(caption_rewrites, raw, "bad_rewrites", problems)
        if rewrites is None:
            return problems
        for field, limit in limits.items():
            if rewrites[field][:limit]:
                out[f"{field}_ids"] = [self.text(t) for t in rewrites[field][:limit]]
        return []

    def concepts(self, raw: dict, out: dict) -> list[tuple[str, str]]:
        """The vocabulary ids of the caption's concepts and (with a picture) its tags into `out`; a field that is
        not a list of strings is counted, the sample kept."""
        problems: list[tuple[str, str]] = []
        if self.vocabulary is None:
            return problems
        vocabulary, cfg = self.vocabulary, self.cfg
        if "caption" in out:
            given = parse_or_count(partial(text_list, field="concepts"), raw, "bad_concepts", problems)
            if given is None and not problems:  # none in KEY.json: the vocabulary's phrases the caption holds
                given = concepts_in(out["caption"], vocabulary.ids, vocabulary.max_words)
            out["concept_ids"] = torch.tensor(vocabulary.encode(given or [], cfg.concepts_per_sample), dtype=torch.long)
        if "image" in out:
            tags = parse_or_count(partial(text_list, field="tags"), raw, "bad_tags", problems)
            out["tag_ids"] = torch.tensor(vocabulary.encode(tags or [], cfg.tags_per_sample), dtype=torch.long)
        return problems

    def __call__(self, raw: dict) -> tuple[dict | None, list[tuple[str, str]]]:
        problems: list[tuple[str, str]] = []
        unread = [f"{k} of {v.size} bytes" for k, v in raw.items() if isinstance(v, UnreadMember)]
        if unread:
            return None, [("oversize_sample", f"{', '.join(unread)} > {self.cfg.max_sample_bytes}: not read")]
        size = sum(len(v) for k, v in raw.items() if isinstance(v, bytes))
        if size > self.cfg.max_sample_bytes:
            return None, [("oversize_sample", f"{size} bytes > {self.cfg.max_sample_bytes}")]
        out: dict = {"key": raw["__key__"]}

        image = first_present(raw, IMAGE_EXTS)
        if image is not None:
            try:
                out["image"] = self.image(image[1])
            except OversizeError as exc:
                problems.append(("oversize_image", str(exc)))
            except Exception as exc:  # PIL raises many types for corrupt files
                problems.append(("bad_image", f"{type(exc).__name__}: {exc}"))

        audio = first_present(raw, AUDIO_EXTS)
        if audio is not None:
            try:
                out["audio"] = self.waveform(audio[1])  # its log-mel is made on the device (opt_ds.data.features)
            except Exception as exc:  # libsndfile errors, empty or truncated streams
                problems.append(("bad_audio", f"{type(exc).__name__}: {exc}"))

        caption = parse_or_count(caption_bytes, raw, "bad_text", problems)
        if caption is not None:
            caption = " ".join(caption.split())
            if caption:
                out["caption"] = caption
                out["text_ids"] = self.text(caption)
                problems += self.rewrites(raw, out)
            else:
                problems.append(("empty_caption", ""))

        problems += self.concepts(raw, out)
        label = parse_or_count(class_name, raw, "bad_json", problems)
        if label is not None:
            out["label"] = label

        if not any(m in out for m in ("image", "audio", "text_ids")):
            problems.append(("no_usable_modality", ",".join(sorted(k for k in raw if not k.startswith("__")))))
            return None, problems
        return out, problems


def parse_or_count(
    parse: Callable[[dict], Parsed], raw: dict, reason: str, problems: list[tuple[str, str]]
) -> Parsed | None:
    """parse(raw), or None with (reason, the error) counted when the sample's text or JSON does not parse
    (json.JSONDecodeError is a ValueError)."""
    try:
        return parse(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        problems.append((reason, f"{type(exc).__name__}: {exc}"))
        return None


class OversizeError(ValueError):
    """An image whose pixel count exceeds the configured limit (decompression-bomb guard)."""
