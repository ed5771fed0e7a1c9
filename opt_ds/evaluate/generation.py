"""What the two decoders produce, scored without a person.

Captions are generated from the image alone, the audio alone and both (the text never enters the encoder),
and scored against the sample's caption with BLEU-4 and CIDEr; WER where audio is the source (on spoken-caption
data that is speech recognition). Images are generated from text + audio (the image never enters the encoder)
and scored by the model's own contrastive encoders: does a generated image retrieve its caption among the
evaluated captions, beside the real image's score. On synthetic data both are also scored by the attributes
the generator knows (opt_ds.data.synthetic): the caption names the right colour and shape; the picture shows
the caption's colour.

`call(fn)` runs fn(model) through whatever wraps the model (the DeepSpeed engine or a plain module).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from opt_ds.data.batch import image_statistics, normalised_images, take_rows, to_device
from opt_ds.data.synthetic import drawn_colour, named_attributes
from opt_ds.evaluate.retrieval import embed
from opt_ds.evaluate.scoring import attribute_scores, caption_scores, recall_at, same_caption, word_error_rate
from opt_ds.model.fusion import MODALITY_ORDER
from opt_ds.model.generate import generate_image_tokens, generate_text
from opt_ds.model.vqvae import VQVAE
from opt_ds.tasks.base import TextSpecials

CAPTION_SOURCES = {"image": ("image",), "audio": ("audio",), "image+audio": ("image", "audio")}


@dataclass(frozen=True)
class Decoding:
    """How captions and images are decoded (the defaults were chosen by measurement, BENCHMARKS.md)."""

    beams: int = 3
    length_penalty: float = 1.0
    no_repeat_ngram: int = 2
    image_temperature: float = 0.0  # 0: greedy image codes
    image_top_k: int = 0
    image_top_p: float = 1.0
    image_guidance: float = 8.0  # classifier-free guidance scale; 1: plain conditional decoding
    seed: int = 0


def first_rows(has: dict[str, torch.Tensor], modalities: tuple[str, ...], limit: int) -> torch.Tensor:
    """[N] True for the first `limit` samples of the eval set that have every one of `modalities`."""
    rows = torch.stack([has[m] for m in modalities]).all(0)
    return rows & (rows.cumsum(0) <= limit)


def _rows_with(batches: list[dict], modalities: tuple[str, ...], limit: int) -> list[dict]:
    """Those first_rows samples, as batches."""
    has = {m: torch.cat([b[f"has_{m}"] for b in batches]) for m in modalities}
    parts = first_rows(has, modalities, limit).split([len(b["keys"]) for b in batches])
    return [take_rows(b, rows) for b, rows in zip(batches, parts) if rows.any()]


@torch.no_grad()
def captions_from(
    call: Callable,
    batch: dict,
    source: tuple[str, ...],
    device: torch.device,
    dtype: torch.dtype,
    tokenizer,
    decoding: Decoding,
    max_len: int,
) -> list[str]:
    """Captions of the batch (at most max_len tokens with [CLS] and [SEP], as in training) generated from the
    `source` modalities alone."""
    specials = TextSpecials.from_tokenizer(tokenizer)
    b = to_device(batch, device, dtype)
    keep = {m: torch.full_like(b["has_text"], m in source) for m in MODALITY_ORDER}

    def run(m):
        fused = m.fuse(m.unimodal(b), b, keep=keep)
        return generate_text(
            m,
            fused,
            specials.cls,
            specials.sep,
            max_len=max_len,
            beams=decoding.beams,
            length_penalty=decoding.length_penalty,
            no_repeat_ngram=decoding.no_repeat_ngram,
        )

    return [tokenizer.decode([t for t in ids if t != specials.sep], skip_special_tokens=True) for ids in call(run)]


@torch.no_grad()
def images_from_text(
    call: Callable, batch: dict, device: torch.device, dtype: torch.dtype, image_tokenizer: VQVAE, decoding: Decoding
) -> torch.Tensor:
    """Pictures [B, 3, H, W] in [0, 1] generated from the batch's text and audio (the image hidden)."""
    b = to_device(batch, device, dtype)
    generator = torch.Generator(device=device).manual_seed(decoding.seed)

    def run(m):
        uni, absent = m.unimodal(b), torch.zeros_like(b["has_image"])
        fused = m.fuse(uni, b, keep={"image": absent})
        unconditional = None
        if decoding.image_guidance != 1.0:
            unconditional = m.fuse(uni, b, keep={modality: absent for modality in MODALITY_ORDER})
        return generate_image_tokens(
            m,
            fused,
            temperature=decoding.image_temperature,
            top_k=decoding.image_top_k,
            top_p=decoding.image_top_p,
            generator=generator,
            guidance=decoding.image_guidance,
            unconditional=unconditional,
        )

    codes = call(run)
    return denormalise(image_tokenizer.decode(codes.to(next(image_tokenizer.parameters()).device)))


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """The model's normalised images (a VQ decoder's output) -> pixels in [0, 1]."""
    mean, std = image_statistics(images.device)
    return (images.float() * std + mean).clamp(0, 1)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> uint8 pixels, as the loader delivers pictures."""
    return (images.clamp(0, 1) * 255).round().byte()


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[0, 1] images -> HWC uint8 arrays (for drawing and colour checks)."""
    return list(to_pixels(images.float()).permute(0, 2, 3, 1).cpu().numpy())


def caption_evaluation(
    call: Callable,
    batches: list[dict],
    device: torch.device,
    dtype: torch.dtype,
    tokenizer,
    limit: int,
    decoding: Decoding,
    max_len: int,
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Per source: BLEU-4, CIDEr, WER (audio sources), scoring.NAMED_ATTRIBUTES (synthetic); -> (scores, captions per
    source and 'reference', for the first samples that have a caption and every source modality)."""
    scores: dict[str, float] = {}
    texts: dict[str, list[str]] = {}
    for name, source in CAPTION_SOURCES.items():
        chosen = _rows_with(batches, ("text", *source), limit)
        if not chosen:
            continue
        generated = [
            c for b in chosen for c in captions_from(call, b, source, device, dtype, tokenizer, decoding, max_len)
        ]
        references = [c for b in chosen for c in b["captions"]]
        prefix = f"eval/captions_from_{name}"
        scores.update({f"{prefix}/{k}": v for k, v in caption_scores(generated, [[r] for r in references]).items()})
        if "audio" in source:
            scores[f"{prefix}/WER"] = word_error_rate(generated, references)
        scores.update({f"{prefix}/{k}": v for k, v in attribute_scores(generated, references).items()})
        texts.setdefault("reference", references)
        texts[name] = generated
    return scores, texts


@torch.no_grad()
def image_generation_evaluation(
    call: Callable,
    batches: list[dict],
    emb: dict[str, torch.Tensor],
    has: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    image_tokenizer: VQVAE,
    limit: int,
    decoding: Decoding,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Images from text + audio for the first `limit` samples with a caption and an image; -> (scores, real
    pictures, generated pictures). R@1/R@5: the generated picture retrieves its caption among these samples'
    captions by the model's own contrastive encoders (duplicate captions count, ties miss), beside the real
    picture's (emb, has: the eval set's embeddings, opt_ds.evaluate.retrieval.embed_eval_set); colour (synthetic): the
    picture shows the colour its caption names, beside the real picture's and the image tokenizer's
    reconstruction of it (the ceiling the tokenizer sets)."""
    chosen = _rows_with(batches, ("text", "image"), limit)
    if not chosen:
        return {}, torch.empty(0), torch.empty(0)
    generated = torch.cat([images_from_text(call, b, device, dtype, image_tokenizer, decoding).cpu() for b in chosen])
    real = torch.cat([b["image"].float() / 255 for b in chosen])
    captions = [c for b in chosen for c in b["captions"]]
    generated_emb, start = [], 0
    for b in chosen:
        size = len(b["keys"])
        pictures = F.interpolate(generated[start : start + size], size=b["image"].shape[-2:], mode="bilinear")
        generated_emb.append(embed(call, b | {"image": to_pixels(pictures)}, device, dtype)[0]["image"].float().cpu())
        start += size
    rows = first_rows(has, ("text", "image"), limit)
    text_emb = emb["text"][rows]
    correct = same_caption(captions)
    scores: dict[str, float] = {"eval/images_from_text/samples": float(len(captions))}
    for prefix, image_emb in (("", torch.cat(generated_emb)), ("real_", emb["image"][rows])):
        for k, recall in recall_at(image_emb @ text_emb.t(), correct, (1, 5)).items():
            scores[f"eval/images_from_text/{prefix}R@{k}"] = recall
    weights = next(image_tokenizer.parameters())
    reconstructed = torch.cat(
        [
            denormalise(
                image_tokenizer.decode(
                    image_tokenizer.encode(normalised_images(b["image"].to(weights.device), weights.dtype))
                )
            ).cpu()
            for b in chosen
        ]
    )  # the best the image tokenizer lets a generator draw
    for kind, pictures in (("colour", generated), ("real_colour", real), ("tokenizer_colour", reconstructed)):
        hits = [
            drawn_colour(p) == named_attributes(c).get("colour")
            for p, c in zip(to_uint8(pictures), captions)
            if "colour" in named_attributes(c)
        ]
        if hits:
            scores[f"eval/images_from_text/{kind}"] = float(np.mean(hits))
    return scores, real, generated


def write_grid(
    path: Path, real: torch.Tensor, generated: torch.Tensor, texts: dict[str, list[str]], count: int, cell: int = 128
) -> Path:
    """A picture a person looks at: per sample a row with the real picture, the picture generated from its caption
    (+ audio), and the reference caption above the captions generated from each source."""
    count = min(count, len(texts.get("reference", [])), len(real) if len(real) else count)
    font = ImageFont.load_default(size=13)
    line, header = 17, 20
    width = 2 * cell + 560 if len(real) else 560
    grid = Image.new("RGB", (width, header + count * (cell + 8)), "white")
    draw = ImageDraw.Draw(grid)
    pictures = list(zip(to_uint8(real), to_uint8(generated))) if len(real) else []
    titles = (["real", "from caption+audio"] if pictures else []) + ["captions"]
    for i, title in enumerate(titles):
        draw.text((i * cell + 8, 2), title, fill="black", font=font)
    for row in range(count):
        top = header + row * (cell + 8)
        left = 0
        for picture in pictures[row] if pictures else ():
            grid.paste(Image.fromarray(picture).resize((cell, cell), Image.NEAREST), (left, top))
            left += cell
        for i, (source, captions) in enumerate(texts.items()):
            label = "caption" if source == "reference" else f"from {source}"
            draw.text((left + 8, top + 4 + i * line), f"{label}: {captions[row]}"[:80], fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
