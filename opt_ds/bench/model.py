"""`bench model`: forward+backward samples/s of a named config in the plain loop (every task each step, fused
AdamW, bf16 autocast), with its parameters and FLOPs per sample."""

from __future__ import annotations

import argparse
import statistics

from opt_ds.bench.plain import step_times
from opt_ds.bench.registry import Kind
from opt_ds.bench.runs import synthetic_batch
from opt_ds.model.config import load_model_config
from opt_ds.model.size import forward_flops, lengths_for, parameter_count
from opt_ds.tasks import DEFAULT_TASKS, build_tasks
from opt_ds.train.metrics import step_flops


def model_report(model_name: str, batch_size: int, steps: int, warmup: int) -> dict:
    cfg = load_model_config(model_name)
    seconds = statistics.median(step_times(model_name, synthetic_batch(model_name, batch_size), steps, warmup))
    flops = step_flops(cfg, build_tasks(), [(n, 1.0) for n in DEFAULT_TASKS], synthetic_batch(model_name, 1))
    return {
        "config": model_name,
        "parameters": parameter_count(cfg)["total"],
        "fwd_gflops_per_sample_max_lengths": forward_flops(cfg, lengths_for(cfg))["total"] / 1e9,
        "batch": batch_size,
        "step_s": seconds,
        "samples_per_s": batch_size / seconds,
        "train_tflops": flops * batch_size / seconds / 1e12,
    }


def model_table(r: dict) -> str:
    return (
        "| config | parameters | fwd GFLOP/sample (max lengths) | batch | step s | samples/s | achieved TFLOP/s |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {r['config']} | {r['parameters'] / 1e6:.1f}M | {r['fwd_gflops_per_sample_max_lengths']:.2f} | "
        f"{r['batch']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | {r['train_tflops']:.3f} |"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=8)


KIND = Kind(
    "model",
    "forward+backward samples/s of the plain model",
    add_arguments,
    lambda a: model_report(a.config, a.batch, a.steps, a.warmup),
    model_table,
)
