"""The DeepSpeed JSON of a run: the file the experiment names, with what opt_ds decides filled in (batch sizes,
accumulation, clipping, and the "auto" bucket sizes, gradient dtype and leaf modules)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from opt_ds.config.experiment import ExperimentConfig, resolve_path
from opt_ds.config.fields import ConfigError

AUTO_BUCKET_KEYS = (
    "reduce_bucket_size",
    "allgather_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_max_reuse_distance",
)


def auto_bucket_size(parameters: int) -> int:
    """Elements per communication bucket for `"auto"`: an eighth of the model, within [1e6, 5e8].

    A few collectives per step, and a bucket of ~1/64 of the model state (16 B/param against 2 B per bucket
    element over 8). DeepSpeed's fixed default of 5e8 elements is a 1 GB bucket even for a 10M-parameter model.
    """
    return int(min(5e8, max(1e6, parameters // 8)))


def leaf_module_classes() -> list[str]:
    """`"leaf_module": "auto"`: ZeRO-3 gathers each transformer layer whole, in one collective per layer.

    Without it DeepSpeed hooks and gathers every linear and norm on its own (and, with a persistence
    threshold, all-gathers each small parameter after every step, one collective each). A leaf module
    must run once per forward: the task runner encodes all tasks of a step in one pass for that reason.
    """
    from opt_ds.model.opt import LAYER_CLASSES

    return [f"{c.__module__}.{c.__qualname__}" for c in LAYER_CLASSES]


def load_deepspeed_config(cfg: ExperimentConfig, parameters: int) -> dict:
    """The DeepSpeed JSON with batch sizes, accumulation, clipping and the "auto" values filled in."""
    path = resolve_path(cfg.deepspeed)
    if not path.is_file():
        raise ConfigError(f"deepspeed config not found: {cfg.deepspeed}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    ds = copy.deepcopy({k: v for k, v in ds.items() if not k.startswith("_")})  # "_comment" keys
    for forbidden in ("optimizer", "scheduler"):
        if forbidden in ds:
            raise ConfigError(f"{path}: remove the '{forbidden}' section; opt_ds builds it from the 'optim' config")
    ds.pop("train_batch_size", None)
    ds["train_micro_batch_size_per_gpu"] = cfg.data.reader.batch_size
    ds["gradient_accumulation_steps"] = cfg.train.gradient_accumulation
    ds["gradient_clipping"] = cfg.train.grad_clip
    types = ds.get("data_types", {})
    if (
        types.get("grad_accum_dtype") == "auto"
    ):  # fp32 only pays when micro-batches are summed (reduction is bf16 anyway)
        types["grad_accum_dtype"] = (
            "fp32" if cfg.train.gradient_accumulation > 1 else "bf16" if ds.get("bf16", {}).get("enabled") else "fp16"
        )
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {zero.get('stage')!r}")
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: bf16 and fp16 are both enabled; choose one")
    for key in AUTO_BUCKET_KEYS:
        if zero.get(key) == "auto":
            zero[key] = auto_bucket_size(parameters)
    if zero.get("leaf_module") == "auto":
        zero["leaf_module"] = {"classes": leaf_module_classes()}
    check_zero_section(path, zero)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def check_zero_section(path: Path, zero: dict) -> None:
    """The zero_optimization section through DeepSpeed's own model of it, at start-up: a misspelt or mistyped key
    failed only when the engine was built, after the process group and the run directory existed."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"])
        raise ConfigError(f"{path}: zero_optimization.{key}: {error['msg']}") from None
