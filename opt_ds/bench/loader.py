"""`bench loader`: decode samples/s of the data loader with 0..W workers against the samples/s a real ZeRO-3 run
consumes per rank, and the share of step time that run spent waiting for data."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from opt_ds.bench.registry import Kind, comma_ints
from opt_ds.bench.runs import bench_shards, decode_config, deepspeed_run


def loader_report(
    model_name: str, workers: list[int], ranks: int, batch_per_rank: int, steps: int, warmup: int
) -> dict:
    """Loader capacity (samples/s with W workers, one process) against what a real ZeRO-3 run consumes per rank."""
    from opt_ds.data.inspect import inspect_shards

    with tempfile.TemporaryDirectory(prefix="opt_ds_bench_") as tmp:
        shards = bench_shards(model_name, 1024, Path(tmp) / "shards")
        capacity = {
            w: inspect_shards([str(shards)], None, decode_config(model_name), w, batch_per_rank)["samples_per_s"]
            for w in workers
        }
        run = deepspeed_run(model_name, 3, ranks, batch_per_rank, steps, warmup, shards, Path(tmp))
    per_rank = run["samples_per_s"] / ranks
    return {
        "config": model_name,
        "loader_samples_per_s": capacity,
        "train_samples_per_s_per_rank": per_rank,
        "headroom": {w: c / per_rank for w, c in capacity.items()},
        "data_wait_frac": run["data_wait_frac"],
        "ranks": ranks,
    }


def loader_table(report: dict) -> str:
    r = report
    lines = [
        "| loader workers | loader samples/s | training consumes (samples/s per rank) | headroom |",
        "|---|---|---|---|",
    ]
    for w, c in r["loader_samples_per_s"].items():
        lines.append(f"| {w} | {c:.1f} | {r['train_samples_per_s_per_rank']:.1f} | {r['headroom'][w]:.1f}x |")
    lines.append(
        f"\nIn the real run ({r['ranks']} ranks, ZeRO-3, 1 worker per rank) the ranks waited for data "
        f"{r['data_wait_frac']:.1%} of the step time (median over steps, the slowest rank)."
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", default="0,1,2", help="comma list of loader worker counts")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-per-rank", type=int, default=16)


KIND = Kind(
    "loader",
    "loader samples/s vs what training consumes; data-wait share",
    add_arguments,
    lambda a: loader_report(a.config, comma_ints(a.workers), a.ranks, a.batch_per_rank, a.steps, a.warmup),
    loader_table,
)
