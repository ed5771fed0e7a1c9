"""Which tower makes opt_ds's alignment differ from open_clip's? Swap them, one process, one data order.

Trains image-text contrastive models whose text and vision towers each come from opt_ds (BERT with its
[CLS] or its mean token, on BERT's WordPiece ids or on open_clip's BPE ids;
the timm ViT) or from open_clip 3.3.0 (its causal text transformer pooled at the end
token; its ViT), all at the `tiny` sizes (2 layers x 128, 64 px, 8 px patches), with one loss, optimiser,
schedule and batch order, and scores each on held-out samples by opt_ds's retrieval rule. Everything but the
towers is held fixed, so a difference between rows is the towers'.

    python benchmarks/tower_swap_experiment.py [--steps 600] [--seeds 0,1] [--work .cache/bench_learning]

The shards are `python -m opt_ds.bench learning`'s (built there when missing); open_clip is installed into
.cache/open_clip as for that benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from opt_ds.bench.learning import synthetic_image_text
from opt_ds.bench.open_clip_peer import OPEN_CLIP_VOCAB, PEER_MODEL, ensure_open_clip, peer_model_config
from opt_ds.data.batch import normalised_images
from opt_ds.data.decode import DecodeConfig, SampleDecoder
from opt_ds.evaluate.scoring import recall_at, same_caption
from opt_ds.model.config import load_model_config
from opt_ds.model.encoders import TextEncoder, VisionEncoder, mean_pool
from opt_ds.zero.engine import parameter_groups

VARIANTS = (
    "open_clip/open_clip",
    "bert_cls/timm",
    "bert_mean/timm",
    "open_clip/timm",
    "bert_cls/open_clip",
    "bert_cls_bpe/timm",
)
TEXT_TOKENS = 24


def read_pairs(shards: Path) -> list[tuple[bytes, str]]:
    pairs = []
    for shard in sorted(shards.glob("*.tar")):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        pairs += [(s["jpg"], s["txt"].decode()) for s in samples.values()]
    return pairs


class SwappedTowers(nn.Module):
    """A text and a vision tower, each from opt_ds or from open_clip, projected to one normalised space."""

    def __init__(self, text: str, vision: str, clip: nn.Module):
        super().__init__()
        cfg = load_model_config("tiny")
        self.text_kind, self.vision_kind, self.clip = text, vision, clip
        if text.startswith("bert"):
            text_cfg = replace(cfg.text, vocab_size=OPEN_CLIP_VOCAB) if text.endswith("_bpe") else cfg.text
            self.text, self.text_proj = TextEncoder(text_cfg), nn.Linear(cfg.text.hidden, cfg.contrastive_dim)
        if vision == "timm":
            self.vision, self.vision_proj = VisionEncoder(cfg.vision), nn.Linear(cfg.vision.hidden, cfg.contrastive_dim)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))

    def encode_text(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.text_kind == "open_clip":
            return F.normalize(self.clip.encode_text(ids).float(), dim=-1)
        tokens = self.text(ids, valid)
        pooled = mean_pool(tokens, valid) if self.text_kind == "bert_mean" else tokens[:, 0]
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        out = (
            self.clip.encode_image(images)
            if self.vision_kind == "open_clip"
            else self.vision_proj(self.vision(images)[:, 0])
        )
        return F.normalize(out.float(), dim=-1)


def run_variant(variant: str, seed: int, data: dict, steps: int, batch: int) -> dict:
    """AdamW lr 5e-4, wd 0.1 (opt_ds's groups: none on 1-d parameters, norms, biases, position and class tokens,
    as open_clip), betas (0.9, 0.98), eps 1e-6, 30 warm-up steps then cosine to 0, bf16 autocast: `bench
    learning`'s settings."""
    import open_clip

    text, vision = variant.split("/")
    torch.manual_seed(seed)
    model = SwappedTowers(text, vision, open_clip.create_model(PEER_MODEL))
    optimizer = torch.optim.AdamW(
        parameter_groups(model, weight_decay=0.1, lr=5e-4, lr_scale={}), lr=5e-4, betas=(0.9, 0.98), eps=1e-6
    )
    warmup = 30
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))),
    )
    ids = "open_clip_text" if text.startswith("open_clip") or text.endswith("_bpe") else "bert_text"
    order = torch.cat(
        [
            torch.randperm(len(data["images"]), generator=torch.Generator().manual_seed(1234 + epoch))
            for epoch in range(steps * batch // len(data["images"]) + 1)
        ]
    )  # one order for every variant
    start = time.time()
    for step in range(steps):
        rows = order[step * batch : (step + 1) * batch]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            image, caption = model.encode_image(data["images"][rows]), model.encode_text(*(t[rows] for t in data[ids]))
        logits = model.logit_scale.clamp(0, math.log(100)).exp() * image @ caption.t()
        target = torch.arange(len(rows))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        image = model.encode_image(data["eval_images"])
        caption = model.encode_text(*data[f"eval_{ids}"])
    correct = same_caption(data["eval_captions"])
    return {
        "variant": variant,
        "seed": seed,
        "text->image/R@1": round(recall_at(caption @ image.t(), correct, (1,))[1], 3),
        "image->text/R@1": round(recall_at(image @ caption.t(), correct, (1,))[1], 3),
        "final_loss": round(loss.item(), 3),
        "seconds": round(time.time() - start),
    }


def load_data(train: Path, eval_shards: Path) -> dict:
    """Both tokenizers' ids for every caption, and the pictures as opt_ds decodes them (one preprocessing for all)."""
    import open_clip

    decoder = SampleDecoder(DecodeConfig(image_size=64, max_text_tokens=TEXT_TOKENS))
    clip_tokenizer = open_clip.get_tokenizer(PEER_MODEL)
    data = {}
    for prefix, shards in (("", train), ("eval_", eval_shards)):
        pairs = read_pairs(shards)
        captions = [c for _, c in pairs]
        bert = decoder.tokenizer(
            captions, padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt"
        )
        clip_ids = clip_tokenizer(captions)
        data |= {
            f"{prefix}images": normalised_images(torch.stack([decoder.image(jpg) for jpg, _ in pairs])),
            f"{prefix}captions": captions,
            f"{prefix}bert_text": (bert["input_ids"], bert["attention_mask"].bool()),
            f"{prefix}open_clip_text": (clip_ids, clip_ids != 0),
        }
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="text/vision: " + ", ".join(VARIANTS))
    parser.add_argument("--work", type=Path, default=Path(".cache/bench_learning"))
    args = parser.parse_args()
    train, eval_shards = synthetic_image_text(args.work, 200)
    sys.path.insert(0, str(ensure_open_clip()))
    import open_clip

    open_clip.add_model_config(
        str(peer_model_config(args.work / "open_clip_configs", "tiny", load_model_config("tiny").contrastive_dim))
    )
    data = load_data(train, eval_shards)
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            print(json.dumps(run_variant(variant, seed, data, args.steps, args.batch)), flush=True)


if __name__ == "__main__":
    main()
