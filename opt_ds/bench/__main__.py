"""Measure speed, memory and learning against references: `python -m opt_ds.bench KIND ... [--record]`.

- model: forward+backward samples/s of a named config in a plain PyTorch loop (all tasks each step,
  fused AdamW, bf16 autocast), with its parameters and FLOPs per sample.
- throughput: real `opt_ds.train` runs under DeepSpeed (ZeRO stages x rank counts) against the plain
  loop at the same global batch, as ratios; MFU against the device peak measured in the same run.
- mfu: model TFLOP/s of a real run and of the plain loop against a large bf16 matmul measured in the
  same run on the same device, and against the vendor's bf16 peak on CUDA.
- memory: per-rank model state (parameters, gradients, optimizer state, counted on the engine's tensors)
  under ZeRO stages against the 16 bytes/param accounting, and a step's peak with activation
  checkpointing off and on.
- scale: the largest named config that completes training steps with ZeRO-3 alone, with CPU offload and
  with NVMe offload to a local folder; parameters and seconds per step.
- loader: decode samples/s of the data loader with 0..W workers against the samples/s a real ZeRO-3 run
  consumes per rank, and the share of step time that run spent waiting for data.
- learning: opt_ds (contrastive only, and every task) against open_clip on the same shards, steps and batch:
  retrieval by one rule, and what opt_ds generates.
- plot: benchmarks/bench.png (throughput and model state per config) from the recorded figures.
- curves: a run's learning curves (training loss per task, held-out scores) from its TensorBoard files.
Each kind is a module of opt_ds/bench/ (see registry.py). Warm-up steps are excluded; step times are medians.
`--record` appends the table, the command, the machine and the commit to BENCHMARKS.md, and the figures to
benchmarks/records.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys

from opt_ds.bench.record import record
from opt_ds.bench.registry import kinds


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m opt_ds.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    measured = argparse.ArgumentParser(add_help=False)
    measured.add_argument("--config", default="tiny")
    measured.add_argument("--steps", type=int, default=8, help="measured steps (after warm-up)")
    measured.add_argument("--warmup", type=int, default=2)
    reported = argparse.ArgumentParser(add_help=False)
    reported.add_argument("--json", action="store_true")
    reported.add_argument("--record", action="store_true", help="append the result to BENCHMARKS.md")
    registry = kinds()
    for kind in registry.values():
        parents = ([measured] if kind.measures_a_config else []) + ([reported] if kind.table else [])
        kind.add_arguments(sub.add_parser(kind.name, parents=parents, help=kind.help))
    args = parser.parse_args(argv)
    kind = registry[args.kind]
    report = kind.run(args)
    if kind.table is None:  # a drawing: its path
        print(report)
        return 0
    text = kind.table(report)
    print(json.dumps(report) if args.json else text)
    if args.record:
        record(kind.name, argv, text, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
