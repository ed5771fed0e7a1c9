"""Which patch embedding teaches `tiny`'s vision tower shapes in few steps? For each `vision.stem`, contrastive-only
training in the plain loop (batch 32, lr 1e-3, bf16 autocast) on the demo's training shards, then linear
probes of the shape, count and colour from the tower's CLS (fitted on 800 training samples, scored on the
held-out ones; chance 1/4, 1/4, 1/8).

    python benchmarks/vision_stem_probe.py [--steps 300] [--seeds 0 1 2] [--train demo_data/train --eval demo_data/eval]
"""

from __future__ import annotations

import argparse
import time

import torch
from caption_decoder_probe import labels, probe_accuracy

from opt_ds.bench.plain import train_plain
from opt_ds.data.batch import to_device
from opt_ds.data.decode import DecodeConfig
from opt_ds.data.stream import ReaderConfig, SourceConfig, make_loader
from opt_ds.evaluate.retrieval import eval_batches
from opt_ds.model.config import VISION_STEMS, load_model_config
from opt_ds.model.opt import OPTModel
from opt_ds.tasks import TASKS, ScheduleConfig, StageConfig, TaskScheduler

DECODE = DecodeConfig(max_audio_seconds=2.0, max_text_tokens=24)


@torch.no_grad()
def picture_cls(model: OPTModel, batches: list[dict]) -> torch.Tensor:
    return torch.cat([model.unimodal(b).image[:, 0] for b in batches]).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="initial weights (the data order is fixed)"
    )
    parser.add_argument("--train", default="demo_data/train")
    parser.add_argument("--eval", default="demo_data/eval")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    fitting = [to_device(b, cpu, torch.float32, DECODE) for b in eval_batches(args.train, DECODE, 32, 800)]
    held_out = [to_device(b, cpu, torch.float32, DECODE) for b in eval_batches(args.eval, DECODE, 32, 200)]
    print(f"linear probes from the vision tower's CLS after {args.steps} contrastive steps (shape / count / colour):")
    for stem, seed in ((stem, seed) for stem in VISION_STEMS for seed in args.seeds):
        torch.manual_seed(seed)
        model = OPTModel(load_model_config("tiny", {"vision": {"stem": stem}}))
        loader = make_loader([SourceConfig("train", args.train)], DECODE, ReaderConfig(batch_size=32, num_workers=1))
        schedule = ScheduleConfig(mode="sum", stages=[StageConfig("contrastive", {"contrastive": 1.0})])
        began = time.perf_counter()
        train_plain(model, loader, TaskScheduler(schedule, TASKS), steps=args.steps, lr=1e-3, decode=DECODE)
        seconds = time.perf_counter() - began
        model.eval()
        x_fit, x_test = picture_cls(model, fitting), picture_cls(model, held_out)
        scores = [
            probe_accuracy(x_fit, labels(fitting, a), x_test, labels(held_out, a)) for a in ("shape", "count", "colour")
        ]
        print(
            f"  {stem:6s} seed {seed}  " + " / ".join(f"{s:.3f}" for s in scores) + f"   ({seconds:.0f} s of training)"
        )


if __name__ == "__main__":
    main()
