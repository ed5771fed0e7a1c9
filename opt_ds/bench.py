"""Measure speed and memory against references, in one run: `python -m opt_ds.bench KIND ... [--record]`.

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
  retrieval by one rule, and what opt_ds generates (opt_ds/bench_learning.py).
- plot: benchmarks/bench.png (throughput and model state per config) from the recorded figures.
- curves: a run's learning curves (training loss per task, held-out scores) from its TensorBoard files.
Warm-up steps are excluded; step times are medians. `--record` appends the table, the command, the
machine and the commit to BENCHMARKS.md, and the figures to benchmarks/records.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import psutil
import torch
import yaml

from opt_ds import memory
from opt_ds.batch import to_device
from opt_ds.config import RANDOM_IMAGE_TOKENIZER, REPO_ROOT
from opt_ds.data import build_shards
from opt_ds.data.collate import collate
from opt_ds.data.decode import DecodeConfig, SampleDecoder
from opt_ds.data.synthetic import synthetic_sample
from opt_ds.launch import free_port
from opt_ds.metrics import cuda_peak_tflops, measure_matmul_peak_tflops, step_flops, tensorboard_scalars
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
    """Seconds per step of the plain loop: every task each step, bf16 autocast, gradients clipped to norm 1 (as
    opt_ds.train does), fused AdamW."""
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_model_config(model_name)
    model, vq = OPTModel(cfg).to(dev).train(), VQVAE(cfg.vq).to(dev).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tasks = {name: cls() for name, cls in TASKS.items()}
    plan = [(name, 1.0) for name in TASKS]
    batch = to_device(synthetic_batch(model_name, batch_size), torch.device(dev), torch.float32)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        ctx = TaskContext(step_generator(0, step, 0), vq)
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss, _ = model(partial(run_tasks, batch=batch, plan=plan, ctx=ctx, tasks=tasks))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if dev == "cuda":
            torch.cuda.synchronize()
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


def _first_to_go_when_memory_runs_out() -> None:
    """Make the ranks the kernel's first choice for the OOM killer, so a model that does not fit ends its run only."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")


def deepspeed_run(model_name: str, zero: int, ranks: int, batch_per_rank: int, steps: int, warmup: int,
                  shards: Path, workdir: Path, checkpointing: bool = False, ds_config: Path | None = None,
                  name: str | None = None) -> dict:
    """One real training run; medians over the measured steps of its TensorBoard scalars, and its memory record."""
    config = {
        "model": model_name,
        "model_overrides": {"activation_checkpointing": checkpointing},
        "deepspeed": str(ds_config or REPO_ROOT / "ds_configs" / f"zero{zero}_bf16.json"),
        "data": {"sources": [{"name": "synthetic", "shards": str(shards)}],
                 "decode": {"image_size": load_model_config(model_name).vision.image_size,
                            "max_audio_seconds": AUDIO_SECONDS, "max_text_tokens": TEXT_TOKENS},
                 "reader": {"batch_size": batch_per_rank, "num_workers": 1}},
        "schedule": {"mode": "sum", "stages": [{"name": "all", "tasks": {t: 1.0 for t in TASKS}}]},
        "image_tokenizer": RANDOM_IMAGE_TOKENIZER,  # a speed measurement: the codes need not mean anything
        "train": {"steps": warmup + steps, "log_every": 1, "save_every": 0},
    }
    name = name or f"zero{zero}_ranks{ranks}" + ("_ckpt" if checkpointing else "")
    run_dir, config_path = workdir / name, workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
           "--module", "opt_ds.train", "--config", str(config_path), "--output", str(run_dir), "--resume", "none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600,
                          preexec_fn=_first_to_go_when_memory_runs_out)
    if proc.returncode != 0:
        raise RunFailed(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
                        proc.stdout + proc.stderr)
    keys = {"perf/step_time_s": "step_s", "perf/mfu": "mfu", "perf/tflops": "tflops",
            "perf/data_wait_frac": "data_wait_frac", "memory/peak_mb": "peak_mb", "memory/transient_mb": "transient_mb"}
    scalars = tensorboard_scalars(run_dir / "tb", tuple(keys))
    measured = sorted(scalars["perf/step_time_s"])[warmup:]
    median = {key: statistics.median(scalars[tag][s] for s in measured) for tag, key in keys.items()}
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"zero": zero, "ranks": ranks, "global_batch": ranks * batch_per_rank, **median,
            "samples_per_s": ranks * batch_per_rank / median["step_s"], "memory": summary.get("memory")}


class RunFailed(RuntimeError):
    def __init__(self, message: str, output: str):
        super().__init__(message)
        self.output = output

    def reason(self) -> str:
        if re.search(r"return code\s*=?\s*-9\b|Killed|out of memory|OutOfMemory|Cannot allocate memory", self.output):
            return "killed (SIGKILL: out of memory)"
        if re.search(r"No space left on device", self.output):
            return "out of disk space"
        errors = [line for line in self.output.splitlines() if re.search(r"Error|error:", line)]
        return (errors[-1] if errors else self.output.strip().splitlines()[-1] if self.output.strip() else "failed")[-200:]


def bench_shards(model_name: str, samples: int, out: Path) -> Path:
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the report
        build_shards.main(["synthetic", "--num", str(samples), "--max-samples", "64",
                           "--image-size", str(load_model_config(model_name).vision.image_size),
                           "--audio-seconds", str(AUDIO_SECONDS), "--out", str(out), "--quiet"])
    return out


def throughput_report(model_name: str, zeros: list[int], ranks: list[int], batch_per_rank: int, steps: int,
                      warmup: int, repeats: int = 1) -> dict:
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
                    plain = global_batch / statistics.median(plain_step_times(model_name, global_batch, steps, warmup))
                    row = deepspeed_run(model_name, zero, n, batch_per_rank, steps, warmup, shards, Path(tmp),
                                        name=f"zero{zero}_ranks{n}_{repeat}")
                    row["mfu"] = row["tflops"] / peak  # the peak measured here, the same for every row
                    row["plain_samples_per_s"] = plain
                    row["ratio_vs_plain"] = row["samples_per_s"] / plain
                    pairs.append(row)
                ratios = [row["ratio_vs_plain"] for row in pairs]
                median_pair = sorted(pairs, key=lambda row: row["ratio_vs_plain"])[(len(pairs) - 1) // 2]
                rows.append({**median_pair, "ratios": ratios})
    return {"config": model_name, "device_peak_tflops": peak, "repeats": repeats, "rows": rows}


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
    rows = [{"run": f"opt_ds ZeRO-{zero}, {ranks} ranks", "tflops": run["tflops"]},
            {"run": "plain PyTorch loop", "tflops": plain["train_tflops"]}]
    for row in rows:
        row["mfu"] = row["tflops"] / (peak * devices)
        row["mfu_vs_vendor"] = row["tflops"] / (vendor * devices) if vendor else None
    return {"config": model_name, "global_batch": ranks * batch_per_rank, "measured_peak_tflops": peak,
            "vendor_peak_tflops": vendor, "rows": rows}


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


def memory_report(model_name: str, zeros: list[int], ranks: int, batch_per_rank: int, steps: int, warmup: int) -> dict:
    """Per-rank model state (largest rank) of real runs per ZeRO stage against 16 B/param accounting, and the
    step's transient memory under ZeRO-3 with activation checkpointing off and on."""
    parameters = parameter_count(load_model_config(model_name))["total"]
    rows, runs = [], {}
    warmup = max(warmup, 1)  # the trainer records model state in the second step
    with tempfile.TemporaryDirectory(prefix="opt_ds_bench_") as tmp:
        shards = bench_shards(model_name, 64 * ranks * batch_per_rank, Path(tmp) / "shards")
        for zero, checkpointing in [(z, False) for z in zeros] + [(3, True)] + ([(3, False)] if 3 not in zeros else []):
            runs[zero, checkpointing] = deepspeed_run(model_name, zero, ranks, batch_per_rank, steps, warmup, shards,
                                                      Path(tmp), checkpointing)
    for zero in zeros:
        per_rank = runs[zero, False]["memory"]["model_state_bytes_per_rank"]
        largest = max(per_rank, key=lambda b: b["parameters"] + b["gradients"] + b["optimizer"])
        state = largest["parameters"] + largest["gradients"] + largest["optimizer"]
        expected = memory.expected_model_state_bytes(parameters, zero, ranks)
        rows.append({"zero": zero, "bytes": largest, "model_state_bytes": state, "expected_bytes": expected,
                     "ratio_vs_expected": state / expected, "bytes_per_param": state / parameters})
    checkpointing = [{"activation_checkpointing": ckpt, "peak_mb": runs[3, ckpt]["peak_mb"],
                      "transient_mb": runs[3, ckpt]["transient_mb"]} for ckpt in (False, True)]
    return {"config": model_name, "parameters": parameters, "ranks": ranks, "batch_per_rank": batch_per_rank,
            "peak_kind": "CUDA allocated" if torch.cuda.is_available() else "resident (RSS)",
            "rows": rows, "checkpointing": checkpointing}


NVME_BYTES_PER_PARAM = 18  # swapped: bf16 weights, fp32 master copy, Adam moments, fp32 gradients
SCALE_MODES = {"zero3": "zero3_bf16.json", "cpu_offload": "zero3_offload_cpu.json", "nvme_offload": "zero3_offload_nvme.json"}


def scale_report(configs: list[str], modes: list[str], ranks: int, nvme_dir: Path | None, steps: int, warmup: int) -> dict:
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
                    run = deepspeed_run(name, 3, ranks, 1, steps, warmup, shards, work, ds_config=ds_path, name=f"{mode}_{name}")
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
    return {"ranks": ranks, "memory_gib": psutil.virtual_memory().total / 2**30, "rows": rows, "largest": largest,
            "nvme_vs_zero3": ratio}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPU ({cpu}){gpu}, torch {torch.__version__}"


def commit() -> str:
    """HEAD, marked -dirty when tracked files other than the records themselves differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()

    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)BENCHMARKS.md", ":(exclude)benchmarks")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("-dirty" if changed else "")


def table(kind: str, report: dict) -> str:
    if kind == "model":
        r = report
        return ("| config | parameters | fwd GFLOP/sample (max lengths) | batch | step s | samples/s | achieved TFLOP/s |\n"
                "|---|---|---|---|---|---|---|\n"
                f"| {r['config']} | {r['parameters'] / 1e6:.1f}M | {r['fwd_gflops_per_sample_max_lengths']:.2f} | "
                f"{r['batch']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | {r['train_tflops']:.3f} |")
    if kind == "learning":
        from opt_ds.bench_learning import learning_table

        return learning_table(report)
    if kind == "loader":
        r = report
        lines = ["| loader workers | loader samples/s | training consumes (samples/s per rank) | headroom |", "|---|---|---|---|"]
        for w, c in r["loader_samples_per_s"].items():
            lines.append(f"| {w} | {c:.1f} | {r['train_samples_per_s_per_rank']:.1f} | {r['headroom'][w]:.1f}x |")
        lines.append(f"\nIn the real run ({r['ranks']} ranks, ZeRO-3, 1 worker per rank) the ranks waited for data "
                     f"{r['data_wait_frac']:.1%} of the step time (median over steps, the slowest rank).")
        return "\n".join(lines)
    if kind == "scale":
        r = report
        lines = [f"{r['ranks']} rank(s), batch 1, every task each step, {r['memory_gib']:.0f} GiB of memory", "",
                 "| mode | config | parameters | trains? | s/step | peak MiB | why not |", "|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['mode']} | {row['config']} | {row['parameters'] / 1e6:,.0f}M | {'yes' if row['ok'] else 'no'} | "
                         + (f"{row['step_s']:.1f} | {row['peak_mb']:,.0f} | |" if row["ok"] else f" | | {row['reason']} |"))
        lines.append("")
        lines += [f"Largest that trains with {mode}: {v['config']} ({v['parameters'] / 1e6:,.0f}M)" for mode, v in r["largest"].items()]
        if r["nvme_vs_zero3"]:
            lines.append(f"\nNVMe offload trains a model {r['nvme_vs_zero3']:.1f}x larger than ZeRO-3 without offload.")
        return "\n".join(lines)
    if kind == "mfu":
        r = report
        vendor = f"{r['vendor_peak_tflops']:.0f} TFLOP/s" if r["vendor_peak_tflops"] else "n/a (CPU)"
        lines = [f"{r['config']}, global batch {r['global_batch']}; bf16 matmul peak measured in this run: "
                 f"{r['measured_peak_tflops']:.3f} TFLOP/s per device; vendor peak: {vendor}", "",
                 "| run | model TFLOP/s | MFU (measured peak) | MFU (vendor peak) |", "|---|---|---|---|"]
        for row in r["rows"]:
            vs_vendor = f"{row['mfu_vs_vendor']:.1%}" if row["mfu_vs_vendor"] is not None else "n/a"
            lines.append(f"| {row['run']} | {row['tflops']:.3f} | {row['mfu']:.1%} | {vs_vendor} |")
        return "\n".join(lines)
    if kind == "memory":
        r, mib = report, 2**20
        lines = [f"{r['config']}: {r['parameters'] / 1e6:.1f}M parameters, {r['ranks']} ranks; model state of the largest "
                 "rank between backward and optimizer step; expected: 2 B weights + 2 B gradients + 12 B Adam state per "
                 "parameter, divided by the ranks as the ZeRO stage partitions them", "",
                 "| ZeRO | parameters MiB | gradients MiB | optimizer MiB | model state MiB | expected MiB | ratio | B/param | other buffers MiB |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            b = row["bytes"]
            lines.append(f"| {row['zero']} | {b['parameters'] / mib:.1f} | {b['gradients'] / mib:.1f} | {b['optimizer'] / mib:.1f} | "
                         f"{row['model_state_bytes'] / mib:.1f} | {row['expected_bytes'] / mib:.1f} | "
                         f"{row['ratio_vs_expected']:.3f} | {row['bytes_per_param']:.2f} | {b['other'] / mib:.1f} |")
        lines += ["", f"ZeRO-3, batch {r['batch_per_rank']} per rank: peak {r['peak_kind']} memory of the largest rank, and how far "
                  "a step rises above its start (activations, gathered parameters, temporaries):", "",
                  "| activation checkpointing | peak MiB | step transient MiB |", "|---|---|---|"]
        for c in r["checkpointing"]:
            lines.append(f"| {'on' if c['activation_checkpointing'] else 'off'} | {c['peak_mb']:.0f} | {c['transient_mb']:.0f} |")
        return "\n".join(lines)
    repeats = report.get("repeats", 1)
    lines = [f"device peak (bf16 matmul, measured): {report['device_peak_tflops']:.3f} TFLOP/s"
             + (f"; {repeats} plain/DeepSpeed pairs per row, the pair with the median ratio shown" if repeats > 1 else ""),
             "", "| ZeRO | ranks | global batch | step s | samples/s | plain loop samples/s | ratio | TFLOP/s | MFU |"
             + (" ratio of each pair |" if repeats > 1 else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if repeats > 1 else "")]
    for r in report["rows"]:
        each = " " + ", ".join(f"{x:.2f}" for x in r["ratios"]) + " |" if repeats > 1 else ""
        lines.append(f"| {r['zero']} | {r['ranks']} | {r['global_batch']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | "
                     f"{r['plain_samples_per_s']:.1f} | {r['ratio_vs_plain']:.2f} | {r['tflops']:.3f} | {r['mfu']:.1%} |{each}")
    return "\n".join(lines)


RECORDS = REPO_ROOT / "benchmarks" / "records.jsonl"
PLOT = REPO_ROOT / "benchmarks" / "bench.png"


def record(kind: str, argv: list[str], text: str, report: dict) -> None:
    """The table into BENCHMARKS.md, the figures into benchmarks/records.jsonl (what the plot reads)."""
    when, rev, where = str(datetime.date.today()), commit(), machine()
    entry = (f"\n### {kind}: {when}, commit {rev}\n\n"
             f"Machine: {where}\n\n```bash\npython -m opt_ds.bench {' '.join(argv)}\n```\n\n{text}\n")
    with (REPO_ROOT / "BENCHMARKS.md").open("a") as f:
        f.write(entry)
    RECORDS.parent.mkdir(exist_ok=True)
    with RECORDS.open("a") as f:
        f.write(json.dumps({"kind": kind, "date": when, "commit": rev, "machine": where, "argv": argv,
                            "report": report}) + "\n")


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
    t.add_argument("--repeats", type=int, default=1, help="plain/DeepSpeed pairs per row; the median ratio is reported")
    d = sub.add_parser("loader", parents=[common], help="loader samples/s vs what training consumes; data-wait share")
    d.add_argument("--workers", default="0,1,2", help="comma list of loader worker counts")
    d.add_argument("--ranks", type=int, default=2)
    d.add_argument("--batch-per-rank", type=int, default=16)
    mem = sub.add_parser("memory", parents=[common], help="model-state bytes per ZeRO stage; activation checkpointing peaks")
    mem.add_argument("--zero", default="0,2,3", help="comma list of ZeRO stages")
    mem.add_argument("--ranks", type=int, default=2)
    mem.add_argument("--batch-per-rank", type=int, default=8)
    sc = sub.add_parser("scale", parents=[common], help="largest config that trains per offload mode")
    sc.add_argument("--configs", default="tiny,small,base,large,xl", help="comma list of named configs")
    sc.add_argument("--modes", default=",".join(SCALE_MODES), help=f"comma list of {', '.join(SCALE_MODES)}")
    sc.add_argument("--ranks", type=int, default=1)
    sc.add_argument("--nvme-path", type=Path, default=None, help="swap folder for NVMe offload (default: a temp folder)")
    u = sub.add_parser("mfu", parents=[common], help="model TFLOP/s against the measured (and vendor) bf16 peak")
    u.add_argument("--zero", type=int, default=3)
    u.add_argument("--ranks", type=int, default=2)
    u.add_argument("--batch-per-rank", type=int, default=8)
    le = sub.add_parser("learning", help="opt_ds against open_clip: retrieval (and generation) at the same budget")
    le.add_argument("--train", type=Path, default=None, help="training shards (default: synthetic image+text, built)")
    le.add_argument("--eval", type=Path, default=None, help="held-out shards (default: synthetic, built)")
    le.add_argument("--steps", type=int, default=600)
    le.add_argument("--batch", type=int, default=32, help="global batch (opt_ds: over 2 ranks)")
    le.add_argument("--samples", type=int, default=200, help="held-out samples scored")
    le.add_argument("--runs", default="open_clip,contrastive,full", help="comma list of open_clip, contrastive, full")
    le.add_argument("--seeds", default="0", help="comma list: each run once per seed (weights, data order)")
    le.add_argument("--image-tokenizer", default=None, help="an exported VQ-VAE for the full run (e.g. the demo's)")
    le.add_argument("--workdir", type=Path, default=REPO_ROOT / ".cache" / "bench_learning")
    le.add_argument("--json", action="store_true")
    le.add_argument("--record", action="store_true", help="append the result to BENCHMARKS.md")
    pl = sub.add_parser("plot", help=f"draw {PLOT.relative_to(REPO_ROOT)} from {RECORDS.relative_to(REPO_ROOT)}")
    pl.add_argument("--records", type=Path, default=RECORDS)
    pl.add_argument("--out", type=Path, default=PLOT)
    cu = sub.add_parser("curves", help="learning curves of a run: training loss per task, held-out scores per eval")
    cu.add_argument("--run", type=Path, required=True, help="a run directory (its tb/)")
    cu.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.kind in ("plot", "curves"):
        from opt_ds.bench_plot import learning_curves, plot

        print(plot(args.records, args.out) if args.kind == "plot" else learning_curves(args.run, args.out))
        return 0
    if args.kind == "learning":
        from opt_ds.bench_learning import learning_report

        report = learning_report(args.workdir, args.train, args.eval, args.steps, args.batch, args.samples,
                                 args.image_tokenizer, args.runs.split(","), [int(s) for s in args.seeds.split(",")])
    elif args.kind == "loader":
        report = loader_report(args.config, [int(w) for w in args.workers.split(",")], args.ranks, args.batch_per_rank,
                               args.steps, args.warmup)
    elif args.kind == "memory":
        report = memory_report(args.config, [int(z) for z in args.zero.split(",")], args.ranks, args.batch_per_rank,
                               args.steps, args.warmup)
    elif args.kind == "scale":
        report = scale_report(args.configs.split(","), args.modes.split(","), args.ranks, args.nvme_path, args.steps, args.warmup)
    elif args.kind == "mfu":
        report = mfu_report(args.config, args.zero, args.ranks, args.batch_per_rank, args.steps, args.warmup)
    elif args.kind == "model":
        report = model_report(args.config, args.batch, args.steps, args.warmup)
    else:
        report = throughput_report(args.config, [int(z) for z in args.zero.split(",")],
                                   [int(r) for r in args.ranks.split(",")], args.batch_per_rank, args.steps, args.warmup,
                                   args.repeats)
    text = table(args.kind, report)
    print(json.dumps(report) if args.json else text)
    if args.record:
        record(args.kind, argv, text, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
