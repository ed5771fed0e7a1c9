"""The experiment config: one validated YAML file (+ `--set key=value` overrides) for a whole run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opt_ds.config.fields import ConfigError, from_dict, to_dict
from opt_ds.data.concepts import ConceptVocabulary
from opt_ds.data.decode import DecodeConfig
from opt_ds.data.shards import ShardSpecError, expand_shards
from opt_ds.data.stream import ReaderConfig, SourceConfig
from opt_ds.model.config import ModelConfig
from opt_ds.tasks import NEEDS_CONCEPTS
from opt_ds.tasks.schedule import ScheduleConfig, StageConfig
from opt_ds.tasks.settings import TasksConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS_DIR = REPO_ROOT / "opt_ds" / "configs"
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

        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas needs two values in [0, 1), got {self.betas}")
        if not self.lr > 0 or not self.eps > 0:
            raise ValueError(f"optim.lr and optim.eps must be > 0, got {self.lr} and {self.eps}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(
                f"optim.weight_decay and optim.warmup_steps must be >= 0, got {self.weight_decay} "
                f"and {self.warmup_steps}"
            )
        if not 0 <= self.min_lr_ratio <= 1:  # 0: cosine to zero (open_clip's schedule)
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
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
    # clip the global gradient norm (0: off). At 1.0 it acts on most steps yet retrieval is level with no clipping
    # on synthetic and real data (AdamW's update is nearly scale-free; BENCHMARKS.md, "Gradient clipping: the
    # default measured"), and a bad step the divergence guard lets through stays bounded
    grad_clip: float = 1.0
    generations: int = 4  # of the generated captions and images, those logged to TensorBoard per evaluation
    log_sample_keys: bool = False  # write the keys of every consumed sample to logs/keys_rank*.jsonl
    # the divergence guard (opt_ds/train/guard.py): a micro-step whose loss is not finite, or whose task loss is over
    # loss_spike_factor x that task's recent median (0: no spike check), is skipped; this many in a row end the run
    max_skipped_in_a_row: int = 5
    loss_spike_factor: float = 10.0
    # how long a rank waits in a device collective (NCCL) for a peer that hangs before the run fails; a peer that
    # dies is ended sooner by the launcher. Saves and evaluation wait on their own (gloo) host group, with 30 min.
    collective_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.collective_timeout_s <= 0:
            raise ValueError(f"train.collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        for name in ("steps", "log_every", "keep_last", "gradient_accumulation", "max_skipped_in_a_row"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "generations"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.loss_spike_factor != 0 and self.loss_spike_factor <= 1:
            raise ValueError(f"train.loss_spike_factor must be > 1 (or 0: off), got {self.loss_spike_factor}")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig
    stage: str = "pretrain"
    model: str = "tiny"  # a named model config or a YAML path
    model_overrides: dict = field(default_factory=dict)
    image_tokenizer: str | None = (
        None  # an exported VQ-VAE (.safetensors) for MVM and image generation; "random": untrained
    )
    deepspeed: str = "ds_configs/zero3_bf16.json"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)  # each task's masking, loss and sampling settings
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got '{self.stage}'")
        for stage in self.schedule.stages:  # each stage's task settings are whole and valid
            self.stage_tasks(stage)

    def stage_tasks(self, stage: StageConfig) -> TasksConfig:
        """The task settings of a schedule stage's steps: `tasks:` with the stage's own `settings` over them."""
        return self.tasks.overridden(stage.settings, f"schedule.stages.{stage.name}.settings")

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


def check_fits_model(cfg: ExperimentConfig, model_cfg: ModelConfig) -> None:
    """What the data decodes must fit the model, and the held-out shards must exist: checked at start-up rather
    than at the first batch, long caption or evaluation that does not."""
    decode = cfg.data.decode
    if decode.image_size != model_cfg.vision.image_size:
        raise ConfigError(
            f"data.decode.image_size: {decode.image_size} px, but model {model_cfg.name} takes "
            f"{model_cfg.vision.image_size} px images (vision.image_size)"
        )
    if decode.max_text_tokens > model_cfg.text.max_len:
        raise ConfigError(
            f"data.decode.max_text_tokens: {decode.max_text_tokens}, but model {model_cfg.name} reads "
            f"at most {model_cfg.text.max_len} text tokens (text.max_len)"
        )
    check_concepts(cfg, model_cfg)
    if cfg.data.eval_shards:
        try:
            expand_shards(cfg.data.eval_shards)
        except ShardSpecError as exc:
            raise ConfigError(f"data.eval_shards: {exc}") from None


def check_concepts(cfg: ExperimentConfig, model_cfg: ModelConfig) -> None:
    """The concept vocabulary must load and fit the model's concept embedding; the concept tasks need both."""
    path = cfg.data.decode.concepts
    scheduled = sorted({task for stage in cfg.schedule.stages for task in stage.tasks} & NEEDS_CONCEPTS)
    if scheduled and not (path and model_cfg.concept_vocab_size):
        raise ConfigError(
            f"schedule: {', '.join(scheduled)}: MVP's concept tasks need a concept vocabulary (data.decode.concepts: "
            "a concepts.json of python -m opt_ds.data.concepts) and a model with concept inputs "
            "(model_overrides.concept_vocab_size)"
        )
    if not path:
        return
    try:
        size = ConceptVocabulary.load(path).size
    except ValueError as exc:
        raise ConfigError(f"data.decode.concepts: {exc}") from None
    if model_cfg.concept_vocab_size < size:
        raise ConfigError(
            f"data.decode.concepts: {path} needs {size} concept ids, but model {model_cfg.name} embeds "
            f"{model_cfg.concept_vocab_size} (concept_vocab_size)"
        )


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False)
