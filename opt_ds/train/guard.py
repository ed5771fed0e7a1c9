"""The divergence guard: a micro-step whose loss is not finite, or spikes, on any rank updates nothing and is
counted; too many in a row end the run with EXIT_DIVERGED rather than training on, and saving, a broken model.

Under bf16, DeepSpeed's ZeRO-3 applies an update whatever the gradients hold (only fp16 checks for overflow), so
the check is on the losses, before the backward pass, and every rank skips the same micro-step, as ZeRO-3
requires. A spike is a task's loss above `spike_factor` x the median of that task's last accepted losses (per
task: in `sample` mode the tasks drawn have losses of different scales). A learning rate far too high shows as a
spike, not as a NaN: the loss of the tiny model at lr 1e4 goes from 13.8 to 2.4e9 in one step and stays finite.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import defaultdict, deque

from opt_ds.dist.process import all_reduce

EXIT_DIVERGED = 3
HISTORY = 20  # accepted losses per task that the median is taken over
log = logging.getLogger(__name__)


class DivergenceGuard:
    def __init__(self, max_in_a_row: int, spike_factor: float):
        self.max_in_a_row, self.spike_factor = max_in_a_row, spike_factor
        self.history: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=HISTORY))
        self.skipped = 0  # micro-steps skipped so far in this run
        self.in_a_row = 0

    def problem(self, loss: float, metrics: dict[str, float]) -> str:
        """What is wrong with this rank's micro-step ('' when nothing)."""
        if not math.isfinite(loss):
            return "the loss is not finite"
        for key, value in metrics.items():
            task = key.removesuffix("/loss")
            if task == key:
                continue
            past = self.history[task]
            if self.spike_factor > 0 and past and value > self.spike_factor * statistics.median(past):
                return (
                    f"{task} loss {value:.4g} > {self.spike_factor:g} x its recent median {statistics.median(past):.4g}"
                )
        return ""

    def accept(self, loss: float, metrics: dict[str, float], step: int) -> bool:
        """Collective: whether every rank's micro-step is sound; if not, it is counted and must not update."""
        problem = self.problem(loss, metrics)
        if all_reduce([float(bool(problem))], "max")[0] == 0:
            self.in_a_row = 0
            for key, value in metrics.items():
                if key.endswith("/loss"):
                    self.history[key.removesuffix("/loss")].append(value)
            return True
        self.skipped += 1
        self.in_a_row += 1
        log.warning(
            "step %d skipped (%d in a row, at most %d): %s",
            step,
            self.in_a_row,
            self.max_in_a_row,
            problem or "on another rank",
        )
        return False

    @property
    def diverged(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    @property
    def healthy(self) -> bool:
        """Whether the last micro-step was sound (a checkpoint now holds a model worth resuming)."""
        return self.in_a_row == 0
