"""Measure speed against references, in one run: `python -m opt_ds.bench {model,throughput,loader} ... [--record]`.

- model: forward+backward samples/s of a named config in a plain PyTorch loop (all tasks each step,
  AdamW, bf16 autocast), with its parameters and FLOPs per sample.
- throughput: real `opt_ds.train` runs under DeepSpeed (ZeRO stages x rank counts) against the plain
  loop at the same global batch, as ratios; MFU against the device peak measured in the same run.
- loader: decode samples/s of the data loader with 0..W workers against the samples/s a real ZeRO-3 run
  consumes per rank, and the share of step time that run spent waiting for data.
Warm-up steps are excluded; step times are medians. `--record` appends the table, the command, the
machine and the commit to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import yaml

from opt_ds.config import REPO_ROOT
from opt_ds.data import build_shards
from opt_ds.data.collate import collate
from opt_ds.data.decode import DecodeConfig, SampleDecoder
from opt_ds.data.synthetic import synthetic_sample
from opt_ds.launch import free_port
from opt_ds.metrics import measure_matmul_peak_tflops, step_flops
from opt_ds.model.config import load_model_config
from opt_ds.model.opt import OPTModel
from opt_ds.model.size import forward_flops, lengths_for, parameter_count
from opt_ds.model.vqvae import VQVAE
from opt_ds.tasks import TASKS, TaskContext, run_tasks, step_generator

AUDIO_SECONDS = 2.0
TEXT_TOKENS = 32


def decode_config(model_name: str) -> DecodeConfig:
    cfg = load_model_config(model_name)
    return DecodeConfig(image_size=cfg.vision.image_size, max_audio_seconds=AUDIO_SECONDS, max_text_tokens=TEXT_TOKENS)


def synthetic_batch(model_name: str, batch_size: int) -> dict:
    decode = decode_config(model_name)
    decoder = SampleDecoder(decode)
    samples = [decoder(synthetic_sample(i, image_size=decode.image_size, audio_seconds=AUDIO_SECONDS))[0]
               for i in range(batch_size)]
    return collate(samples, decode)


def plain_step_times(model_name: str, batch_size: int, steps: int, warmup: int) -> list[float]:
    """Seconds per step of the plain loop: every task each step, bf16 autocast, AdamW."""
    torch.manual_seed(0)
    cfg = load_model_config(model_name)
    model, vq = OPTModel(cfg).train(), VQVAE(cfg.vq).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tasks = {name: cls() for name, cls in TASKS.items()}
    plan = [(name, 1.0) for name in TASKS]
    batch = synthetic_batch(model_name, batch_size)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        ctx = TaskContext(step_generator(0, step, 0), vq)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model(partial(run_tasks, batch=batch, plan=plan, ctx=ctx, tasks=tasks))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def model_report(model_name: str, batch_size: int, steps: int, warmup: int) -> dict:
    cfg = load_model_config(model_name)
    seconds = statistics.median(plain_step_times(model_name, batch_size, steps, warmup))
    batch = synthetic_batch(model_name, 1)
    flops = step_flops(cfg, {n: c() for n, c in TASKS.items()}, [(n, 1.0) for n in TASKS], batch)
    return {"config": model_name, "parameters": parameter_count(cfg)["total"],
            "fwd_gflops_per_sample_max_lengths": forward_flops(cfg, lengths_for(cfg))["total"] / 1e9,
            "batch": batch_size, "step_s": seconds, "samples_per_s": batch_size / seconds,
            "train_tflops": flops * batch_size / seconds / 1e12}


def deepspeed_run(model_name: str, zero: int, ranks: int, batch_per_rank: int, steps: int, warmup: int,
                  shards: Path, workdir: Path) -> dict:
    """One real training run; step times and MFU from its TensorBoard scalars."""
    config = {
        "model": model_name,
        "deepspeed": str(REPO_ROOT / "ds_configs" / f"zero{zero}_bf16.json"),
        "data": {"sources": [{"name": "synthetic", "shards": str(shards)}],
                 "decode": {"image_size": load_model_config(model_name).vision.image_size,
                            "max_audio_seconds": AUDIO_SECONDS, "max_text_tokens": TEXT_TOKENS},
                 "reader": {"batch_size": batch_per_rank, "num_workers": 1}},
        "schedule": {"mode": "sum", "stages": [{"name": "all", "tasks": {t: 1.0 for t in TASKS}}]},
        "train": {"steps": warmup + steps, "log_every": 1, "save_every": 0},
    }
    run_dir = workdir / f"zero{zero}_ranks{ranks}"
    config_path = workdir / f"zero{zero}_ranks{ranks}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
           "--module", "opt_ds.train", "--config", str(config_path), "--output", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    scalars = _scalars(run_dir / "tb", ("perf/step_time_s", "perf/mfu", "perf/tflops", "perf/data_wait_frac"))
    measured = sorted(scalars["perf/step_time_s"])[warmup:]
    step_s = statistics.median(scalars["perf/step_time_s"][s] for s in measured)
    return {"zero": zero, "ranks": ranks, "global_batch": ranks * batch_per_rank, "step_s": step_s,
            "samples_per_s": ranks * batch_per_rank / step_s,
            "mfu": statistics.median(scalars["perf/mfu"][s] for s in measured),
            "tflops": statistics.median(scalars["perf/tflops"][s] for s in measured),
            "data_wait_frac": statistics.median(scalars["perf/data_wait_frac"][s] for s in measured)}


def _scalars(tb_dir: Path, tags: tuple[str, ...]) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags}


def bench_shards(model_name: str, samples: int, out: Path) -> Path:
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the report
        build_shards.main(["synthetic", "--num", str(samples), "--max-samples", "64",
                           "--image-size", str(load_model_config(model_name).vision.image_size),
                           "--audio-seconds", str(AUDIO_SECONDS), "--out", str(out), "--quiet"])
    return out


def throughput_report(model_name: str, zeros: list[int], ranks: list[int], batch_per_rank: int, steps: int,
                      warmup: int) -> dict:
    rows = []
    peak = measure_matmul_peak_tflops(threads=os.cpu_count())
    plain: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="opt_ds_bench_") as tmp:
        shards = bench_shards(model_name, 64 * max(ranks) * batch_per_rank, Path(tmp) / "shards")
        for n in ranks:
            global_batch = n * batch_per_rank
            if global_batch not in plain:
                plain[global_batch] = global_batch / statistics.median(plain_step_times(model_name, global_batch, steps, warmup))
            for zero in zeros:
                row = deepspeed_run(model_name, zero, n, batch_per_rank, steps, warmup, shards, Path(tmp))
                row["plain_samples_per_s"] = plain[global_batch]
                row["ratio_vs_plain"] = row["samples_per_s"] / plain[global_batch]
                rows.append(row)
    return {"config": model_name, "device_peak_tflops": peak, "rows": rows}


def loader_report(model_name: str, workers: list[int], ranks: int, batch_per_rank: int, steps: int, warmup: int) -> dict:
    """Loader capacity (samples/s with W workers, one process) against what a real ZeRO-3 run consumes per rank."""
    from opt_ds.data.inspect import inspect_shards

    with tempfile.TemporaryDirectory(prefix="opt_ds_bench_") as tmp:
        shards = bench_shards(model_name, 1024, Path(tmp) / "shards")
        capacity = {w: inspect_shards([str(shards)], None, decode_config(model_name), w, batch_per_rank)["samples_per_s"]
                    for w in workers}
        run = deepspeed_run(model_name, 3, ranks, batch_per_rank, steps, warmup, shards, Path(tmp))
    per_rank = run["samples_per_s"] / ranks
    return {"config": model_name, "loader_samples_per_s": capacity, "train_samples_per_s_per_rank": per_rank,
            "headroom": {w: c / per_rank for w, c in capacity.items()}, "data_wait_frac": run["data_wait_frac"],
            "ranks": ranks}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPU ({cpu}){gpu}, torch {torch.__version__}"


def commit() -> str:
    out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=REPO_ROOT)
    return out.stdout.strip() or "unknown"


def table(kind: str, report: dict) -> str:
    if kind == "model":
        r = report
        return ("| config | parameters | fwd GFLOP/sample (max lengths) | batch | step s | samples/s | achieved TFLOP/s |\n"
                "|---|---|---|---|---|---|---|\n"
                f"| {r['config']} | {r['parameters'] / 1e6:.1f}M | {r['fwd_gflops_per_sample_max_lengths']:.2f} | "
                f"{r['batch']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | {r['train_tflops']:.3f} |")
    if kind == "loader":
        r = report
        lines = ["| loader workers | loader samples/s | training consumes (samples/s per rank) | headroom |", "|---|---|---|---|"]
        for w, c in r["loader_samples_per_s"].items():
            lines.append(f"| {w} | {c:.1f} | {r['train_samples_per_s_per_rank']:.1f} | {r['headroom'][w]:.1f}x |")
        lines.append(f"\nIn the real run ({r['ranks']} ranks, ZeRO-3, 1 worker per rank) the ranks waited for data "
                     f"{r['data_wait_frac']:.1%} of the step time (median over steps, the slowest rank).")
        return "\n".join(lines)
    lines = [f"device peak (bf16 matmul, measured): {report['device_peak_tflops']:.3f} TFLOP/s", "",
             "| ZeRO | ranks | global batch | step s | samples/s | plain loop samples/s | ratio | TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['zero']} | {r['ranks']} | {r['global_batch']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | "
                     f"{r['plain_samples_per_s']:.1f} | {r['ratio_vs_plain']:.2f} | {r['tflops']:.3f} | {r['mfu']:.1%} |")
    return "\n".join(lines)


def record(kind: str, argv: list[str], text: str) -> None:
    entry = (f"\n### {kind}: {datetime.date.today()}, commit {commit()}\n\n"
             f"Machine: {machine()}\n\n```bash\npython -m opt_ds.bench {' '.join(argv)}\n```\n\n{text}\n")
    with (REPO_ROOT / "BENCHMARKS.md").open("a") as f:
        f.write(entry)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m opt_ds.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="tiny")
    common.add_argument("--steps", type=int, default=8, help="measured steps (after warm-up)")
    common.add_argument("--warmup", type=int, default=2)
    common.add_argument("--json", action="store_true")
    common.add_argument("--record", action="store_true", help="append the result to BENCHMARKS.md")
    m = sub.add_parser("model", parents=[common], help="forward+backward samples/s of the plain model")
    m.add_argument("--batch", type=int, default=8)
    t = sub.add_parser("throughput", parents=[common], help="DeepSpeed ZeRO stages x ranks vs the plain loop, and MFU")
    t.add_argument("--zero", default="0,2,3", help="comma list of ZeRO stages")
    t.add_argument("--ranks", default="1,2", help="comma list of rank counts")
    t.add_argument("--batch-per-rank", type=int, default=8)
    d = sub.add_parser("loader", parents=[common], help="loader samples/s vs what training consumes; data-wait share")
    d.add_argument("--workers", default="0,1,2", help="comma list of loader worker counts")
    d.add_argument("--ranks", type=int, default=2)
    d.add_argument("--batch-per-rank", type=int, default=16)
    args = parser.parse_args(argv)
    if args.kind == "loader":
        report = loader_report(args.config, [int(w) for w in args.workers.split(",")], args.ranks, args.batch_per_rank,
                               args.steps, args.warmup)
    elif args.kind == "model":
        report = model_report(args.config, args.batch, args.steps, args.warmup)
    else:
        report = throughput_report(args.config, [int(z) for z in args.zero.split(",")],
                                   [int(r) for r in args.ranks.split(",")], args.batch_per_rank, args.steps, args.warmup)
    text = table(args.kind, report)
    print(json.dumps(report) if args.json else text)
    if args.record:
        record(args.kind, argv, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
