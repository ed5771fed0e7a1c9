"""Stop requests (SIGTERM, SIGUSR1 from Slurm before the time limit): noted here, agreed on by all ranks at the
next step boundary, answered with a checkpoint and EXIT_RESUMABLE."""

from __future__ import annotations

import logging
import signal

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped on request after saving; run again with --resume auto
log = logging.getLogger("opt_ds.train.signals")


class StopRequest:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self.signal_name = ""
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("received %s: will checkpoint and stop at the next step boundary", self.signal_name)
