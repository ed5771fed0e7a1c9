"""Which tasks run at a step, and which weights they train: MVP stages by step boundaries, then one weighted draw
or a weighted sum.

A stage may train only some model components (`trains`) at its own peak rate (`lr`): e.g. a captioning stage
after pre-training in which the text decoder alone learns to read what the frozen encoders learned. The draw
depends only on (seed, step): every rank runs the same task set, as ZeRO-3 requires. The scheduler holds no state
of its own, so a run resumed with another schedule in its config continues on that one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Mapping

from opt_ds.model.opt import COMPONENTS, ENCODER_COMPONENTS

TASK_MODES = ("sample", "sum")


@dataclass(frozen=True)
class StageConfig:
    name: str
    tasks: dict[str, float]
    until_step: int | None = None  # exclusive; None for the last stage
    isolate: bool = False  # uni-modal stage: token tasks see only their own modality
    # the model components whose weights the stage updates (None: all); the others keep theirs (learning rate 0),
    # and when it trains no encoder (text, vision, audio, fusion) they run as at inference, without gradients
    trains: list[str] | None = None
    # the stage's own peak rate (x optim.lr_scale): cosine from it to lr x optim.min_lr_ratio over the stage's
    # steps, no warm-up; None: the run's warm-up and cosine go on through the stage
    lr: float | None = None
    # task settings for the stage's steps over the run's `tasks:` section, e.g. {text_gen: {partner_split: [...]}}
    settings: dict[str, dict] = field(default_factory=dict)
    mode: str | None = None  # the stage's own mixing mode (sample / sum); None: the schedule's

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError(f"stage '{self.name}' has no tasks")
        for task, weight in self.tasks.items():
            if weight <= 0:
                raise ValueError(f"stage '{self.name}': weight of task '{task}' must be > 0, got {weight}")
        if self.trains is not None:
            unknown = sorted(set(self.trains) - set(COMPONENTS))
            if unknown or not self.trains:
                raise ValueError(
                    f"stage '{self.name}': trains needs model components (known: {', '.join(COMPONENTS)}), "
                    f"got {self.trains}"
                )
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"stage '{self.name}': lr must be > 0, got {self.lr}")
        if self.mode is not None and self.mode not in TASK_MODES:
            raise ValueError(f"stage '{self.name}': mode must be one of {TASK_MODES}, got '{self.mode}'")

    def updates(self, component: str) -> bool:
        return self.trains is None or component in self.trains

    @property
    def encoders_frozen(self) -> bool:
        """True when the stage trains no encoder: they run in eval mode without gradients."""
        return not any(self.updates(c) for c in ENCODER_COMPONENTS)


@dataclass(frozen=True)
class ScheduleConfig:
    mode: str = "sample"
    seed: int = 0
    stages: list[StageConfig] = field(
        default_factory=lambda: [
            StageConfig(
                "all",
                {
                    "mlm": 1.0,
                    "mvm": 1.0,
                    "mam": 1.0,
                    "text_gen": 1.0,
                    "image_gen": 1.0,
                    "matching": 1.0,
                    "contrastive": 1.0,
                },
            )
        ]
    )

    def __post_init__(self) -> None:
        if self.mode not in TASK_MODES:
            raise ValueError(f"mode must be one of {TASK_MODES}, got '{self.mode}'")
        if not self.stages:
            raise ValueError("at least one stage is needed")
        previous = 0
        for i, stage in enumerate(self.stages):
            last = i == len(self.stages) - 1
            if last != (stage.until_step is None):
                raise ValueError(f"stage '{stage.name}': only the last stage has no until_step")
            if stage.until_step is not None:
                if stage.until_step <= previous:
                    raise ValueError(f"stage '{stage.name}': until_step {stage.until_step} must exceed {previous}")
                previous = stage.until_step


class TaskScheduler:
    def __init__(self, cfg: ScheduleConfig, known_tasks: Mapping[str, type] | None = None):
        """`known_tasks`: task name -> task class (its `components`), to check each stage's tasks against."""
        self.cfg = cfg
        if known_tasks is not None:
            for stage in cfg.stages:
                unknown = sorted(set(stage.tasks) - set(known_tasks))
                if unknown:
                    raise ValueError(
                        f"stage '{stage.name}': unknown task '{unknown[0]}' (known: {', '.join(sorted(known_tasks))})"
                    )
                for task in stage.tasks:
                    if not any(stage.updates(c) for c in known_tasks[task].components):
                        raise ValueError(
                            f"stage '{stage.name}': task '{task}' runs {', '.join(known_tasks[task].components)}, "
                            f"none of which the stage trains ({', '.join(stage.trains or [])})"
                        )

    def stage(self, step: int) -> tuple[int, StageConfig]:
        for i, stage in enumerate(self.cfg.stages):
            if stage.until_step is None or step < stage.until_step:
                return i, stage
        raise AssertionError("unreachable: the last stage has no end")

    def span(self, index: int, total_steps: int) -> tuple[int, int]:
        """The steps [first, end) of stage `index` in a run of total_steps."""
        first = self.cfg.stages[index - 1].until_step if index > 0 else 0
        return first, self.cfg.stages[index].until_step or total_steps

    def plan(self, step: int) -> list[tuple[str, float]]:
        """The (task, loss weight) pairs of this step."""
        _, stage = self.stage(step)
        names = sorted(stage.tasks)
        if (stage.mode or self.cfg.mode) == "sum":
            return [(n, stage.tasks[n]) for n in names]
        rng = random.Random(f"{self.cfg.seed}-task-{step}")
        return [(rng.choices(names, weights=[stage.tasks[n] for n in names])[0], 1.0)]
