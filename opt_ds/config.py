"""The experiment config: one validated YAML file (+ `--set key=value` overrides) for a whole run."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opt_ds.data.decode import DecodeConfig
from opt_ds.data.stream import ReaderConfig, SourceConfig
from opt_ds.dataclass_config import ConfigError, from_dict, to_dict
from opt_ds.tasks.schedule import ScheduleConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
STAGES = ("pretrain", "vqvae")
RANDOM_IMAGE_TOKENIZER = "random"  # image_tokenizer value: an untrained VQ-VAE, for speed benchmarks and tests only


@dataclass(frozen=True)
class DataConfig:
    sources: list[SourceConfig]
    eval_shards: str | None = None  # held-out shards for retrieval and generation
    eval_samples: int = 256
    eval_generate: int = 64  # of those, captioned from each source and drawn from their captions, and scored
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    lr_scale: dict[str, float] = field(default_factory=dict)  # model component -> multiplier of lr (e.g. decoders)

    def __post_init__(self) -> None:
        from opt_ds.model.opt import COMPONENTS

        if len(self.betas) != 2:
            raise ValueError(f"optim.betas needs two values, got {self.betas}")
        for component, scale in self.lr_scale.items():
            if component not in COMPONENTS:
                raise ValueError(f"lr_scale: unknown component '{component}' (known: {', '.join(COMPONENTS)})")
            if scale <= 0:
                raise ValueError(f"lr_scale.{component} must be > 0, got {scale}")


@dataclass(frozen=True)
class RunConfig:
    steps: int = 1000
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end (when data.eval_shards is set)
    save_every: int = 500  # 0: only at the end
    keep_last: int = 3
    seed: int = 0
    gradient_accumulation: int = 1
    grad_clip: float = 1.0
    generations: int = 4  # of the generated captions and images, those logged to TensorBoard per evaluation
    log_sample_keys: bool = False  # write the keys of every consumed sample to logs/keys_rank*.jsonl

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "keep_last", "gradient_accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig
    stage: str = "pretrain"
    model: str = "tiny"  # a named model config or a YAML path
    model_overrides: dict = field(default_factory=dict)
    image_tokenizer: str | None = None  # an exported VQ-VAE (.safetensors) for MVM and image generation; "random": untrained
    deepspeed: str = "ds_configs/zero3_bf16.json"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got '{self.stage}'")

    @property
    def trained_image_tokenizer(self) -> str | None:
        """The exported VQ-VAE's path; None without one or for 'random' (whose codes mean nothing to score)."""
        return None if self.image_tokenizer in (None, RANDOM_IMAGE_TOKENIZER) else self.image_tokenizer


def _set_dotted(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        if not isinstance(node.setdefault(key, {}), dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a mapping")
        node = node[key]
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, object]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            out.append((key.strip(), yaml.safe_load(raw)))
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
    return out


def resolve_path(path: str) -> Path:
    """A path as given, else relative to the repository (configs and ds_configs ship there)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    for base in (REPO_ROOT, CONFIGS_DIR):
        if (base / p).exists():
            return base / p
    return p


def load_config(path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    config_path = resolve_path(path)
    if not config_path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{config_path}: expected a mapping at the top level")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    return from_dict(ExperimentConfig, data, where=config_path.name)


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False)


AUTO_BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_reuse_distance")


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
    if types.get("grad_accum_dtype") == "auto":  # fp32 only pays when micro-batches are summed (reduction is bf16 anyway)
        types["grad_accum_dtype"] = "fp32" if cfg.train.gradient_accumulation > 1 else "bf16" if ds.get("bf16", {}).get("enabled") else "fp16"
    zero = ds.get("zero_optimization", {})
    for key in AUTO_BUCKET_KEYS:
        if zero.get(key) == "auto":
            zero[key] = auto_bucket_size(parameters)
    if zero.get("leaf_module") == "auto":
        zero["leaf_module"] = {"classes": leaf_module_classes()}
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
