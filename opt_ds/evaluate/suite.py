"""The whole evaluation of a model: retrieval, zero-shot, both matchings, captions and generated images.

`evaluate_model` runs it on any callable model (the trainer's engine, at its evaluations); `evaluate` on an
export, writing its captions and pictures (`python -m opt_ds.evaluate`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torchvision.utils import save_image

from opt_ds.data.decode import DecodeConfig
from opt_ds.data.tokenizer import load_tokenizer
from opt_ds.evaluate.generation import Decoding, caption_evaluation, image_generation_evaluation, write_grid
from opt_ds.evaluate.retrieval import embed_eval_set, eval_batches, matching, pair_matching, retrieval, zero_shot
from opt_ds.export.bundle import load_bundle
from opt_ds.model.vqvae import VQVAE
from opt_ds.train.stages import stage_of


def evaluate_model(
    call: Callable,
    batches: list[dict],
    device: torch.device,
    dtype: torch.dtype,
    tokenizer,
    image_tokenizer: VQVAE | None,
    decode: DecodeConfig,
    generate: int,
    decoding: Decoding,
) -> tuple[dict[str, float], dict[str, list[str]], torch.Tensor, torch.Tensor]:
    """Every score of the evaluation; -> (scores, generated captions per source with the references, real and
    generated pictures). Used by the trainer (TensorBoard) and by this command."""
    emb, has, scores = embed_eval_set(call, batches, device, dtype)
    scores |= retrieval(emb, has, [c for b in batches for c in b["captions"]])
    scores |= zero_shot(call, emb, has, [n for b in batches for n in b["labels"]], device, dtype, decode)
    scores |= matching(call, batches, device, dtype) | pair_matching(call, batches, device, dtype)
    texts: dict[str, list[str]] = {}
    real = generated = torch.empty(0)
    if generate > 0:
        caption_scores, texts = caption_evaluation(
            call, batches, device, dtype, tokenizer, generate, decoding, decode.max_text_tokens
        )
        scores |= caption_scores
        if image_tokenizer is not None:
            image_scores, real, generated = image_generation_evaluation(
                call, batches, emb, has, device, dtype, image_tokenizer, generate, decoding
            )
            scores |= image_scores
    return scores, texts, real, generated


def evaluate(
    weights: str,
    shards: str,
    samples: int,
    out_dir: Path | None,
    generate: int,
    decoding: Decoding,
    hard_negatives: int = 0,
    grid_rows: int = 8,
) -> dict:
    bundle, cfg = load_bundle(weights)
    if not stage_of(cfg).evaluates:
        raise ValueError(f"{weights} is a '{cfg.stage}' export; evaluation needs a pre-training export")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bundle.to(device)
    decode = replace(cfg.data.decode, paraphrases_per_sample=0, hard_negatives_per_sample=hard_negatives)
    batches = eval_batches(shards, decode, 32, samples)
    scores, texts, real, generated = evaluate_model(
        bundle.model,
        batches,
        device,
        torch.float32,
        load_tokenizer(cfg.data.decode.tokenizer),
        bundle.image_tokenizer if cfg.trained_image_tokenizer else None,
        decode,
        generate,
        decoding,
    )
    report = {"weights": str(weights), "samples": sum(len(b["keys"]) for b in batches), "scores": scores}
    if out_dir is not None and texts:
        out_dir.mkdir(parents=True, exist_ok=True)
        keys = [k for b in batches for k in b["keys"]]
        lines = [
            f"{key}: " + " | ".join(f"{source} '{captions[i]}'" for source, captions in texts.items())
            for i, key in enumerate(keys[: len(texts["reference"])])
        ]
        (out_dir / "captions.txt").write_text("\n".join(lines) + "\n")
        if len(generated):
            save_image(torch.cat([real, generated]), out_dir / "images.png", nrow=len(real))
        report["grid"] = str(write_grid(out_dir / "grid.png", real, generated, texts, grid_rows))
        report["captions"] = lines
        report["outputs"] = str(out_dir)
    return report
