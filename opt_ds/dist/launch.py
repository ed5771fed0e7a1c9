"""Where this process sits in the job: RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from whatever started it.

- deepspeed launcher / torchrun: the variables are already set; nothing to do.
- `srun python -m opt_ds.train` (Slurm): from SLURM_PROCID/LOCALID/NTASKS; MASTER_ADDR is the first
  host of SLURM_JOB_NODELIST, MASTER_PORT is derived from the job id (unless set).
- `mpirun` / `srun --mpi=pmix` (MPI): DeepSpeed's mpi4py discovery (rank 0 broadcasts its address);
  LOCAL_RANK then comes from OMPI_COMM_WORLD_LOCAL_RANK when Open MPI sets it, because mpi4py's
  discovery counts ranks per *hostname* and is wrong when several nodes report the same hostname.
- nothing at all: a world of one on a free local port.
Force a method with OPT_DS_DISCOVERY=env|slurm|mpi|single.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from opt_ds.dist.hostfile import expand_nodelist

PORT_BASE, PORT_SPAN = 20000, 20000


def port_for_job(job_id: str) -> int:
    """A port that differs between concurrent jobs and stays the same when a job is requeued."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def discovery_method(env: dict[str, str]) -> str:
    forced = env.get("OPT_DS_DISCOVERY")
    if forced:
        return forced
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"
    if "OMPI_COMM_WORLD_RANK" in env or "PMIX_RANK" in env or "PMI_RANK" in env:
        return "mpi"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    return "single"


def slurm_env(env: dict[str, str]) -> dict[str, str]:
    ntasks, procid = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    return {
        "RANK": str(procid),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": str(ntasks),
        "LOCAL_SIZE": str(ntasks // max(1, nodes)),
        "MASTER_ADDR": env.get("MASTER_ADDR") or expand_nodelist(env["SLURM_JOB_NODELIST"])[0],
        "MASTER_PORT": env.get("MASTER_PORT") or str(port_for_job(env["SLURM_JOB_ID"])),
    }


def free_port() -> int:
    """A TCP port free on this host right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_training_command(ranks: int, *train_args: str, port: int | None = None) -> list[str]:
    """`deepspeed --num_gpus RANKS --master_port PORT --module opt_ds.train TRAIN_ARGS`: a run of RANKS ranks on
    this machine, by the deepspeed launcher of this Python (run as a module: a package installed with --target, as
    on a GPU machine without network, has its `deepspeed` script elsewhere), on `port` (default: a free one)."""
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    port = free_port() if port is None else port
    return [*launcher, "--num_gpus", str(ranks), "--master_port", str(port), "--module", "opt_ds.train", *train_args]


def single_env(env: dict[str, str]) -> dict[str, str]:
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"), "MASTER_PORT": env.get("MASTER_PORT") or str(free_port())}


def prepare_environment() -> str:
    """Fill os.environ for torch.distributed; -> the discovery method used (mpi is completed by DeepSpeed)."""
    method = discovery_method(dict(os.environ))
    if method == "slurm":
        os.environ.update(slurm_env(dict(os.environ)))
    elif method == "single":
        os.environ.update(single_env(dict(os.environ)))
    elif method not in ("env", "mpi"):
        raise ValueError(f"OPT_DS_DISCOVERY must be env, slurm, mpi or single; got '{method}'")
    return method


def interface_towards(address: str) -> str | None:
    """The network interface this host uses to reach `address` (no packet is sent)."""
    import psutil

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(address), 9))
            local = s.getsockname()[0]
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addresses):
            return name
    return None


def choose_gloo_interface() -> None:
    """gloo advertises the address its hostname resolves to, which is wrong when node names do not resolve
    (or resolve to 127.0.0.1); bind it to the interface that reaches MASTER_ADDR instead."""
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.environ.get("MASTER_ADDR"):
        name = interface_towards(os.environ["MASTER_ADDR"])
        if name:
            os.environ["GLOO_SOCKET_IFNAME"] = name


def fix_mpi_local_rank() -> None:
    """After DeepSpeed's mpi4py discovery: trust the launcher's own local rank where it gives one."""
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK"):
        if var in os.environ:
            os.environ["LOCAL_RANK"] = os.environ[var]
            break
    for var in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMIX_LOCAL_SIZE"):
        if var in os.environ:
            os.environ["LOCAL_SIZE"] = os.environ[var]
            break
