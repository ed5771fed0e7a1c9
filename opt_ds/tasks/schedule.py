"""Which tasks run at a step: MVP stages by step boundaries, then one weighted draw or a weighted sum.

The draw depends only on (seed, step): every rank runs the same task set, as ZeRO-3 requires. The scheduler holds
no state of its own, so a run resumed with another schedule in its config continues on that one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

TASK_MODES = ("sample", "sum")


@dataclass(frozen=True)
class StageConfig:
    name: str
    tasks: dict[str, float]
    until_step: int | None = None  # exclusive; None for the last stage
    isolate: bool = False  # uni-modal stage: token tasks see only their own modality

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError(f"stage '{self.name}' has no tasks")
        for task, weight in self.tasks.items():
            if weight <= 0:
                raise ValueError(f"stage '{self.name}': weight of task '{task}' must be > 0, got {weight}")


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
    def __init__(self, cfg: ScheduleConfig, known_tasks: set[str] | None = None):
        self.cfg = cfg
        if known_tasks is not None:
            for stage in cfg.stages:
                unknown = sorted(set(stage.tasks) - known_tasks)
                if unknown:
                    raise ValueError(
                        f"stage '{stage.name}': unknown task '{unknown[0]}' (known: {', '.join(sorted(known_tasks))})"
                    )

    def stage(self, step: int) -> tuple[int, StageConfig]:
        for i, stage in enumerate(self.cfg.stages):
            if stage.until_step is None or step < stage.until_step:
                return i, stage
        raise AssertionError("unreachable: the last stage has no end")

    def plan(self, step: int) -> list[tuple[str, float]]:
        """The (task, loss weight) pairs of this step."""
        _, stage = self.stage(step)
        names = sorted(stage.tasks)
        if self.cfg.mode == "sum":
            return [(n, stage.tasks[n]) for n in names]
        rng = random.Random(f"{self.cfg.seed}-task-{step}")
        return [(rng.choices(names, weights=[stage.tasks[n] for n in names])[0], 1.0)]
