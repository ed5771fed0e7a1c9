"""Process-group set-up and the few collectives the trainer needs, for 1 process or many."""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist


HOST_TIMEOUT = timedelta(minutes=30)  # host-side waits include a rank saving a checkpoint or evaluating alone


def init_distributed(timeout_s: float = HOST_TIMEOUT.total_seconds()) -> tuple[int, int, int]:
    """Join the process group (gloo on CPU, nccl on CUDA) however the job was launched; -> (rank, local_rank, world).
    `timeout_s` bounds a device collective (NCCL, with its asynchronous error handling on); on CPU the one gloo
    group carries host waits too and keeps HOST_TIMEOUT."""
    import deepspeed

    from opt_ds.dist.launch import choose_gloo_interface, fix_mpi_local_rank, prepare_environment

    method = prepare_environment()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        choose_gloo_interface()
        timeout_s = max(timeout_s, HOST_TIMEOUT.total_seconds())
    else:  # a collective that times out aborts the communicator and raises, rather than hanging (torch's default)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    # MPI discovery sets MASTER_PORT to `distributed_port`: hand it the job's port, not DeepSpeed's fixed 29500
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=method == "mpi",
                               distributed_port=int(os.environ.get("MASTER_PORT") or 29500),
                               timeout=timedelta(seconds=timeout_s))
    if method == "mpi":
        fix_mpi_local_rank()
    init_host_group()
    unlink_shm_allreduce_buffer()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), local_rank, dist.get_world_size()


def unlink_shm_allreduce_buffer() -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer from /dev/shm once every rank has mapped it.

    DeepSpeed's shm op (CPU accelerator, all ranks on one node) creates a ~70 MB segment per rank and never
    unlinks it: every run left them in /dev/shm, which is RAM. The mappings stay valid after the unlink, and
    the memory is freed when the last rank exits, also after a crash.
    """
    if torch.cuda.is_available():
        return
    barrier()  # shm_initialize returns only after opening every other rank's buffer
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


_host_group: dist.ProcessGroup | None = None  # None: the default group serves CPU tensors itself


def init_host_group() -> None:
    """Collective: give the host-side collectives below (a few floats, flags, objects) a gloo group when the default
    group has no CPU backend. NCCL's serves CUDA tensors only: a CPU tensor reduced on it raises "No backend type
    associated with device type cpu", at the end of step 1 of every multi-GPU run. Megatron keeps a gloo group
    beside NCCL for the same values."""
    global _host_group
    if dist.is_initialized() and "cpu:" not in dist.get_backend_config():
        _host_group = dist.new_group(backend="gloo", timeout=HOST_TIMEOUT)


def close_distributed() -> None:
    """Collective: leave the process groups together at the end of a run. A process that exits with its gloo
    groups alive can abort in their destructors ("terminate called without an active exception", status 134)
    while a peer closes its side; torch also warns of an NCCL group never destroyed."""
    global _host_group
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
        _host_group = None


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=_host_group)
    return t.tolist()


def all_gather_object(obj):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_host_group)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank src's `obj` on every rank (as it is, without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_host_group)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=_host_group)


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any rank (e.g. a stop signal seen by one process)."""
    return all_reduce([1.0 if flag else 0.0], "max")[0] > 0
