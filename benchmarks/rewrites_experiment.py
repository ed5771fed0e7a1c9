"""Do UNIMO's caption rewrites help? Contrastive-only training of `tiny` on synthetic triplets (plain loop).

Pre-trains without rewrites, then continues from those weights once per arm (none / hard negatives /
paraphrase + hard negatives) and evaluates each on held-out shards: retrieval R@1 and how often an image
(an audio clip) scores its own caption above all 3 of its hard negatives (chance 0.25).

    python benchmarks/rewrites_experiment.py [--pretrain-steps 400] [--steps 200] [--work /tmp/opt_ds_rewrites]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from opt_ds.bench.plain import train_plain
from opt_ds.data import build_shards
from opt_ds.data.decode import DecodeConfig
from opt_ds.data.stream import ReaderConfig, SourceConfig, make_loader
from opt_ds.evaluate.retrieval import embed_eval_set, eval_batches, retrieval
from opt_ds.model.config import load_model_config
from opt_ds.model.opt import OPTModel
from opt_ds.tasks import TASKS, ScheduleConfig, StageConfig, TaskScheduler

ARMS = {"no rewrites": (0, 0), "3 hard negatives": (0, 3), "1 paraphrase + 3 hard negatives": (1, 3)}
DECODE = {"max_audio_seconds": 2.0, "max_text_tokens": 24}


def train(work: Path, paraphrases: int, hard_negatives: int, steps: int, start: dict | None) -> tuple[OPTModel, float]:
    torch.manual_seed(0)
    model = OPTModel(load_model_config("tiny"))
    if start is not None:
        model.load_state_dict(start)
    decode = DecodeConfig(**DECODE, paraphrases_per_sample=paraphrases, hard_negatives_per_sample=hard_negatives)
    loader = make_loader(
        [SourceConfig("train", str(work / "train"))], decode, ReaderConfig(batch_size=32, num_workers=1)
    )
    scheduler = TaskScheduler(ScheduleConfig(mode="sum", stages=[StageConfig("c", {"contrastive": 1.0})]), TASKS)
    began = time.perf_counter()
    train_plain(model, loader, scheduler, steps=steps, lr=1e-3, decode=decode)
    return model.eval(), time.perf_counter() - began


def scores(model: OPTModel, work: Path) -> dict[str, float]:
    batches = eval_batches(str(work / "eval"), DecodeConfig(**DECODE, hard_negatives_per_sample=3), 50, 300)
    emb, has, hard_negatives = embed_eval_set(model, batches, torch.device("cpu"), torch.float32)
    return hard_negatives | retrieval(emb, has, [c for b in batches for c in b["captions"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path("/tmp/opt_ds_rewrites"))
    args = parser.parse_args()
    for name, num, seed in (("train", 2000, 0), ("eval", 300, 7)):
        if not (args.work / name / "sizes.json").exists():
            build_shards.main(
                [
                    "synthetic",
                    "--num",
                    str(num),
                    "--seed",
                    str(seed),
                    "--max-samples",
                    "250",
                    "--out",
                    str(args.work / name),
                    "--quiet",
                ]
            )
    base, seconds = train(args.work, 0, 0, args.pretrain_steps, None)
    print(f"pre-trained {args.pretrain_steps} steps without rewrites in {seconds:.0f} s")
    start = {k: v.clone() for k, v in base.state_dict().items()}
    rows = [("after pre-training", scores(base, args.work), seconds)]
    for name, (paraphrases, hard_negatives) in ARMS.items():
        model, seconds = train(args.work, paraphrases, hard_negatives, args.steps, start)
        rows.append((f"+{args.steps} steps, {name}", scores(model, args.work), seconds))
    print(
        "| run | image->text hard-negative acc | audio->text hard-negative acc | image->text R@1 | text->image R@1 "
        "| audio->text R@1 | s |\n|---|---|---|---|---|---|---|"
    )
    for name, s, seconds in rows:
        keys = (
            "image->text/hard_negative_acc",
            "audio->text/hard_negative_acc",
            "image->text/R@1",
            "text->image/R@1",
            "audio->text/R@1",
        )
        print(f"| {name} | " + " | ".join(f"{s['eval/' + k]:.3f}" for k in keys) + f" | {seconds:.0f} |")


if __name__ == "__main__":
    main()
