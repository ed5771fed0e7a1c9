"""Sharded DeepSpeed checkpoints with the run state around them.

Layout: CK/step_00001000/ holds DeepSpeed's shards, data_rank{r}.json (each rank's reader position),
rng_rank{r}.pt, meta.json, and COMPLETE, written by rank 0 only after every rank has written and synced its
files to disk. COMPLETE lists every file with its size; resuming checks them, and a damaged newest checkpoint
(a truncated shard, a missing file) is reported and passed over for the previous one. `CK/latest` names the
newest complete one. A crash mid-save leaves a directory without COMPLETE, which resume ignores: the last good
checkpoint is never touched before the new one is complete.

`Checkpointer` is what the trainer holds: it finds the checkpoint to resume from (converting it when the world
size changed), loads it, saves and prunes; the functions below are its parts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from opt_ds.dist.process import all_gather_object, barrier, broadcast_object

log = logging.getLogger("opt_ds.train.checkpoint")
COMPLETE = "COMPLETE"
PREFIX = "step_"
EXIT_SAVE_FAILED = 4  # a checkpoint could not be written (a full disk): a requeued job would fail the same way


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, partial, or does not match this run."""


class SaveFailed(RuntimeError):
    """A checkpoint some rank could not write (a full disk): its folder is removed, the previous one stands."""


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / "meta.json").is_file()


def file_sizes(path: Path) -> dict[str, int]:
    """Every file under a checkpoint directory (but COMPLETE) -> its size in bytes."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name != COMPLETE)
    return {str(f.relative_to(path)): f.stat().st_size for f in files}


def damage(path: Path) -> str:
    """What is wrong with a complete checkpoint's files against the sizes its COMPLETE lists ('' when nothing;
    an empty COMPLETE, from before the lists were written, is taken as it is)."""
    listed = (path / COMPLETE).read_text().strip()
    if not listed:
        return ""
    try:
        expected = json.loads(listed)
    except json.JSONDecodeError:
        return f"{path / COMPLETE} is not the file list it should be"
    for name, size in expected.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} holds {f.stat().st_size} bytes, {size} were written"
    return ""


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted((p for p in found if is_complete(p)), key=lambda p: int(p.name[len(PREFIX) :]))


def newest_sound(root: Path) -> Path | None:
    """The newest complete checkpoint whose files match their list; damaged newer ones are reported and skipped."""
    for path in reversed(complete_checkpoints(root)):
        problem = damage(path)
        if not problem:
            return path
        log.error("checkpoint %s is damaged and is passed over: %s", path.name, problem)
    return None


def find_resume(root: Path, resume: str) -> Path | None:
    """`auto`: the newest sound checkpoint under root (or none); `none`; or a checkpoint directory (a checkpoints
    root: its newest sound one). A checkpoint named on its own must be complete and undamaged."""
    if resume == "none":
        return None
    if resume == "auto":
        return newest_sound(root)
    path = Path(resume)
    if path.is_dir() and not path.name.startswith(PREFIX):
        found = newest_sound(path)
        if found is None:
            raise CheckpointError(f"--resume {resume}: no complete, undamaged checkpoint in that directory")
        return found
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: checkpoint directory not found")
    if not is_complete(path):
        raise CheckpointError(f"--resume {resume}: partial checkpoint (no {COMPLETE} marker); a save did not finish")
    problem = damage(path)
    if problem:
        raise CheckpointError(f"--resume {resume}: damaged checkpoint: {problem}")
    return path


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sync(path: Path) -> None:
    """fsync a file or a directory (its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    engine, root: Path, step: int, rank: int, world_size: int, data_state: dict, extra_meta: dict, keep_last: int
) -> Path:
    """Collective: every rank calls it at the same step. A write that fails on any rank (a full disk) raises
    SaveFailed on every rank, with the partial folder removed."""
    tag = tag_for(step)
    path = root / tag
    if rank == 0 and path.exists():  # an earlier, interrupted save of this very step
        shutil.rmtree(path)
    barrier()
    recorded = getattr(engine, "write_failures", None)  # DeepSpeed's own writes (opt_ds.zero.patches)
    if recorded is not None:
        recorded.clear()
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    failures = list(recorded or [])
    try:
        _write_atomic(path / f"data_rank{rank}.json", json.dumps(data_state))
        torch.save({"torch": torch.get_rng_state()}, path / f"rng_rank{rank}.pt")
        os.sync()  # this node's writes reach the disk (or the file server) before COMPLETE can say they did
    except (OSError, RuntimeError) as exc:
        failures.append(exc)
    # every rank's shards and state are on disk, or some rank says why not
    errors = [e for e in all_gather_object(f"{type(failures[0]).__name__}: {failures[0]}" if failures else "") if e]
    failure = errors[0] if errors else None
    if rank == 0 and failure is None:
        try:
            meta = {"step": step, "world_size": world_size, "time": time.time(), **extra_meta}
            _write_atomic(path / "meta.json", json.dumps(meta, indent=1))
            _sync(path / "meta.json")
            _write_atomic(path / COMPLETE, json.dumps(file_sizes(path), indent=0))
            _sync(path / COMPLETE)
            _sync(path)  # the directory: its entries
            _write_atomic(root / "latest", tag)
            prune(root, keep_last)
        except OSError as exc:
            failure = f"{type(exc).__name__}: {exc}"
    if rank == 0 and failure is not None:
        failure = _failure_message(root, path, failure)
        shutil.rmtree(path, ignore_errors=True)
    failure = broadcast_object(failure if rank == 0 else None)
    if failure is not None:
        raise SaveFailed(failure)
    return path


def _failure_message(root: Path, path: Path, error: str) -> str:
    """What a failed save of `path` says: for a full disk, which device, what is free and what a checkpoint takes."""
    previous = [p for p in complete_checkpoints(root) if p != path]
    kept = "; the partial folder was removed" + (f" and {previous[-1].name} is intact" if previous else "")
    free = shutil.disk_usage(root).free
    written = sum(file_sizes(path).values()) if path.is_dir() else 0
    needed = max(sum(json.loads((previous[-1] / COMPLETE).read_text() or "{}").values()) if previous else 0, written)
    if "Errno 28" not in error and free > needed:
        return f"checkpoint {path.name} not saved: {error}{kept}"
    device, mount = _device_of(root)
    return (
        f"checkpoint {path.name} not saved: no space left on {device} (mounted on {mount}; {free / 1e9:.2f} GB "
        f"free, a checkpoint takes ~{needed / 1e9:.2f} GB){kept}"
    )


def _device_of(path: Path) -> tuple[str, str]:
    """(device, mount point) of the file system holding `path`, from /proc/mounts."""
    where = str(path.resolve())
    best = ("?", "/")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount = line.split()[:2]
            if (where == mount or where.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[1]):
                best = (device, mount)
    except OSError:
        pass
    return best


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and older partial ones."""
    done = complete_checkpoints(root)
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    newest = int(done[-1].name[len(PREFIX) :]) if done else -1
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and not is_complete(p):
            number = p.name[len(PREFIX) :].split("_")[0]
            if number.isdigit() and int(number) < newest:
                shutil.rmtree(p, ignore_errors=True)


def universal_tag(path: Path) -> str:
    return path.name + "_universal"


def convert_to_universal(path: Path, rank: int) -> str:
    """Rank 0 converts a checkpoint for another world size (DeepSpeed's ds_to_universal); -> the tag to load."""
    target = path.parent / universal_tag(path)
    if rank == 0 and not (target / COMPLETE).is_file():
        shutil.rmtree(target, ignore_errors=True)
        log.info("world size changed: converting %s to a universal checkpoint", path)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(path),
                "--output_folder",
                str(target),
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise CheckpointError(f"ds_to_universal failed for {path}:\n{proc.stderr[-3000:]}")
        (target / COMPLETE).write_text("")
    barrier()
    return target.name


def read_data_state(path: Path, rank: int) -> dict:
    """This rank's data-reader position in a checkpoint: read before the engine exists, so the loader's
    workers can start decoding while the engine is built."""
    data_file = path / f"data_rank{rank}.json"
    if not data_file.is_file():
        raise CheckpointError(f"{path}: no data state for rank {rank}")
    return json.loads(data_file.read_text())


def load(engine, path: Path, rank: int, universal: bool) -> None:
    """Load model, optimizer and scheduler state, and this rank's RNG state (not after a world-size change)."""
    tag = universal_tag(path) if universal else path.name
    loaded, _ = engine.load_checkpoint(
        str(path.parent), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {path.parent / tag}")
    rng_file = path / f"rng_rank{rank}.pt"
    if not universal and rng_file.is_file():
        torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint this run resumes from; `universal` when it was saved by another world size."""

    path: Path
    step: int
    saved_world_size: int
    universal: bool


class Checkpointer:
    """Saving, finding, resuming (same or different world size) and pruning of one run's checkpoints."""

    def __init__(self, root: Path, rank: int, world_size: int, keep_last: int):
        self.root, self.rank, self.world_size, self.keep_last = root, rank, world_size, keep_last

    def resume_point(self, resume: str, ds_config: dict, loader) -> ResumePoint | None:
        """The checkpoint `--resume` names (auto: the newest sound one), as rank 0 finds it, or None; `loader`
        continues from this rank's position in it. From another world size it is converted to a universal
        checkpoint first, `ds_config` told to load that, and the data stream restarts. Read before the engine
        exists, so the loader's workers decode while it is built; `load` then fills the engine."""
        # rank 0 decides, and every rank gets its answer or its error: ranks that each listed the folder could see
        # different checkpoints (NFS attribute caching)
        found: tuple[Path | None, str] = (None, "")
        if self.rank == 0:
            try:
                found = (find_resume(self.root, resume), "")
            except CheckpointError as exc:
                found = (None, str(exc))
        path, error = broadcast_object(found)
        if error:
            raise CheckpointError(error)
        if path is None:
            return None
        saved = read_meta(path)
        point = ResumePoint(path, saved["step"], saved["world_size"], saved["world_size"] != self.world_size)
        if point.universal:
            convert_to_universal(path, self.rank)
            ds_config["checkpoint"] = {"load_universal": True}
        else:
            loader.load_state_dict(read_data_state(path, self.rank))
        return point

    def load(self, engine, point: ResumePoint | None) -> int:
        """Model, optimizer, scheduler and RNG state into the engine; -> the step to continue from."""
        if point is None:
            return 0
        load(engine, point.path, self.rank, point.universal)
        if point.universal:
            log.warning(
                "world size changed (%d -> %d): model and optimizer resumed at step %d, the data stream restarts",
                point.saved_world_size,
                self.world_size,
                point.step,
            )
        log.info("resumed from %s at step %d", point.path, point.step)
        return point.step

    def save(self, engine, step: int, data_state: dict, meta: dict) -> Path:
        """Collective: every rank calls it at the same step; older checkpoints beyond keep_last are pruned."""
        return save(engine, self.root, step, self.rank, self.world_size, data_state, meta, self.keep_last)
