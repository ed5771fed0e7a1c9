"""Count skipped samples and dropped modalities by reason, warning at a bounded rate."""

from __future__ import annotations

import logging
import time
from collections import Counter

log = logging.getLogger("opt_ds.data")


class SkipCounter:
    """Per-worker tally of bad input; warnings name shard and key, at most one per reason per interval."""

    def __init__(self, warn_interval_s: float = 30.0, counts: dict[str, int] | None = None):
        self.counts: Counter[str] = Counter(counts or {})
        self.warn_interval_s = warn_interval_s
        self._last_warn: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        if now - self._last_warn.get(reason, -1e18) < self.warn_interval_s:
            self._suppressed[reason] += 1
            return
        self._last_warn[reason] = now
        suppressed = self._suppressed.pop(reason, 0)
        extra = f" ({suppressed} more since last warning)" if suppressed else ""
        log.warning("skipped %s: %s%s%s", reason, where, f": {detail}" if detail else "", extra)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)
