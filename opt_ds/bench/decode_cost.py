"""What one loader worker delivers against what its decode steps cost, for `bench loader --decode-image-sizes`:
samples of a JPEG of each size (with a photograph's detail), 10 s of 16 kHz FLAC and a caption, decoded to the
model's inputs (224 px, 80-bin log-mel, WordPiece ids)."""

from __future__ import annotations

import io
import itertools
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from opt_ds.data.collate import collate
from opt_ds.data.decode import DecodeConfig, SampleDecoder
from opt_ds.data.features import with_log_mel
from opt_ds.data.stream import ReaderConfig, SourceConfig, make_loader
from opt_ds.data.synthetic import synthetic_sample
from opt_ds.data.writer import ShardSink

AUDIO_SECONDS = 10.0
DECODE = DecodeConfig(image_size=224, max_audio_seconds=AUDIO_SECONDS, max_text_tokens=64)


def photo_like(sample: dict, size: int) -> bytes:
    """The sample's drawing with a photograph's detail: a smooth random field and per-pixel noise over it, saved
    as a quality-90 JPEG (~0.25 bytes/pixel at 1024 px, as web photos). A flat drawing compresses to a few KB and
    decodes several times faster than a photo of the same size."""
    rng = np.random.default_rng(int(sample["__key__"].rsplit("_", 1)[1]))
    drawing = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB").resize((size, size)), dtype=np.float32)
    field = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = 0.7 * drawing + 0.3 * np.asarray(field, dtype=np.float32) + rng.normal(0, 6, drawing.shape)
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def photo_shards(out: Path, samples: int, image_size: int) -> Path:
    sink = ShardSink(out, max_samples=64)
    for i in range(samples):
        sample = synthetic_sample(i, image_size=64, audio_seconds=AUDIO_SECONDS)
        sink.write({**sample, "jpg": photo_like(sample, image_size)})
    sink.close()
    return out


def _ms_per_call(fn, inputs: list, rounds: int = 3) -> float:
    """The fastest of `rounds` passes over the inputs (the least disturbed by other work), after a warm-up."""
    for x in inputs[:3]:  # first calls build caches (FFT plans, allocator pools)
        fn(x)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for x in inputs:
            fn(x)
        best = min(best, time.perf_counter() - start)
    return best / len(inputs) * 1000


def step_costs(raw: list[dict], batch_size: int) -> dict[str, float]:
    """Milliseconds per sample of each of the decoder's steps on its own, one thread as in a worker; and of the
    log-mel the trainer makes of a batch's waveforms (here on one CPU thread; a GPU's cost is not measured here)."""
    decoder = SampleDecoder(DECODE)
    jpegs, flacs, captions = [s["jpg"] for s in raw], [s["flac"] for s in raw], [s["txt"].decode() for s in raw]
    pictures = [decoder.picture(j) for j in jpegs]
    decoded = [decoder({**s, "__key__": str(i)})[0] for i, s in enumerate(raw)]
    batches = [decoded[i : i + batch_size] for i in range(0, len(decoded) - batch_size + 1, batch_size)]
    collated = [collate(b, DECODE) for b in batches]
    return {
        "jpeg_full_decode": _ms_per_call(lambda j: Image.open(io.BytesIO(j)).convert("RGB"), jpegs),
        "jpeg_draft_decode": _ms_per_call(decoder.picture, jpegs),
        "resize_crop": _ms_per_call(decoder.image_transform, pictures),
        "flac_read": _ms_per_call(decoder.waveform, flacs),
        "tokenise": _ms_per_call(decoder.text, captions),
        "collate": _ms_per_call(lambda b: collate(b, DECODE), batches) / batch_size,
        "whole_sample": _ms_per_call(lambda s: decoder({**s, "__key__": "k"}), raw),
        "log_mel_in_the_trainer_cpu": _ms_per_call(lambda b: with_log_mel(b, DECODE), collated) / batch_size,
    }


def worker_samples_per_s(shards: Path, batch_size: int, skip_batches: int = 2) -> float:
    """Samples/s one loader worker delivers to the trainer once started (its first batches, which include the
    worker's start, are not timed); the report takes the median of three passes."""
    reader = ReaderConfig(batch_size=batch_size, num_workers=1, shuffle_buffer=0, max_epochs=1, worker_nice=0)
    batches = iter(make_loader([SourceConfig("bench", str(shards))], DECODE, reader))
    for _ in itertools.islice(batches, skip_batches):
        pass
    start, samples = time.perf_counter(), 0
    for batch in batches:
        samples += len(batch["keys"])
    return samples / (time.perf_counter() - start)


def decode_report(image_sizes: list[int], samples: int, batch_size: int, tmp: Path) -> dict:
    torch.set_num_threads(1)
    report = {}
    for size in image_sizes:
        shards = photo_shards(tmp / f"photos{size}", samples, size)
        raw = [synthetic_sample(i, image_size=64, audio_seconds=AUDIO_SECONDS) for i in range(min(samples, 64))]
        raw = [{**s, "jpg": photo_like(s, size)} for s in raw]
        costs = step_costs(raw, batch_size)
        report[str(size)] = {
            "jpeg_kb": round(sum(len(s["jpg"]) for s in raw) / len(raw) / 1024, 1),
            "worker_samples_per_s": round(
                statistics.median(worker_samples_per_s(shards, batch_size) for _ in range(3)), 1
            ),
            "steps_ms": {k: round(v, 3) for k, v in costs.items()},
        }
    return report


def decode_table(report: dict) -> str:
    steps = list(next(iter(report.values()))["steps_ms"])
    sizes = list(report)
    lines = [
        "| per sample, one worker, one thread | " + " | ".join(f"{s} px JPEG" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
        "| JPEG size (KB) | " + " | ".join(f"{report[s]['jpeg_kb']:.0f}" for s in sizes) + " |",
        "| **worker delivers (samples/s)** | "
        + " | ".join(f"**{report[s]['worker_samples_per_s']:.0f}**" for s in sizes)
        + " |",
    ]
    for step in steps:
        lines.append(f"| {step} (ms) | " + " | ".join(f"{report[s]['steps_ms'][step]:.2f}" for s in sizes) + " |")
    return "\n".join(lines)
