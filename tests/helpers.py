"""What the tests share: running modules and multi-process commands with a timeout, and spawning gloo ranks."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import yaml

from opt_ds.dist.launch import free_port, local_training_command

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def run_module(
    module: str, *args: str, timeout: float = 300, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `python -m module args` from the repo root under a time bound."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def keys_of(batches) -> list[str]:
    """The sample keys of a batch stream, in order."""
    return [k for b in batches for k in b["keys"]]


def loader_workers() -> list:
    """This process's DataLoader workers (psutil processes): the forkserver's children."""
    import psutil

    server = next(p for p in psutil.Process().children() if "multiprocessing.forkserver" in " ".join(p.cmdline()))
    return server.children()


def take(batches, n: int) -> list[list[str]]:
    """The keys of the first `n` batches of a stream, batch by batch."""
    out = []
    for batch in batches:
        out.append(batch["keys"])
        if len(out) == n:
            return out
    raise AssertionError(f"the stream ended after {len(out)} batches")


def spawn_gloo_ranks(target, out_dir: Path, ranks: int = 2, timeout: float = 120) -> None:
    """Run target(rank, port, out_dir) in `ranks` spawned processes that share a free port; all must exit 0."""
    spawn = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [spawn.Process(target=target, args=(r, port, str(out_dir))) for r in range(ranks)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * ranks


def join_gloo_group(rank: int, port: int, world_size: int = 2, backend: str = "gloo") -> None:
    """Inside a spawned rank: the environment DeepSpeed reads, and the gloo process group (`backend`: e.g.
    "cuda:gloo", gloo for CUDA tensors only, as NCCL's group is)."""
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    dist.init_process_group(backend, rank=rank, world_size=world_size)


def run_bounded(
    cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run a (multi-process) command in its own session; on timeout kill the whole group, never leave ranks behind."""
    import signal

    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-5000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of a failed run
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def train_ranks(ranks: int, *args: str, timeout: float = 600, expect: int = 0) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N --module opt_ds.train ...` on a free port (CPU: N ranks, gloo)."""
    port = free_port()
    proc = run_bounded(local_training_command(ranks, *args, port=port), timeout)
    if proc.returncode != expect:
        raise AssertionError(f"training exited {proc.returncode}, expected {expect}:\n{proc.stdout[-6000:]}")
    leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"DeepSpeed's shm all-reduce buffers left in /dev/shm (RAM): {leaked}"
    return proc


def write_config(path: Path, triplets: Path, **sections) -> Path:
    """A small `tiny` experiment on `triplets`; each section given is merged into the default one (one level)."""
    cfg = {
        "model": "tiny",
        "data": {
            "sources": [{"name": "triplets", "shards": str(triplets)}],
            "decode": {"max_audio_seconds": 1.0, "max_text_tokens": 16},
            "reader": {"batch_size": 4, "num_workers": 1, "shuffle_buffer": 16},
        },
        "optim": {"lr": 3e-4, "warmup_steps": 2},
        "train": {"steps": 6, "log_every": 1, "save_every": 3, "keep_last": 3},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(cfg))
    return path


def modules_run(model, fn) -> list[str]:
    """The names of the modules `fn()` runs, in order (ZeRO-3 needs every rank to run the same)."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _i: order.append(names[mod])) for m in model.modules()]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return order
