"""`bench scale`: the largest named config that completes training steps with ZeRO-3 alone, with CPU offload and
with NVMe offload to a local folder; parameters and seconds per step."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import psutil

from opt_ds.bench.registry import Kind
from opt_ds.bench.runs import RunFailed, bench_shards, deepspeed_run
from opt_ds.config.experiment import REPO_ROOT
from opt_ds.model.config import load_model_config
from opt_ds.model.size import parameter_count

NVME_BYTES_PER_PARAM = 18  # swapped: bf16 weights, fp32 master copy, Adam moments, fp32 gradients
SCALE_MODES = {
    "zero3": "zero3_bf16.json",
    "cpu_offload": "zero3_offload_cpu.json",
    "nvme_offload": "zero3_offload_nvme.json",
}


def scale_report(
    configs: list[str], modes: list[str], ranks: int, nvme_dir: Path | None, steps: int, warmup: int
) -> dict:
    """For each mode, the named configs in order of size until one cannot train (batch 1 per rank)."""
    rows, largest = [], {}
    configs = sorted(configs, key=lambda c: parameter_count(load_model_config(c))["total"])
    with tempfile.TemporaryDirectory(prefix="opt_ds_bench_") as tmp:
        work = Path(tmp)
        swap = nvme_dir or work / "nvme"
        swap.mkdir(parents=True, exist_ok=True)
        for mode in modes:
            ds_config = json.loads((REPO_ROOT / "ds_configs" / SCALE_MODES[mode]).read_text())
            if mode == "nvme_offload":
                for part in ("offload_optimizer", "offload_param"):
                    ds_config["zero_optimization"][part]["nvme_path"] = str(swap)
            ds_path = work / f"{mode}.json"
            ds_path.write_text(json.dumps(ds_config))
            for name in configs:
                shards = work / f"shards_{name}"
                if not shards.exists():
                    bench_shards(name, 16 * ranks, shards)
                row = {"mode": mode, "config": name, "parameters": parameter_count(load_model_config(name))["total"]}
                swap_bytes, free = NVME_BYTES_PER_PARAM * row["parameters"], shutil.disk_usage(swap).free
                if mode == "nvme_offload" and swap_bytes > free:  # a run that fails after writing the disk full
                    row.update(ok=False, reason=f"needs ~{swap_bytes / 1e9:.0f} GB of swap, {free / 1e9:.0f} GB free")
                    rows.append(row)
                    break
                try:
                    run = deepspeed_run(
                        name, 3, ranks, 1, steps, warmup, shards, work, ds_config=ds_path, name=f"{mode}_{name}"
                    )
                    row.update(ok=True, step_s=run["step_s"], peak_mb=run["peak_mb"])
                    largest[mode] = {"config": name, "parameters": row["parameters"]}
                except RunFailed as exc:
                    row.update(ok=False, reason=exc.reason())
                finally:
                    for swapped in swap.iterdir():  # this run's swap files
                        shutil.rmtree(swapped) if swapped.is_dir() else swapped.unlink()
                rows.append(row)
                if not row["ok"]:
                    break
    ratio = None
    if "zero3" in largest and "nvme_offload" in largest:
        ratio = largest["nvme_offload"]["parameters"] / largest["zero3"]["parameters"]
    return {
        "ranks": ranks,
        "memory_gib": psutil.virtual_memory().total / 2**30,
        "rows": rows,
        "largest": largest,
        "nvme_vs_zero3": ratio,
    }


def scale_table(report: dict) -> str:
    r = report
    lines = [
        f"{r['ranks']} rank(s), batch 1, every task each step, {r['memory_gib']:.0f} GiB of memory",
        "",
        "| mode | config | parameters | trains? | s/step | peak MiB | why not |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['mode']} | {row['config']} | {row['parameters'] / 1e6:,.0f}M | {'yes' if row['ok'] else 'no'} | "
            + (f"{row['step_s']:.1f} | {row['peak_mb']:,.0f} | |" if row["ok"] else f" | | {row['reason']} |")
        )
    lines.append("")
    lines += [
        f"Largest that trains with {mode}: {v['config']} ({v['parameters'] / 1e6:,.0f}M)"
        for mode, v in r["largest"].items()
    ]
    if r["nvme_vs_zero3"]:
        lines.append(f"\nNVMe offload trains a model {r['nvme_vs_zero3']:.1f}x larger than ZeRO-3 without offload.")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", default="tiny,small,base,large,xl", help="comma list of named configs")
    parser.add_argument("--modes", default=",".join(SCALE_MODES), help=f"comma list of {', '.join(SCALE_MODES)}")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument(
        "--nvme-path", type=Path, default=None, help="swap folder for NVMe offload (default: a temp folder)"
    )


KIND = Kind(
    "scale",
    "largest config that trains per offload mode",
    add_arguments,
    lambda a: scale_report(a.configs.split(","), a.modes.split(","), a.ranks, a.nvme_path, a.steps, a.warmup),
    scale_table,
)
