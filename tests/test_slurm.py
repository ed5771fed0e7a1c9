"""A real two-node Slurm cluster on this machine: sbatch pre-training, and preemption with requeue and resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from helpers import REPO, run_bounded, write_config

pytestmark = pytest.mark.slow
KIT = REPO / "slurm" / "local_cluster.sh"
SBATCH = REPO / "slurm" / "pretrain.sbatch"
NO_GPU = ["--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two slurmd (n1, n2) on this host; every daemon is stopped by PID at the end, even on failure."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm kit runs its daemons as root")
    root = tmp_path_factory.mktemp("slurm")
    try:
        proc = run_bounded(["bash", str(KIT), "start", str(root / "cluster"), "2", "1"], timeout=600)
        assert proc.returncode == 0, proc.stdout
        env = {**os.environ, "SLURM_CONF": str(root / "cluster" / "etc" / "slurm.conf")}
        yield {"root": root, "env": env}
    finally:
        subprocess.run(["bash", str(KIT), "stop", str(root / "cluster")], timeout=120)


def test_two_slurmd_node_model(tmp_path):
    """The other node model: two slurmd side by side on this host (distinct ports)."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm kit runs its daemons as root")
    env = {**os.environ, "OPT_DS_SLURM_NODES": "ports"}
    try:
        start = subprocess.run(
            ["bash", str(KIT), "start", str(tmp_path / "c"), "2", "1"],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert start.returncode == 0 and "model ports" in start.stdout, start.stdout + start.stderr
        out = subprocess.run(
            ["srun", "-N2", "-n2", "bash", "-c", "echo $SLURMD_NODENAME"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, "SLURM_CONF": str(tmp_path / "c" / "etc" / "slurm.conf")},
        )
        assert sorted(out.stdout.split()) == ["n1", "n2"], out.stderr
    finally:
        subprocess.run(["bash", str(KIT), "stop", str(tmp_path / "c")], timeout=120)
    assert not list((tmp_path / "c" / "run").glob("*.pid"))


def slurm(cluster, *cmd: str) -> str:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, env=cluster["env"], cwd=REPO)
    assert out.returncode == 0, f"{cmd}: {out.stderr}"
    return out.stdout


def job_field(cluster, job: str, field: str) -> str:
    match = re.search(rf"\b{field}=(\S+)", slurm(cluster, "scontrol", "show", "job", job))
    return match.group(1) if match else ""


def wait_for(predicate, timeout: float, what: str, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def submit(cluster, name: str, config: Path, *train_args: str, launch: str = "srun") -> tuple[str, Path]:
    runs = cluster["root"] / "runs"
    env = {**cluster["env"], "OPT_CONFIG": str(config), "OPT_OUTPUT": str(runs), "OPT_LAUNCH": launch}
    env.pop("MASTER_PORT", None)
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=2",
            *NO_GPU,
            f"--job-name={name}",
            f"--output={cluster['root']}/%x-%j.out",
            str(SBATCH),
            *train_args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0], runs / name


def finished(cluster, job: str) -> str:
    state = job_field(cluster, job, "JobState")
    return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") else ""


def released(cluster, job: str) -> bool:
    """Slurm holds a requeued job back ~2 min (its BeginTime); this starts it now. The update fails while the
    job's first run is still completing, so it is tried until it takes or the job has started by itself."""
    release = ["scontrol", "update", f"JobId={job}", "StartTime=now"]
    if subprocess.run(release, capture_output=True, timeout=60, env=cluster["env"]).returncode == 0:
        return True
    return job_field(cluster, job, "JobState") not in ("PENDING", "REQUEUED", "COMPLETING", "REQUEUE_FED")


def job_output(cluster, name: str) -> str:
    return "\n".join(p.read_text() for p in cluster["root"].glob(f"{name}-*.out"))


@pytest.fixture(scope="module")
def config(cluster, synthetic_shards) -> Path:
    return write_config(
        cluster["root"] / "config.yaml",
        synthetic_shards,
        schedule={"mode": "sum", "stages": [{"name": "all", "tasks": {"mlm": 1.0, "contrastive": 1.0}}]},
        optim={"lr": 1e-3, "warmup_steps": 1},
        train={"steps": 8, "save_every": 4},
    )


def summary_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("step", 0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("loss/total")}


def test_sbatch_pretraining_on_two_nodes(cluster, config):
    job, run_dir = submit(cluster, "optds-train", config)
    state = wait_for(lambda: finished(cluster, job), 600, f"job {job}")
    assert state == "COMPLETED", job_output(cluster, "optds-train")[-5000:]
    assert job_field(cluster, job, "NodeList") == "n[1-2]"
    netns = (cluster["root"] / "cluster" / "run" / "node_model").read_text().strip() == "netns"
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert "world of 2" in log, log[-2000:]
        if netns:  # each node its own namespace and hostname
            assert f"rank {rank} on host n{rank + 1}" in log
    values = losses(run_dir)
    assert sorted(values) == list(range(1, 9)) and values[8] < values[1]
    assert (run_dir / "checkpoints" / "step_00000008" / "COMPLETE").is_file()
    assert "launch srun" in job_output(cluster, "optds-train")


@pytest.mark.parametrize(
    "launch, signalled",
    [("srun", "steps"), ("deepspeed", "batch")],
    ids=["srun-usr1-to-the-ranks", "deepspeed-usr1-to-the-batch-shell"],
)
def test_preempted_job_checkpoints_requeues_and_finishes(cluster, config, launch, signalled):
    """USR1 to the ranks (Slurm's warning before the time limit, `scancel --signal`), or to the batch shell
    (`--signal=B:`, `scancel --batch`), which forwards it to the steps: the ranks checkpoint and exit 75, the job
    requeues and resumes. With the deepspeed launcher (its runner over srun) the shell used to signal the runner,
    which died of it: the job ended with status 138 while the ranks trained on headless."""
    name = f"optds-preempt-{launch}"
    train_args = ("--set", "train.steps=14", "--set", "train.save_every=0")
    job, run_dir = submit(cluster, name, config, *train_args, launch=launch)
    wait_for(lambda: summary_step(run_dir) >= 3, 600, "training to reach step 3", interval=0.5)
    slurm(cluster, "scancel", "--signal=USR1", *(["--batch"] if signalled == "batch" else []), job)
    wait_for(lambda: int(job_field(cluster, job, "Restarts") or 0) >= 1, 600, "the job to be requeued")
    wait_for(lambda: released(cluster, job), 300, f"requeued job {job} to be released", interval=1.0)
    state = wait_for(lambda: finished(cluster, job), 900, f"requeued job {job}")
    output = job_output(cluster, name)
    assert state == "COMPLETED", output[-5000:]
    assert "requeueing job" in output and "(restart 1)" in output and f"launch {launch}" in output
    stopped = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert "step_00000014" in stopped and len(stopped) == 2, stopped  # the stop's checkpoint and the final one
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "stopped at step" in log and "resumed from" in log
    assert sorted(losses(run_dir)) == list(range(1, 15))
    if launch == "deepspeed":
        assert (run_dir / "hostfile").read_text() == "n1 slots=1\nn2 slots=1\n"


def test_sbatch_with_mpi_discovery(cluster, config):
    """srun --mpi=pmix with DeepSpeed's mpi4py discovery."""
    job, run_dir = submit(cluster, "optds-mpi", config, "--set", "train.steps=2", launch="mpi")
    state = wait_for(lambda: finished(cluster, job), 600, f"job {job}")
    output = job_output(cluster, "optds-mpi")
    assert state == "COMPLETED", output[-5000:]
    assert "launch mpi" in output
    for rank in (0, 1):
        assert "world of 2" in (run_dir / "logs" / f"rank{rank}.log").read_text()
