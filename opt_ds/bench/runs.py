"""What the benchmark kinds share: synthetic inputs at the benchmark's lengths, and real `opt_ds.train` runs
under the deepspeed launcher, read back from their TensorBoard files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from opt_ds.config.experiment import RANDOM_IMAGE_TOKENIZER, REPO_ROOT
from opt_ds.data import build_shards
from opt_ds.data.collate import collate
from opt_ds.data.decode import DecodeConfig, SampleDecoder
from opt_ds.data.features import with_log_mel
from opt_ds.data.synthetic import synthetic_sample
from opt_ds.dist.launch import local_training_command
from opt_ds.model.config import load_model_config
from opt_ds.tasks import DEFAULT_TASKS
from opt_ds.train.metrics import tensorboard_scalars

AUDIO_SECONDS = 2.0
TEXT_TOKENS = 32


def decode_config(model_name: str) -> DecodeConfig:
    cfg = load_model_config(model_name)
    return DecodeConfig(image_size=cfg.vision.image_size, max_audio_seconds=AUDIO_SECONDS, max_text_tokens=TEXT_TOKENS)


def synthetic_batch(model_name: str, batch_size: int) -> dict:
    decode = decode_config(model_name)
    decoder = SampleDecoder(decode)
    samples = [
        decoder(synthetic_sample(i, image_size=decode.image_size, audio_seconds=AUDIO_SECONDS))[0]
        for i in range(batch_size)
    ]
    return with_log_mel(collate(samples, decode), decode)


def bench_shards(model_name: str, samples: int, out: Path) -> Path:
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the report
        build_shards.main(
            [
                "synthetic",
                "--num",
                str(samples),
                "--max-samples",
                "64",
                "--image-size",
                str(load_model_config(model_name).vision.image_size),
                "--audio-seconds",
                str(AUDIO_SECONDS),
                "--out",
                str(out),
                "--quiet",
            ]
        )
    return out


def _first_to_go_when_memory_runs_out() -> None:
    """Make the ranks the kernel's first choice for the OOM killer, so a model that does not fit ends its run only."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")


def deepspeed_run(
    model_name: str,
    zero: int,
    ranks: int,
    batch_per_rank: int,
    steps: int,
    warmup: int,
    shards: Path,
    workdir: Path,
    checkpointing: bool = False,
    ds_config: Path | None = None,
    name: str | None = None,
) -> dict:
    """One real training run; medians over the measured steps of its TensorBoard scalars, and its memory record."""
    config = {
        "model": model_name,
        "model_overrides": {"activation_checkpointing": checkpointing},
        "deepspeed": str(ds_config or REPO_ROOT / "ds_configs" / f"zero{zero}_bf16.json"),
        "data": {
            "sources": [{"name": "synthetic", "shards": str(shards)}],
            "decode": {
                "image_size": load_model_config(model_name).vision.image_size,
                "max_audio_seconds": AUDIO_SECONDS,
                "max_text_tokens": TEXT_TOKENS,
            },
            "reader": {"batch_size": batch_per_rank, "num_workers": 1},
        },
        "schedule": {"mode": "sum", "stages": [{"name": "all", "tasks": {t: 1.0 for t in DEFAULT_TASKS}}]},
        "image_tokenizer": RANDOM_IMAGE_TOKENIZER,  # a speed measurement: the codes need not mean anything
        "train": {"steps": warmup + steps, "log_every": 1, "save_every": 0},
    }
    name = name or f"zero{zero}_ranks{ranks}" + ("_ckpt" if checkpointing else "")
    run_dir, config_path = workdir / name, workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    cmd = local_training_command(ranks, "--config", str(config_path), "--output", str(run_dir), "--resume", "none")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=3600, preexec_fn=_first_to_go_when_memory_runs_out
    )
    if proc.returncode != 0:
        raise RunFailed(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
            proc.stdout + proc.stderr,
        )
    keys = {
        "perf/step_time_s": "step_s",
        "perf/mfu": "mfu",
        "perf/tflops": "tflops",
        "perf/data_wait_frac": "data_wait_frac",
        "memory/peak_mb": "peak_mb",
        "memory/transient_mb": "transient_mb",
    }
    scalars = tensorboard_scalars(run_dir / "tb", tuple(keys))
    measured = sorted(scalars["perf/step_time_s"])[warmup:]
    median = {key: statistics.median(scalars[tag][s] for s in measured) for tag, key in keys.items()}
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "zero": zero,
        "ranks": ranks,
        "global_batch": ranks * batch_per_rank,
        **median,
        "samples_per_s": ranks * batch_per_rank / median["step_s"],
        "memory": summary.get("memory"),
    }


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
        return (errors[-1] if errors else self.output.strip().splitlines()[-1] if self.output.strip() else "failed")[
            -200:
        ]
