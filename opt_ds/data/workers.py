"""The loader's worker processes: forked from a server started early, run at low priority, and bound to the life
of their rank."""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import threading
import time
import weakref
from pathlib import Path

import torch

RANK_CHECK_S = 1.0  # how often a worker looks for its rank


def start_worker_server() -> None:
    """Start the forkserver that loader workers fork from, with the reader imported and the stop signals
    (SIGUSR1, SIGTERM) blocked.

    Call it early (before the engine is built): the server imports torch and the reader once while the run sets
    up, and a worker then starts as a fork of it, not as a fresh interpreter importing torch (seconds, during the
    first steps of a run).

    A stop signal often goes to every process of the run: Slurm's warning before the time limit (`--signal=USR1@`
    without `B:`, `scancel --signal=USR1`) to every process of the job step, SIGTERM from the deepspeed launcher to
    each rank's whole process tree. A worker killed by it, or whose server is, broke the rank's batch stream before
    the rank could checkpoint. The server, the workers it forks and multiprocessing's resource tracker inherit the
    blocked signals; this process unblocks them at once. A worker still ends with its rank (`init_worker`), when
    the loader tells it to, and at exit (`end_at_exit`).
    """
    multiprocessing.get_context("forkserver").set_forkserver_preload(["opt_ds.data.stream"])
    stops = {signal.SIGUSR1, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        # the tracker first: starting it unblocks SIGTERM (which it ignores itself) in this thread
        multiprocessing.resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def init_worker(nice: int, rank_pid: int, _worker_id: int) -> None:
    """DataLoader's worker_init_fn: one thread, `nice`, batches shared by name, and an exit when the rank
    `rank_pid` is gone.

    Shared by name (`file_system`), not by file descriptor: a descriptor is handed over by the worker's own
    resource-sharer thread when the rank unpickles the batch, so a worker frozen whole (SIGSTOP, a cgroup freeze)
    after queueing a batch held the rank in that handshake for ever, past data.reader.timeout_s. A name is opened
    without the worker's help."""
    torch.set_num_threads(1)
    torch.multiprocessing.set_sharing_strategy("file_system")
    os.nice(nice)
    threading.Thread(target=_exit_without, args=(rank_pid,), name="rank-watch", daemon=True).start()


def _exit_without(rank_pid: int) -> None:
    """A worker is a child of the forkserver, not of its rank, and holds the server's and the resource tracker's
    liveness pipes open. When the rank is killed (kill -9, the OOM killer), torch's watchdog, which watches the
    worker's parent, never fires: the worker, the server and the tracker lived on for good. The worker exits
    within RANK_CHECK_S of its rank; the server and the tracker then see their pipes close and exit too."""
    while _alive(rank_pid):
        time.sleep(RANK_CHECK_S)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed rank whose launcher died too stays a zombie until init reaps it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def end_at_exit(workers) -> None:
    """At interpreter exit, end the workers of `workers` (a DataLoader iterator) before multiprocessing joins them.
    Its own exit hook terminates (SIGTERM, which the workers block) and then joins, for ever, any worker whose
    iterator was not shut down yet (one still referenced at exit). The workers are told to stop as torch does at
    shutdown; one that does not within torch's wait is killed."""
    still_there = weakref.ref(workers)

    def end() -> None:
        iterator = still_there()
        if iterator is not None:
            iterator._shutdown_workers()
        for process in multiprocessing.active_children():
            process.kill()

    atexit.register(end)
