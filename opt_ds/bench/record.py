"""`--record`: a kind's table into BENCHMARKS.md and its figures into benchmarks/records.jsonl (what the plot reads),
each with the command, the machine and the commit."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

import torch

from opt_ds.config.experiment import REPO_ROOT

RECORDS = REPO_ROOT / "benchmarks" / "records.jsonl"
PLOT = REPO_ROOT / "benchmarks" / "bench.png"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPU ({cpu}){gpu}, torch {torch.__version__}"


def commit() -> str:
    """HEAD, marked -dirty when tracked files other than the records themselves differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()

    changed = git(
        "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)BENCHMARKS.md", ":(exclude)benchmarks"
    )
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("-dirty" if changed else "")


def record(kind: str, argv: list[str], text: str, report: dict) -> None:
    """The table into BENCHMARKS.md, the figures into benchmarks/records.jsonl (what the plot reads)."""
    when, rev, where = str(datetime.date.today()), commit(), machine()
    entry = (
        f"\n### {kind}: {when}, commit {rev}\n\n"
        f"Machine: {where}\n\n```bash\npython -m opt_ds.bench {' '.join(argv)}\n```\n\n{text}\n"
    )
    with (REPO_ROOT / "BENCHMARKS.md").open("a") as f:
        f.write(entry)
    RECORDS.parent.mkdir(exist_ok=True)
    with RECORDS.open("a") as f:
        f.write(
            json.dumps({"kind": kind, "date": when, "commit": rev, "machine": where, "argv": argv, "report": report})
            + "\n"
        )
