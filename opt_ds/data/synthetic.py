"""Synthetic triplets whose caption, picture and sound agree, so cross-modal retrieval can beat chance.

A sample is "<count> <colour> <shape>s": the picture draws them on a grey field; the sound plays
<count> beeps, then a tone whose pitch names the colour, then a two-tone chord that names the shape.
Its KEY.json carries its class (`label`, `label_name`), caption rewrites for UNIMO's contrastive task (a
paraphrase and hard negatives) and MVP's concepts: the caption's phrases (`concepts`: "red circles", "two") and
the picture's object tags (`tags`: "circle", "red"). `named_attributes` and `drawn_colour` read the
attributes back from any caption or picture, so generated ones can be scored without a person.
"""

from __future__ import annotations

import io
import json
import math
import random

import numpy as np
import soundfile
from PIL import Image, ImageDraw

from opt_ds.data.formats import MODALITIES

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
SHAPES = ("circle", "square", "triangle", "cross")
COUNTS = ("one", "two", "three", "four")
TEMPLATES = (
    "{count} {colour} {shape}",
    "a picture of {count} {colour} {shape}",
    "there are {count} {colour} {shape} here",
)
SAMPLE_RATE = 16_000


def describe(count: int, colour: str, shape: str, template: int) -> str:
    noun = shape if count == 1 else shape + ("es" if shape.endswith("s") else "s")
    words = TEMPLATES[template].format(count=COUNTS[count - 1], colour=colour, shape=noun)
    return words.replace("there are one", "there is one")


def draw_image(count: int, colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    grey = rng.randint(110, 150)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    cell = size // 2
    cells = rng.sample(range(4), count)
    for c in cells:
        r = rng.uniform(0.28, 0.4) * cell
        cx = (c % 2) * cell + cell / 2 + rng.uniform(-0.08, 0.08) * cell
        cy = (c // 2) * cell + cell / 2 + rng.uniform(-0.08, 0.08) * cell
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            w = r / 3
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    return img


def synth_audio(count: int, colour: str, shape: str, seconds: float, rng: random.Random) -> np.ndarray:
    t = lambda dur: np.arange(int(dur * SAMPLE_RATE)) / SAMPLE_RATE  # noqa: E731
    parts = []
    for _ in range(count):
        parts += [0.5 * np.sin(2 * math.pi * 880 * t(0.08)), np.zeros(int(0.06 * SAMPLE_RATE))]
    colour_hz = 300 + 90 * list(COLOURS).index(colour)
    parts += [np.zeros(int(0.1 * SAMPLE_RATE)), 0.5 * np.sin(2 * math.pi * colour_hz * t(0.3))]
    s = SHAPES.index(shape)
    chord = 0.3 * np.sin(2 * math.pi * (1400 + 200 * s) * t(0.3)) + 0.3 * np.sin(
        2 * math.pi * (2600 + 250 * s) * t(0.3)
    )
    parts += [np.zeros(int(0.1 * SAMPLE_RATE)), chord]
    wave = np.concatenate(parts)
    total = max(len(wave), int(seconds * SAMPLE_RATE))
    start = rng.randint(0, total - len(wave))
    out = np.zeros(total)
    out[start : start + len(wave)] = wave
    out += np.random.default_rng(rng.randrange(2**32)).normal(0, 0.01, total)
    return out.astype(np.float32)


def synthetic_sample(
    index: int,
    seed: int = 0,
    image_size: int = 64,
    audio_seconds: float = 2.0,
    modalities: tuple[str, ...] = MODALITIES,
    image_format: str = "jpg",
    audio_format: str = "flac",
) -> dict[str, bytes | str]:
    """One deterministic sample (key and bytes depend only on index and seed)."""
    rng = random.Random(f"synthetic-{seed}-{index}")
    count, colour, shape = rng.randint(1, 4), rng.choice(list(COLOURS)), rng.choice(SHAPES)
    sample: dict[str, bytes | str] = {"__key__": f"syn{seed:03d}_{index:08d}"}
    if "image" in modalities:
        buf = io.BytesIO()
        draw_image(count, colour, shape, image_size, rng).save(
            buf, format={"jpg": "JPEG"}.get(image_format, image_format.upper()), quality=90
        )
        sample[image_format] = buf.getvalue()
    if "audio" in modalities:
        buf = io.BytesIO()
        soundfile.write(
            buf, synth_audio(count, colour, shape, audio_seconds, rng), SAMPLE_RATE, format=audio_format.upper()
        )
        sample[audio_format] = buf.getvalue()
    label = (count - 1) * len(COLOURS) * len(SHAPES) + list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)
    meta: dict = {
        "count": count,
        "colour": colour,
        "shape": shape,
        "label": label,
        "label_name": describe(count, colour, shape, 0),
    }
    if "image" in modalities:
        meta["tags"] = [shape, colour]  # MVP's visual concepts: what an object tagger would name
    if "text" in modalities:
        template = rng.randrange(len(TEMPLATES))
        sample["txt"] = describe(count, colour, shape, template).encode()
        meta["concepts"] = [describe(count, colour, shape, 0).split(" ", 1)[1], COUNTS[count - 1]]  # the caption's
        meta |= rewrites(count, colour, shape, template, random.Random(f"rewrites-{seed}-{index}"))
    sample["json"] = json.dumps(meta).encode()
    return sample


def rewrites(count: int, colour: str, shape: str, template: int, rng: random.Random) -> dict[str, list[str]]:
    """UNIMO-style caption rewrites: a paraphrase (another template, same content) and three hard negatives,
    each with one of count, colour and shape changed (in random order)."""
    other_template = (template + rng.randrange(1, len(TEMPLATES))) % len(TEMPLATES)
    negatives = [
        describe(rng.choice([c for c in range(1, len(COUNTS) + 1) if c != count]), colour, shape, template),
        describe(count, rng.choice([c for c in COLOURS if c != colour]), shape, template),
        describe(count, colour, rng.choice([s for s in SHAPES if s != shape]), template),
    ]
    rng.shuffle(negatives)
    return {"paraphrases": [describe(count, colour, shape, other_template)], "hard_negatives": negatives}


def named_attributes(text: str) -> dict[str, str]:
    """The count, colour and shape words a caption names ({} when it names none of the synthetic vocabulary)."""
    words = text.lower().replace(".", " ").split()
    found = {}
    for attribute, vocabulary in (("count", COUNTS), ("colour", tuple(COLOURS)), ("shape", SHAPES)):
        named = [v for v in vocabulary if any(w == v or w in (v + "s", v + "es") for w in words)]
        if len(named) == 1:
            found[attribute] = named[0]
    return found


def drawn_colour(image: np.ndarray) -> str | None:
    """The palette colour of the shapes in an RGB picture [H, W, 3] (uint8), or None when nothing stands out
    from the grey field (its colour: the median of the picture's border, which shapes never cover): the pixels
    far from the field, matched to the nearest palette entry."""
    border = np.concatenate(
        [image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3), image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)]
    ).astype(np.float32)
    field = np.median(border, axis=0)
    pixels = image.reshape(-1, 3).astype(np.float32)
    shapes = pixels[np.abs(pixels - field).max(1) > 60]
    if len(shapes) < 0.01 * len(pixels):
        return None
    centre = np.median(shapes, axis=0)
    return min(COLOURS, key=lambda c: float(np.abs(np.array(COLOURS[c]) - centre).sum()))
