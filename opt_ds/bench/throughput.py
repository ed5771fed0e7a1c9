"""`bench throughput`: real `opt_ds.train` runs under DeepSpeed (ZeRO stages x rank counts) against the plain
loop at the same global batch, as ratios; MFU against the device peak measured in the same run."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from opt_ds.bench.plain import step_times
from opt_ds.bench.registry import Kind, comma_ints
from opt_ds.bench.runs import bench_shards, deepspeed_run, synthetic_batch
from opt_ds.train.metrics import measure_matmul_peak_tflops


def throughput_report(
    model_name: str, zeros: list[int], ranks: list[int], batch_per_rank: int, steps: int, warmup: int, repeats: int = 1
) -> dict:
    """Each DeepSpeed run right after a plain-loop run of the same global batch (a shared machine drifts), the pair
    `repeats` times; the row of the pair with the median ratio, and every pair's ratio."""
    rows = []
    peak = measure_matmul_peak_tflops(threads=os.cpu_count())
    with tempfile.TemporaryDirectory(prefix="opt_ds_bench_") as tmp:
        shards = bench_shards(model_name, 64 * max(ranks) * batch_per_rank, Path(tmp) / "shards")
        for n in ranks:
            for zero in zeros:
                pairs = []
                for repeat in range(repeats):
                    global_batch = n * batch_per_rank
                    plain = global_batch / statistics.median(
                        step_times(model_name, synthetic_batch(model_name, global_batch), steps, warmup)
                    )
                    row = deepspeed_run(
                        model_name,
                        zero,
                        n,
                        batch_per_rank,
                        steps,
                        warmup,
                        shards,
                        Path(tmp),
                        name=f"zero{zero}_ranks{n}_{repeat}",
                    )
                    row["mfu"] = row["tflops"] / peak  # the peak measured here, the same for every row
                    row["plain_samples_per_s"] = plain
                    row["ratio_vs_plain"] = row["samples_per_s"] / plain
                    pairs.append(row)
                ratios = [row["ratio_vs_plain"] for row in pairs]
                median_pair = sorted(pairs, key=lambda row: row["ratio_vs_plain"])[(len(pairs) - 1) // 2]
                rows.append({**median_pair, "ratios": ratios})
    return {"config": model_name, "device_peak_tflops": peak, "repeats": repeats, "rows": rows}


def throughput_table(report: dict) -> str:
    repeats = report.get("repeats", 1)
    lines = [
        f"device peak (bf16 matmul, measured): {report['device_peak_tflops']:.3f} TFLOP/s"
        + (f"; {repeats} plain/DeepSpeed pairs per row, the pair with the median ratio shown" if repeats > 1 else ""),
        "",
        "| ZeRO | ranks | global batch | step s | samples/s | plain loop samples/s | ratio | TFLOP/s | MFU |"
        + (" ratio of each pair |" if repeats > 1 else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if repeats > 1 else ""),
    ]
    for r in report["rows"]:
        each = " " + ", ".join(f"{x:.2f}" for x in r["ratios"]) + " |" if repeats > 1 else ""
        lines.append(
            f"| {r['zero']} | {r['ranks']} | {r['global_batch']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | "
            f"{r['plain_samples_per_s']:.1f} | {r['ratio_vs_plain']:.2f} | {r['tflops']:.3f} | {r['mfu']:.1%} |{each}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zero", default="0,2,3", help="comma list of ZeRO stages")
    parser.add_argument("--ranks", default="1,2", help="comma list of rank counts")
    parser.add_argument("--batch-per-rank", type=int, default=8)
    parser.add_argument(
        "--repeats", type=int, default=1, help="plain/DeepSpeed pairs per row; the median ratio is reported"
    )


KIND = Kind(
    "throughput",
    "DeepSpeed ZeRO stages x ranks vs the plain loop, and MFU",
    add_arguments,
    lambda a: throughput_report(
        a.config, comma_ints(a.zero), comma_ints(a.ranks), a.batch_per_rank, a.steps, a.warmup, a.repeats
    ),
    throughput_table,
)
