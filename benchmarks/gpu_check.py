"""`make gpu-check`: the CUDA path in one command, on a machine with one or more GPUs and PyTorch, no network.

What the machine's PyTorch image lacks (DeepSpeed, webdataset, soundfile, the scorers, the tokenizer files) comes
from `.gpu/`, which `make gpu-bundle` builds where PyPI is reachable. Then, on every GPU of the machine:

1. ZeRO-3 bf16 pre-training of a model (`small`) with all seven tasks summed each step and activation
   checkpointing; the same run stopped halfway (status 75) and resumed, its losses compared with the uninterrupted
   run's; export and evaluation of the result.
2. fp16 with dynamic loss scaling, a short run.
3. `bench throughput`, `mfu` and `memory` on CUDA (MFU against the vendor bf16 peak and the measured matmul peak).

A summary table ends the output; it, the figures and every log go to $GPU_CHECK_OUT (default $OUT, where the
device tool collects files, else /tmp/gpu_check). On a machine without CUDA it runs the same steps on CPU with
the `tiny` model, to check the command itself.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / ".gpu"
OUT = Path(os.environ.get("GPU_CHECK_OUT") or os.environ.get("OUT") or "/tmp/gpu_check")
ALL_TASKS = ("mlm", "mvm", "mam", "text_gen", "image_gen", "matching", "contrastive")


def environment() -> dict[str, str]:
    """The environment of every step: where this Python lacks DeepSpeed, the bundle's packages, installed once into
    a folder on PYTHONPATH."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    paths = [str(REPO)]
    if importlib.util.find_spec("deepspeed") is None:
        if not BUNDLE.is_dir():
            raise SystemExit("gpu-check: this Python has no DeepSpeed and there is no .gpu/ (run `make gpu-bundle`)")
        site = Path("/tmp/opt_ds_gpu_site")
        if not site.is_dir():
            wheels = sorted(str(w) for w in (BUNDLE / "wheels").glob("*.whl"))
            pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
            subprocess.run([*pip, "--target", str(site), *wheels], check=True)
        paths += [str(site), str(BUNDLE / "site")]
        env["PATH"] = f"{site / 'bin'}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = ":".join(paths + [env.get("PYTHONPATH", "")]).rstrip(":")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(OUT / "torch_extensions"))
    return env


def step(name: str, cmd: list[str], env: dict, expect: int = 0, timeout: float = 900) -> float:
    """Run one step with its output in OUT/NAME.log; -> seconds taken. Stops the check when it fails."""
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(OUT / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != expect:
        print((OUT / f"{name}.log").read_text()[-4000:])
        raise SystemExit(f"gpu-check: {name} exited {proc.returncode}, expected {expect} ({OUT / name}.log)")
    print(f"   done in {seconds:.0f} s", flush=True)
    return seconds


def launcher(gpus: int) -> list[str]:
    """One process per GPU: torchrun (it ships with PyTorch) for several, the plain module for one or for CPU."""
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    return [sys.executable]


def write_config(path: Path, model: str, data: Path, steps: int, deepspeed_json: str) -> Path:
    image_size = 64 if model == "tiny" else 128
    config = {
        "model": model,
        "model_overrides": {"activation_checkpointing": True},
        "image_tokenizer": "random",
        "deepspeed": deepspeed_json,
        "data": {
            "sources": [{"name": "triplets", "shards": str(data / "train")}],
            "eval_shards": str(data / "eval"),
            "eval_samples": 200,
            "decode": {"image_size": image_size, "max_audio_seconds": 2.0, "max_text_tokens": 32},
            "reader": {"batch_size": 32, "num_workers": 4},
        },
        "schedule": {"mode": "sum", "stages": [{"name": "all", "tasks": {task: 1.0 for task in ALL_TASKS}}]},
        "optim": {"lr": 3e-4, "warmup_steps": 5},
        "train": {"steps": steps, "log_every": 1, "save_every": steps // 2, "keep_last": 3},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def losses(run: Path) -> dict[int, float]:
    from opt_ds.train.metrics import tensorboard_scalars

    return tensorboard_scalars(run / "tb", ("loss/total",))["loss/total"]


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    env = environment()
    sys.path[:0] = env["PYTHONPATH"].split(":")
    import torch

    gpus = torch.cuda.device_count()
    model = os.environ.get("GPU_CHECK_MODEL", "small" if gpus else "tiny")
    steps = int(os.environ.get("GPU_CHECK_STEPS", 40 if gpus else 6))
    device = torch.cuda.get_device_name(0) if gpus else "CPU (no CUDA device: the command itself is checked)"
    print(f"gpu-check: {gpus} GPU(s), {device}; model {model}, {steps} steps; output in {OUT}", flush=True)
    run = [*launcher(gpus), "-m", "opt_ds.train"]
    summary: dict[str, object] = {"device": device, "gpus": gpus, "model": model, "steps": steps}
    data = OUT / "data"
    if not (data / "eval").is_dir():
        image_size = "64" if model == "tiny" else "128"
        build = [sys.executable, "-m", "opt_ds.data.build_shards", "synthetic", "--quiet", "--image-size", image_size]
        step("data_train", [*build, "--num", "2000", "--max-samples", "250", "--out", str(data / "train")], env)
        step("data_eval", [*build, "--num", "200", "--seed", "1", "--out", str(data / "eval")], env)

    bf16 = write_config(OUT / "bf16.yaml", model, data, steps, "ds_configs/zero3_bf16.json")
    whole, halves = OUT / "runs" / "whole", OUT / "runs" / "halves"
    fresh = ["--config", str(bf16), "--resume", "none"]
    summary["train_s"] = step("train", [*run, *fresh, "--output", str(whole)], env)
    step("train_stopped", [*run, *fresh, "--output", str(halves), "--stop-at", str(steps // 2)], env, expect=75)
    step("train_resumed", [*run, "--config", str(bf16), "--output", str(halves), "--resume", "auto"], env)
    a, b = losses(whole), losses(halves)
    resumed = [s for s in a if s > steps // 2]
    summary["loss_first_last"] = [round(a[min(a)], 4), round(a[max(a)], 4)]
    summary["resume_max_rel_diff"] = max(abs(a[s] - b[s]) / max(abs(a[s]), 1e-9) for s in resumed)

    weights = OUT / "opt.safetensors"
    export = [sys.executable, "-m", "opt_ds.export", "--checkpoint", str(whole / "checkpoints"), "--out", str(weights)]
    step("export", export, env)
    evaluate = [sys.executable, "-m", "opt_ds.evaluate", "--weights", str(weights), "--shards", str(data / "eval")]
    step("evaluate", [*evaluate, "--json", "--out", str(OUT / "eval")], env)
    report = json.loads((OUT / "evaluate.log").read_text().strip().splitlines()[-1])
    summary["evaluation"] = {k: v for k, v in report.items() if k not in ("captions", "grid", "outputs")}

    if gpus:  # fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16 loss scaling)
        fp16 = write_config(OUT / "fp16.yaml", model, data, 10, "ds_configs/zero3_fp16.json")
        step("train_fp16", [*run, "--config", str(fp16), "--output", str(OUT / "runs" / "fp16")], env)
        fp16_losses = losses(OUT / "runs" / "fp16")
        summary["fp16_loss_finite"] = all(math.isfinite(v) for v in fp16_losses.values())

    bench = [sys.executable, "-m", "opt_ds.bench"]
    ranks = str(max(gpus, 1))
    for kind in ("throughput", "mfu", "memory"):
        cmd = [*bench, kind, "--config", model, "--zero", "3", "--ranks", ranks, "--steps", "10", "--json"]
        cmd += ["--record"] if gpus else []  # a CPU run checks the command; its figures are not what it measures
        step(f"bench_{kind}", cmd, env, timeout=1200)
        summary[f"bench_{kind}"] = json.loads((OUT / f"bench_{kind}.log").read_text().strip().splitlines()[-1])

    (OUT / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for name in ("BENCHMARKS.md", "benchmarks/records.jsonl") if gpus else ():  # with the records just appended
        (OUT / Path(name).name).write_text((REPO / name).read_text())
    print("\ngpu-check summary")
    for key, value in summary.items():
        print(f"  {key:22s} {json.dumps(value, default=str)[:160]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
