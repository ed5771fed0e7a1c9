"""`bench memory`: per-rank model state (parameters, gradients, optimizer state, counted on the engine's tensors)
under ZeRO stages against the 16 bytes/param accounting, and a step's peak with activation checkpointing off and on."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from opt_ds.bench.registry import Kind, comma_ints
from opt_ds.bench.runs import bench_shards, deepspeed_run
from opt_ds.model.config import load_model_config
from opt_ds.model.size import parameter_count
from opt_ds.train import memory


def memory_report(model_name: str, zeros: list[int], ranks: int, batch_per_rank: int, steps: int, warmup: int) -> dict:
    """Per-rank model state (largest rank) of real runs per ZeRO stage against 16 B/param accounting, and the
    step's transient memory under ZeRO-3 with activation checkpointing off and on."""
    parameters = parameter_count(load_model_config(model_name))["total"]
    rows, runs = [], {}
    warmup = max(warmup, 1)  # the trainer records model state in the second step
    with tempfile.TemporaryDirectory(prefix="opt_ds_bench_") as tmp:
        shards = bench_shards(model_name, 64 * ranks * batch_per_rank, Path(tmp) / "shards")
        for zero, checkpointing in [(z, False) for z in zeros] + [(3, True)] + ([(3, False)] if 3 not in zeros else []):
            runs[zero, checkpointing] = deepspeed_run(
                model_name, zero, ranks, batch_per_rank, steps, warmup, shards, Path(tmp), checkpointing
            )
    for zero in zeros:
        per_rank = runs[zero, False]["memory"]["model_state_bytes_per_rank"]
        largest = max(per_rank, key=lambda b: b["parameters"] + b["gradients"] + b["optimizer"])
        state = largest["parameters"] + largest["gradients"] + largest["optimizer"]
        expected = memory.expected_model_state_bytes(parameters, zero, ranks)
        rows.append(
            {
                "zero": zero,
                "bytes": largest,
                "model_state_bytes": state,
                "expected_bytes": expected,
                "ratio_vs_expected": state / expected,
                "bytes_per_param": state / parameters,
            }
        )
    checkpointing = [
        {
            "activation_checkpointing": ckpt,
            "peak_mb": runs[3, ckpt]["peak_mb"],
            "transient_mb": runs[3, ckpt]["transient_mb"],
        }
        for ckpt in (False, True)
    ]
    return {
        "config": model_name,
        "parameters": parameters,
        "ranks": ranks,
        "batch_per_rank": batch_per_rank,
        "peak_kind": "CUDA allocated" if torch.cuda.is_available() else "resident (RSS)",
        "rows": rows,
        "checkpointing": checkpointing,
    }


def memory_table(report: dict) -> str:
    r, mib = report, 2**20
    lines = [
        f"{r['config']}: {r['parameters'] / 1e6:.1f}M parameters, {r['ranks']} ranks; model state of the largest "
        "rank between backward and optimizer step; expected: 2 B weights + 2 B gradients + 12 B Adam state per "
        "parameter, divided by the ranks as the ZeRO stage partitions them",
        "",
        "| ZeRO | parameters MiB | gradients MiB | optimizer MiB | model state MiB | expected MiB | ratio | B/param "
        "| other buffers MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        b = row["bytes"]
        lines.append(
            f"| {row['zero']} | {b['parameters'] / mib:.1f} | {b['gradients'] / mib:.1f} | "
            f"{b['optimizer'] / mib:.1f} | "
            f"{row['model_state_bytes'] / mib:.1f} | {row['expected_bytes'] / mib:.1f} | "
            f"{row['ratio_vs_expected']:.3f} | {row['bytes_per_param']:.2f} | {b['other'] / mib:.1f} |"
        )
    lines += [
        "",
        f"ZeRO-3, batch {r['batch_per_rank']} per rank: peak {r['peak_kind']} memory of the largest rank, and how far "
        "a step rises above its start (activations, gathered parameters, temporaries):",
        "",
        "| activation checkpointing | peak MiB | step transient MiB |",
        "|---|---|---|",
    ]
    for c in r["checkpointing"]:
        lines.append(
            f"| {'on' if c['activation_checkpointing'] else 'off'} | {c['peak_mb']:.0f} | {c['transient_mb']:.0f} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zero", default="0,2,3", help="comma list of ZeRO stages")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-per-rank", type=int, default=8)


KIND = Kind(
    "memory",
    "model-state bytes per ZeRO stage; activation checkpointing peaks",
    add_arguments,
    lambda a: memory_report(a.config, comma_ints(a.zero), a.ranks, a.batch_per_rank, a.steps, a.warmup),
    memory_table,
)
