"""Stop requests (SIGTERM, SIGUSR1 from Slurm before the time limit): noted here, agreed on by all ranks at the
next step boundary, answered with a checkpoint and EXIT_RESUMABLE.

`python -m opt_ds.train` installs the handlers on its first line, before torch or DeepSpeed is imported: a signal
during the minute of start-up (imports, op builds, the engine) used to end the rank by the signal's default action,
an exit status Slurm does not requeue."""

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


_process_stop: StopRequest | None = None


def stop_request() -> StopRequest:
    """The process's one StopRequest, its handlers installed by the first call."""
    global _process_stop
    if _process_stop is None:
        _process_stop = StopRequest()
    return _process_stop
