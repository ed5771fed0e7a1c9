"""The `tasks:` section of the experiment config: each task's masking, loss and sampling settings.

    tasks:
      mlm: {mask_ratio: 0.15, whole_modality_prob: 0.3}
      text_gen: {partner_split: [0.5, 0.2, 0.3]}

Every key is optional; the defaults are the settings BENCHMARKS.md was measured with (UNIMO's and MVP's
15% masking, a whole modality masked 30% of the time). A task is built from its section by `build_tasks`; a
schedule stage may change some keys for its own steps (its `settings`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from opt_ds.config.fields import ConfigError, from_dict, to_dict


def _check_share(where: str, value: float, low_open: bool = False) -> None:
    if not (0 < value <= 1 if low_open else 0 <= value <= 1):
        raise ValueError(f"tasks.{where} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")


def _check_distribution(where: str, values: list[float], size: int) -> None:
    if len(values) != size or any(v < 0 for v in values) or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ValueError(f"tasks.{where} needs {size} non-negative shares that sum to 1, got {values}")


@dataclass(frozen=True)
class MaskingConfig:
    """Token-level tasks (MLM, MVM): mask_ratio of the modality's tokens, or, with whole_modality_prob, all."""

    mask_ratio: float = 0.15
    whole_modality_prob: float = 0.3

    def check(self, task: str) -> None:
        _check_share(f"{task}.mask_ratio", self.mask_ratio, low_open=True)
        _check_share(f"{task}.whole_modality_prob", self.whole_modality_prob)


@dataclass(frozen=True)
class AudioMaskingConfig(MaskingConfig):
    """MAM: masking as MLM/MVM; frame regression plus contrastive_weight x an InfoNCE over the masked tokens."""

    contrastive_weight: float = 0.5
    temperature: float = 0.1

    def check(self, task: str) -> None:
        super().check(task)
        if self.contrastive_weight < 0 or self.temperature <= 0:
            raise ValueError(
                f"tasks.{task}: contrastive_weight must be >= 0 and temperature > 0, "
                f"got {self.contrastive_weight} and {self.temperature}"
            )


@dataclass(frozen=True)
class GenerationConfig:
    """Generation from the partner modalities. Per sample, partner_split shares: the first partner left out whole
    (the second partner_mask_ratio-masked), the second left out whole, both partner_mask_ratio-masked. Text
    generation's partners are (image, audio), image generation's (text, audio).

    text_gen only: denoise_ratio of a text-only sample's words corrupted (UNIMO's text-to-text generation).
    image_gen only: unconditional_share of the samples see no partner (for classifier-free guidance)."""

    partner_split: list[float] = field(default_factory=lambda: [0.3, 0.3, 0.4])
    partner_mask_ratio: float = 0.15
    denoise_ratio: float = 0.3
    unconditional_share: float = 0.1

    def check(self, task: str) -> None:
        _check_distribution(f"{task}.partner_split", self.partner_split, 3)
        _check_share(f"{task}.partner_mask_ratio", self.partner_mask_ratio, low_open=True)
        _check_share(f"{task}.denoise_ratio", self.denoise_ratio, low_open=True)
        _check_share(f"{task}.unconditional_share", self.unconditional_share)


@dataclass(frozen=True)
class MatchingConfig:
    """Modality matching: how often each of the 5 classes is drawn (matched, image swapped, audio swapped, both
    from one other sample, both from two)."""

    class_probs: list[float] = field(default_factory=lambda: [0.2] * 5)

    def check(self, task: str) -> None:
        _check_distribution(f"{task}.class_probs", self.class_probs, 5)


@dataclass(frozen=True)
class NoSettings:
    """A task without settings of its own (contrastive learning and concept grounding learn their temperature)."""

    def check(self, task: str) -> None:
        pass


@dataclass(frozen=True)
class PairMatchingConfig:
    """Matching against the hardest in-batch negatives: the modalities matched with the caption."""

    partners: list[str] = field(default_factory=lambda: ["image", "audio"])

    def check(self, task: str) -> None:
        if (
            not self.partners
            or not set(self.partners) <= {"image", "audio"}
            or len(set(self.partners)) < len(self.partners)
        ):
            raise ValueError(f"tasks.{task}.partners needs one or both of image and audio, got {self.partners}")


@dataclass(frozen=True)
class TasksConfig:
    mlm: MaskingConfig = field(default_factory=MaskingConfig)
    mvm: MaskingConfig = field(default_factory=MaskingConfig)
    mam: AudioMaskingConfig = field(default_factory=AudioMaskingConfig)
    text_gen: GenerationConfig = field(default_factory=GenerationConfig)
    image_gen: GenerationConfig = field(default_factory=GenerationConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    contrastive: NoSettings = field(default_factory=NoSettings)
    mcr: MaskingConfig = field(default_factory=MaskingConfig)  # masked concept recovery
    hard_matching: PairMatchingConfig = field(default_factory=PairMatchingConfig)
    grounding: NoSettings = field(default_factory=NoSettings)

    def __post_init__(self) -> None:
        for name, settings in vars(self).items():
            settings.check(name)

    def overridden(self, overrides: dict[str, dict], where: str) -> TasksConfig:
        """These settings with a schedule stage's `settings` over them: only the keys it names change."""
        merged = to_dict(self)
        for task, values in overrides.items():
            if task not in merged:
                raise ConfigError(f"{where}: unknown task '{task}' (known: {', '.join(merged)})")
            if not isinstance(values, dict):
                raise ConfigError(f"{where}.{task}: expected a mapping, got {values!r}")
            merged[task] = merged[task] | values
        return from_dict(TasksConfig, merged, where)
