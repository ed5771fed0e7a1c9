"""`bench mfu`: model TFLOP/s of a real run and of the plain loop against a large bf16 matmul measured in the
same run on the same device, and against the vendor's bf16 peak on CUDA."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from opt_ds.bench.model import model_report
from opt_ds.bench.registry import Kind
from opt_ds.bench.runs import bench_shards, deepspeed_run
from opt_ds.train.metrics import cuda_peak_tflops, measure_matmul_peak_tflops


def mfu_report(model_name: str, zero: int, ranks: int, batch_per_rank: int, steps: int, warmup: int) -> dict:
    """Model TFLOP/s of a real run and of the plain loop against the bf16 matmul peak measured now (and the
    vendor's peak on CUDA)."""
    peak = measure_matmul_peak_tflops(8192 if torch.cuda.is_available() else 2048, threads=os.cpu_count())
    vendor = cuda_peak_tflops() if torch.cuda.is_available() else None
    plain = model_report(model_name, ranks * batch_per_rank, steps, warmup)
    with tempfile.TemporaryDirectory(prefix="opt_ds_bench_") as tmp:
        shards = bench_shards(model_name, 64 * ranks * batch_per_rank, Path(tmp) / "shards")
        run = deepspeed_run(model_name, zero, ranks, batch_per_rank, steps, warmup, shards, Path(tmp))
    devices = ranks if torch.cuda.is_available() else 1  # one CPU node holds all the ranks
    rows = [
        {"run": f"opt_ds ZeRO-{zero}, {ranks} ranks", "tflops": run["tflops"]},
        {"run": "plain PyTorch loop", "tflops": plain["train_tflops"]},
    ]
    for row in rows:
        row["mfu"] = row["tflops"] / (peak * devices)
        row["mfu_vs_vendor"] = row["tflops"] / (vendor * devices) if vendor else None
    return {
        "config": model_name,
        "global_batch": ranks * batch_per_rank,
        "measured_peak_tflops": peak,
        "vendor_peak_tflops": vendor,
        "rows": rows,
    }


def mfu_table(report: dict) -> str:
    r = report
    vendor = f"{r['vendor_peak_tflops']:.0f} TFLOP/s" if r["vendor_peak_tflops"] else "n/a (CPU)"
    lines = [
        f"{r['config']}, global batch {r['global_batch']}; bf16 matmul peak measured in this run: "
        f"{r['measured_peak_tflops']:.3f} TFLOP/s per device; vendor peak: {vendor}",
        "",
        "| run | model TFLOP/s | MFU (measured peak) | MFU (vendor peak) |",
        "|---|---|---|---|",
    ]
    for row in r["rows"]:
        vs_vendor = f"{row['mfu_vs_vendor']:.1%}" if row["mfu_vs_vendor"] is not None else "n/a"
        lines.append(f"| {row['run']} | {row['tflops']:.3f} | {row['mfu']:.1%} | {vs_vendor} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zero", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-per-rank", type=int, default=8)


KIND = Kind(
    "mfu",
    "model TFLOP/s against the measured (and vendor) bf16 peak",
    add_arguments,
    lambda a: mfu_report(a.config, a.zero, a.ranks, a.batch_per_rank, a.steps, a.warmup),
    mfu_table,
)
