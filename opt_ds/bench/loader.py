"""`bench loader`: decode samples/s of the data loader with 0..W workers against the samples/s a real ZeRO-3 run
consumes per rank, and the share of step time that run spent waiting for data; then what one worker delivers of
224 px + 10 s audio + caption samples from JPEGs of given sizes, against the cost of each decode step."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from opt_ds.bench.decode_cost import decode_report, decode_table
from opt_ds.bench.registry import Kind, comma_ints
from opt_ds.bench.runs import bench_shards, decode_config, deepspeed_run


def loader_report(
    model_name: str,
    workers: list[int],
    ranks: int,
    batch_per_rank: int,
    steps: int,
    warmup: int,
    decode_image_sizes: list[int],
    decode_samples: int,
) -> dict:
    """Loader capacity (samples/s with W workers, one process) against what a real ZeRO-3 run consumes per rank;
    per-worker decode rates and step costs at the sizes of a real run."""
    from opt_ds.data.inspect import inspect_shards

    with tempfile.TemporaryDirectory(prefix="opt_ds_bench_") as tmp:
        shards = bench_shards(model_name, 1024, Path(tmp) / "shards")
        capacity = {
            w: inspect_shards([str(shards)], None, decode_config(model_name), w, batch_per_rank)["samples_per_s"]
            for w in workers
        }
        run = deepspeed_run(model_name, 3, ranks, batch_per_rank, steps, warmup, shards, Path(tmp))
        decode = decode_report(decode_image_sizes, decode_samples, 16, Path(tmp))
    per_rank = run["samples_per_s"] / ranks
    return {
        "config": model_name,
        "loader_samples_per_s": capacity,
        "train_samples_per_s_per_rank": per_rank,
        "headroom": {w: c / per_rank for w, c in capacity.items()},
        "data_wait_frac": run["data_wait_frac"],
        "ranks": ranks,
        "decode": decode,
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
        f"{r['data_wait_frac']:.1%} of the step time (median over steps, the slowest rank).\n"
    )
    if r["decode"]:
        lines.append(decode_table(r["decode"]))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", default="0,1,2", help="comma list of loader worker counts")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-per-rank", type=int, default=16)
    parser.add_argument(
        "--decode-image-sizes", default="256,1024", help="JPEG sizes of the per-worker decode measurement ('': none)"
    )
    parser.add_argument("--decode-samples", type=int, default=512, help="samples per JPEG size")


KIND = Kind(
    "loader",
    "loader samples/s vs what training consumes; data-wait share",
    add_arguments,
    lambda a: loader_report(
        a.config,
        comma_ints(a.workers),
        a.ranks,
        a.batch_per_rank,
        a.steps,
        a.warmup,
        comma_ints(a.decode_image_sizes) if a.decode_image_sizes else [],
        a.decode_samples,
    ),
    loader_table,
)
