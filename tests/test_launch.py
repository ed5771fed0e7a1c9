"""How a process finds its place in the job: Slurm variables, MPI, hostfiles."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from helpers import free_port, join_gloo_group, run_bounded, run_module, spawn_gloo_ranks
from opt_ds.dist.hostfile import expand_nodelist, hostfile, slurm_slots
from opt_ds.dist.launch import discovery_method, port_for_job, slurm_env

SLURM = {
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_NODELIST": "node[07-08]",
    "SLURM_JOB_ID": "4242",
}


def test_slurm_variables_give_rank_world_and_master():
    env = slurm_env(SLURM)
    assert env == {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_SIZE": "2",
        "MASTER_ADDR": "node07",
        "MASTER_PORT": str(port_for_job("4242")),
    }
    assert slurm_env({**SLURM, "MASTER_PORT": "1234", "MASTER_ADDR": "x"})["MASTER_PORT"] == "1234"


def test_job_ports_differ_between_jobs_and_survive_requeue():
    assert port_for_job("4242") == port_for_job("4242") != port_for_job("4243")
    assert all(20000 <= port_for_job(str(j)) < 40000 for j in (0, 19999, 20000, 10**9))


def test_discovery_method():
    assert discovery_method({"RANK": "0", "WORLD_SIZE": "2", **SLURM}) == "env"  # launcher already set it
    assert discovery_method(SLURM) == "slurm"
    assert discovery_method({**SLURM, "OMPI_COMM_WORLD_RANK": "0"}) == "mpi"
    assert discovery_method({**SLURM, "PMIX_RANK": "0"}) == "mpi"
    assert discovery_method({}) == "single"
    assert discovery_method({**SLURM, "OPT_DS_DISCOVERY": "mpi"}) == "mpi"


def test_nodelists_and_hostfiles():
    assert expand_nodelist("gpu[01-03,7],login") == ["gpu01", "gpu02", "gpu03", "gpu7", "login"]
    assert expand_nodelist("a1,b2") == ["a1", "b2"]
    assert hostfile(["n1", "n2"], 8) == "n1 slots=8\nn2 slots=8\n"
    assert slurm_slots({"SLURM_TASKS_PER_NODE": "4(x2)"}) == 4 and slurm_slots({}) == 1


def test_hostfile_cli():
    assert run_module("opt_ds.dist.hostfile", "--nodes", "n[1-2]", "--slots", "2").stdout == "n1 slots=2\nn2 slots=2\n"
    out = run_module(
        "opt_ds.dist.hostfile", "--slurm", env={"SLURM_JOB_NODELIST": "c[3-4]", "SLURM_NTASKS_PER_NODE": "1"}
    ).stdout
    assert out == "c3 slots=1\nc4 slots=1\n"
    proc = run_module("opt_ds.dist.hostfile", "--slurm", check=False, env={"SLURM_JOB_NODELIST": ""})
    assert proc.returncode == 2


# --- real multi-process launches (slow) ---------------------------------------------------------


@pytest.fixture(scope="module")
def small_config(tmp_path_factory, synthetic_shards) -> Path:
    path = tmp_path_factory.mktemp("launch") / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": "tiny",
                "data": {
                    "sources": [{"name": "t", "shards": str(synthetic_shards)}],
                    "decode": {"max_audio_seconds": 1.0, "max_text_tokens": 16},
                    "reader": {"batch_size": 2, "num_workers": 0},
                },
                "schedule": {"mode": "sum", "stages": [{"name": "all", "tasks": {"mlm": 1.0, "contrastive": 1.0}}]},
                "train": {"steps": 2, "log_every": 1, "save_every": 0},
            }
        )
    )
    return path


def assert_world_of_two(run_dir: Path, output: str) -> None:
    for rank in (0, 1):
        log = run_dir / "logs" / f"rank{rank}.log"
        assert log.is_file() and "world of 2" in log.read_text(), output[-4000:]
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").is_file()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI is installed by make setup")
def test_mpirun_uses_deepspeeds_mpi4py_discovery(small_config, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        "2",
        "-x",
        "PATH",
        "-x",
        "TORCH_EXTENSIONS_DIR",
        "-x",
        f"MASTER_PORT={free_port()}",
        sys.executable,
        "-m",
        "opt_ds.train",
        "--config",
        str(small_config),
        "--output",
        str(run_dir),
    ]
    proc = run_bounded(cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert_world_of_two(run_dir, proc.stdout)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI is installed by make setup")
def test_deepspeed_launcher_with_a_hostfile_and_openmpi(small_config, tmp_path):
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    run_dir = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--hostfile",
        str(tmp_path / "hostfile"),
        "--no_ssh_check",
        "--launcher",
        "openmpi",
        "--launcher_args",
        "--allow-run-as-root --oversubscribe",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--module",
        "opt_ds.train",
        "--config",
        str(small_config),
        "--output",
        str(run_dir),
    ]
    proc = run_bounded(cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert_world_of_two(run_dir, proc.stdout)


@pytest.mark.slow
def test_torchrun(small_config, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "opt_ds.train",
        "--config",
        str(small_config),
        "--output",
        str(run_dir),
    ]
    proc = run_bounded(cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert_world_of_two(run_dir, proc.stdout)


def host_collectives_rank(rank: int, port: int, out_dir: str) -> None:
    """One of two ranks whose default group serves CUDA tensors only, as NCCL's does (here gloo for CUDA alone):
    every collective opt_ds issues on host values."""
    join_gloo_group(rank, port, backend="cuda:gloo")
    from opt_ds.dist import process

    process.init_host_group()
    results = {
        "sum": process.all_reduce([1.0, float(rank)], "sum"),
        "any": process.any_rank(rank == 1),
        "gathered": process.all_gather_object({"rank": rank}),
        "broadcast": process.broadcast_object(f"from rank {rank}"),
    }
    process.barrier()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    process.close_distributed()


def test_host_collectives_work_when_the_default_group_serves_devices_only(tmp_path):
    """On NCCL a CPU tensor reduced on the default group raised "No backend type associated with device type cpu"
    at the end of step 1 of every multi-GPU run; the host values now go through a gloo group."""
    spawn_gloo_ranks(host_collectives_rank, tmp_path)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results == {
            "sum": [2.0, 1.0],
            "any": True,
            "gathered": [{"rank": 0}, {"rank": 1}],
            "broadcast": "from rank 0",
        }
