"""Write a DeepSpeed hostfile ("host slots=N" per line) from a Slurm allocation or a node list.

    python -m opt_ds.dist.hostfile --slurm > hostfile                 # inside an allocation
    python -m opt_ds.dist.hostfile --nodes "gpu[01-04]" --slots 8 > hostfile
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm node-list syntax -> host names ("a[1-3,7],b" -> a1 a2 a3 a7 b); scontrol when available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()
    except (FileNotFoundError, subprocess.TimeoutExpired):
        pass
    hosts = []
    for prefix, ranges in re.findall(r"([^,\[]+)(?:\[([^\]]+)\])?,?", nodelist):
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            hosts += [f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return hosts


def slurm_slots(env: dict[str, str]) -> int:
    """Tasks per node of the allocation ("8(x4)" or "8")."""
    for var in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_GPUS_ON_NODE"):
        if env.get(var):
            return int(re.match(r"\d+", env[var]).group())
    return 1


def hostfile(hosts: list[str], slots: int) -> str:
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opt_ds.dist.hostfile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slurm", action="store_true", help="from SLURM_JOB_NODELIST and the tasks per node")
    parser.add_argument("--nodes", help="a node list (Slurm syntax or comma-separated)")
    parser.add_argument("--slots", type=int, help="ranks per node (default: the allocation's tasks per node, else 1)")
    args = parser.parse_args(argv)
    if args.slurm == bool(args.nodes):
        parser.error("give exactly one of --slurm and --nodes")
    if args.slurm and not os.environ.get("SLURM_JOB_NODELIST"):
        parser.error("--slurm: SLURM_JOB_NODELIST is not set (not inside an allocation)")
    hosts = expand_nodelist(os.environ["SLURM_JOB_NODELIST"] if args.slurm else args.nodes)
    if not hosts:
        parser.error("the node list names no host")
    sys.stdout.write(hostfile(hosts, args.slots or slurm_slots(dict(os.environ))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
