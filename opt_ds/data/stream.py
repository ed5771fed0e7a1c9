"""Resumable, deterministic streaming of WebDataset shards for one rank.

Every (rank, worker) pair is a *slot* that reads a deterministic stream per source: per epoch the
shard order is shuffled with (seed, source, epoch), split across slots (by shard, or by sample when
there are fewer shards than slots), and the samples pass a seeded shuffle buffer. A slot's position
in a source is therefore just (epoch, raw samples consumed this epoch); resuming replays the raw tar
stream of the current epoch up to that point without decoding it.

Sources are mixed per sample with weights; the draw for a slot's j-th sample depends only on
(seed, rank, slot, j). Batches are built inside workers and carry the worker's position, so the main
process knows exactly what the trainer consumed, not what was prefetched. DataLoader hands out
batches from workers round-robin; on resume the physical workers are rotated so the next batch comes
from the same logical worker as in an uninterrupted run.
"""

from __future__ import annotations

import itertools
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle

from opt_ds.data.collate import collate
from opt_ds.data.decode import DecodeConfig, SampleDecoder
from opt_ds.data.shards import expand_shards
from opt_ds.data.skips import SkipCounter
from opt_ds.data.tars import ends_like_a_tar, tar_samples
from opt_ds.data.workers import end_at_exit, init_worker

STATE_VERSION = 1
MAX_UNDECODABLE_RUN = 100_000
END_OF_STREAM = "_end_of_stream"  # a finite stream's last message: the worker's final counts, no samples


@dataclass(frozen=True)
class SourceConfig:
    """One stream of shards (triplets, or unpaired text/image/audio) and its sampling weight."""

    name: str
    shards: list[str] | str
    weight: float = 1.0


@dataclass(frozen=True)
class ReaderConfig:
    batch_size: int = 8
    num_workers: int = 2
    seed: int = 0
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000  # samples; 0 or 1 keeps tar order
    resample: bool = False  # draw shards with replacement each epoch
    max_epochs: int | None = None  # None streams forever (training); 1 reads one pass
    prefetch_factor: int = 4
    # niceness of the loader workers: on a node whose cores the ranks keep busy (CPU training), a worker at normal
    # priority preempts a rank mid-step and the other ranks wait for it at the next collective; at 19 the workers
    # decode mostly while the ranks wait. 0 leaves them at the trainer's priority.
    worker_nice: int = 19
    # seconds the rank waits for a batch before a worker counts as hung (an error naming this key); 0: forever
    timeout_s: float = 600.0
    shard_stall_s: float = 60.0  # an HTTP(S) shard that sends nothing this long is given up, counted, skipped

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("num_workers", 0), ("shuffle_buffer", 0), ("prefetch_factor", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"data.reader.{name} must be >= {low}, got {getattr(self, name)}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"data.reader.max_epochs must be >= 1 (or null: forever), got {self.max_epochs}")
        if self.shard_stall_s < 1:
            raise ValueError(f"data.reader.shard_stall_s must be >= 1, got {self.shard_stall_s}")
        if self.timeout_s < 0:
            raise ValueError(f"data.reader.timeout_s must be >= 0 (0: no limit), got {self.timeout_s}")
        if not 0 <= self.worker_nice <= 19:
            raise ValueError(f"data.reader.worker_nice must be in 0..19, got {self.worker_nice}")


@dataclass
class SourcePosition:
    epoch: int = 0
    consumed: int = 0
    done: bool = False


@dataclass
class WorkerState:
    """Where one logical worker of one rank is: everything needed to continue its stream exactly."""

    draws: int = 0
    samples: int = 0
    sources: list[SourcePosition] = field(default_factory=list)
    skips: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "draws": self.draws,
            "samples": self.samples,
            "sources": [vars(p).copy() for p in self.sources],
            "skips": dict(self.skips),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "WorkerState":
        return cls(d["draws"], d["samples"], [SourcePosition(**p) for p in d["sources"]], dict(d["skips"]))


class SourceStream:
    """Raw (undecoded) samples of one source for one slot, continuing from a SourcePosition."""

    def __init__(
        self,
        shards: list[str],
        index: int,
        slot: int,
        n_slots: int,
        cfg: ReaderConfig,
        position: SourcePosition,
        skips: SkipCounter,
        name: str,
        max_member_bytes: int,
    ):
        self.shards, self.index, self.slot, self.n_slots = shards, index, slot, n_slots
        self.cfg, self.position, self.skips, self.name = cfg, position, skips, name
        self.max_member_bytes = max_member_bytes
        self._it: Iterator[dict] | None = None
        self._replaying = False
        self._epoch_errors: dict[str, str] = {}  # this epoch's unreadable shards -> why, for when it reads nothing

    def _tar_error(self, exn: Exception) -> bool:
        what = exn.strerror if isinstance(exn, OSError) and exn.strerror else exn.args[0] if exn.args else ""
        where, detail = str(exn.args[-1]) if exn.args else "?", f"{type(exn).__name__}: {what}"
        self._epoch_errors.setdefault(where, detail)
        if not self._replaying:  # else already counted before the checkpoint
            self.skips.add("tar_error", where, detail)
        return True

    def _checked(self, urls: list[str]) -> Iterator[str]:
        """Count local shards that lack the zero blocks a complete tar ends with (cut at a member boundary,
        which tarfile reads as a clean end), then read what they hold."""
        for url in urls:
            if not self._replaying and not ends_like_a_tar(url):
                self.skips.add("truncated_tar", url)
            yield url

    def _epoch_samples(self, epoch: int) -> Iterator[dict]:
        seed = self.cfg.seed
        rng = random.Random(f"{seed}-shards-{self.index}-{epoch}")
        order = list(self.shards)
        if self.cfg.resample:
            slot_rng = random.Random(f"{seed}-resample-{self.index}-{epoch}-{self.slot}")
            mine = [slot_rng.choice(order) for _ in range(max(1, len(order) // self.n_slots))]
            stride = False
        else:
            if self.cfg.shuffle_shards:
                rng.shuffle(order)
            stride = len(order) < self.n_slots
            mine = order if stride else order[self.slot :: self.n_slots]
        samples = tar_samples(self._checked(mine), self.max_member_bytes, self._tar_error, self.cfg.shard_stall_s)
        if stride:
            samples = (s for i, s in enumerate(samples) if i % self.n_slots == self.slot)
        if self.cfg.shuffle_buffer > 1:
            buf = self.cfg.shuffle_buffer
            samples = _shuffle(
                iter(samples), buf, buf, rng=random.Random(f"{seed}-samples-{self.index}-{epoch}-{self.slot}")
            )
        return iter(samples)

    def next(self) -> dict | None:
        """The next raw sample, or None once max_epochs is reached."""
        pos = self.position
        while not pos.done:
            if self._it is None:
                self._epoch_errors = {}
                self._it = self._epoch_samples(pos.epoch)
                self._replaying = True
                for _ in itertools.islice(self._it, pos.consumed):
                    pass
                self._replaying = False
            sample = next(self._it, None)
            if sample is not None:
                pos.consumed += 1
                return sample
            if pos.consumed == 0 and self.cfg.max_epochs is None:
                errors = self._epoch_errors
                why = (
                    f"{len(errors)} of its shards could not be read (first: {': '.join(next(iter(errors.items())))})"
                    if errors
                    else "fewer readable samples than ranks x workers?"
                )
                raise RuntimeError(
                    f"source '{self.name}' gave slot {self.slot} of {self.n_slots} no samples in epoch "
                    f"{pos.epoch}: {why}"
                )
            self._it = None
            pos.epoch, pos.consumed = pos.epoch + 1, 0
            pos.done = self.cfg.max_epochs is not None and pos.epoch >= self.cfg.max_epochs
        return None


class StreamingDataset(IterableDataset):
    """Yields ready batches (dict of tensors) with a `_meta` entry holding the worker's position."""

    def __init__(
        self,
        sources: list[SourceConfig],
        decode: DecodeConfig,
        reader: ReaderConfig,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not sources:
            raise ValueError("data: no sources configured")
        for s in sources:
            if s.weight <= 0:
                raise ValueError(f"data source '{s.name}': weight must be > 0, got {s.weight}")
        self.sources = sources
        self.shards = [expand_shards(s.shards) for s in sources]  # fail at start-up, not in a worker
        self.decode_cfg, self.cfg = decode, reader
        self.rank, self.world_size = rank, world_size
        self.resume: dict | None = None

    def _pick_source(self, live: list[int], slot: int, draw: int) -> int:
        if len(live) == 1:
            return live[0]
        u = random.Random(f"{self.cfg.seed}-mix-{slot}-{draw}").random()
        weights = [self.sources[i].weight for i in live]
        threshold, acc = u * sum(weights), 0.0
        for i, w in zip(live, weights):
            acc += w
            if threshold < acc:
                return i
        return live[-1]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical, n_workers = (info.id, info.num_workers) if info else (0, 1)
        resume = self.resume or {}
        logical = (physical + resume.get("batches", 0)) % n_workers
        saved = resume.get("workers", {}).get(str(logical))
        state = WorkerState.from_dict(saved) if saved else WorkerState(sources=[SourcePosition() for _ in self.sources])
        slot = self.rank * n_workers + logical
        n_slots = self.world_size * n_workers
        skips = SkipCounter(counts=state.skips)
        decoder = SampleDecoder(self.decode_cfg)
        limit = self.decode_cfg.max_sample_bytes  # a member over it is not read
        streams = [
            SourceStream(shards, i, slot, n_slots, self.cfg, state.sources[i], skips, self.sources[i].name, limit)
            for i, shards in enumerate(self.shards)
        ]
        batch: list[dict] = []
        undecodable_run = 0
        while True:
            live = [i for i, p in enumerate(state.sources) if not p.done]
            if not live:
                break
            i = self._pick_source(live, slot, state.draws)
            state.draws += 1
            raw = streams[i].next()
            if raw is None:
                continue
            try:
                decoded, problems = decoder(raw)
            except Exception as exc:  # noqa: BLE001  one sample never ends a run: counted, named, skipped
                decoded, problems = None, [("decode_error", f"{type(exc).__name__}: {exc}"[:300])]
            for reason, detail in problems:
                skips.add(reason, f"{raw.get('__url__')}:{raw.get('__key__')}", detail)
            if decoded is None:
                undecodable_run += 1
                if undecodable_run >= MAX_UNDECODABLE_RUN:
                    raise RuntimeError(
                        f"{undecodable_run} samples in a row were unusable; skip counts: {skips.as_dict()}"
                    )
                continue
            undecodable_run = 0
            decoded["source"] = self.sources[i].name
            batch.append(decoded)
            state.samples += 1
            if len(batch) == self.cfg.batch_size:
                yield self._emit(batch, logical, state, skips)
                batch = []
        if batch:
            yield self._emit(batch, logical, state, skips)
        state.skips = skips.as_dict()
        yield {END_OF_STREAM: True, "_meta": {"worker": logical, "state": state.as_dict()}}

    def _emit(self, samples: list[dict], logical: int, state: WorkerState, skips: SkipCounter) -> dict:
        state.skips = skips.as_dict()
        batch = collate(samples, self.decode_cfg)
        batch["sources"] = [s["source"] for s in samples]
        batch["_meta"] = {"worker": logical, "state": state.as_dict()}
        return batch


class ResumableLoader:
    """A rank's endless (or max_epochs-bounded) batch stream with state_dict/load_state_dict.

    Iterating again continues where the last iteration stopped.
    """

    def __init__(self, dataset: StreamingDataset):
        self.dataset = dataset
        self.num_workers = dataset.cfg.num_workers
        self.batches = 0
        self.workers: dict[int, dict] = {}

    def __iter__(self) -> Iterator[dict]:
        """Start the workers now (not on the first `next`): they decode while the caller sets up."""
        self.dataset.resume = self.state_dict()
        # forkserver, not fork: a forked worker shares the trainer's pages copy-on-write, and every page the
        # trainer then writes (gradient buffers, offload swap buffers) is duplicated: +6 GB for `large` here
        extra = (
            {
                "prefetch_factor": self.dataset.cfg.prefetch_factor,
                "worker_init_fn": partial(init_worker, self.dataset.cfg.worker_nice, os.getpid()),
                "timeout": self.dataset.cfg.timeout_s,
                "multiprocessing_context": "forkserver",
            }
            if self.num_workers
            else {}
        )
        workers = iter(
            DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=torch.cuda.is_available(),  # page-locked batches: copied to the GPU without blocking
                **extra,
            )
        )
        if self.num_workers:
            end_at_exit(workers)
        return self._batches(workers)

    def _batches(self, stream: Iterator[dict]) -> Iterator[dict]:
        for batch in _named_timeout(stream, self.dataset.cfg.timeout_s):
            meta = batch.pop("_meta")
            self.workers[meta["worker"]] = meta["state"]
            if END_OF_STREAM in batch:
                continue
            self.batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "rank": self.dataset.rank,
            "world_size": self.dataset.world_size,
            "num_workers": self.num_workers,
            "sources": [s.name for s in self.dataset.sources],
            "batches": self.batches,
            "workers": {str(k): v for k, v in self.workers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the reader layout must match the one that saved it."""
        mine = self.state_dict()
        for key in ("version", "rank", "world_size", "num_workers", "sources"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"data state mismatch in '{key}': checkpoint has {state.get(key)!r}, this run {mine[key]!r}"
                )
        self.batches = state["batches"]
        self.workers = {int(k): v for k, v in state["workers"].items()}

    def skip_counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for w in self.workers.values():
            total.update(w["skips"])
        return dict(total)

    def samples_read(self) -> int:
        return sum(w["samples"] for w in self.workers.values())


def _named_timeout(stream: Iterator[dict], timeout_s: float) -> Iterator[dict]:
    """DataLoader's timeout error, with the setting that set it."""
    try:
        yield from stream
    except RuntimeError as exc:
        if "timed out" not in str(exc):
            raise
        raise RuntimeError(
            f"no batch from the loader's workers in {timeout_s:g} s (data.reader.timeout_s): a worker is hung or "
            "starved; raise the limit for slow storage"
        ) from exc


def make_loader(
    sources: list[SourceConfig], decode: DecodeConfig, reader: ReaderConfig, rank: int = 0, world_size: int = 1
) -> ResumableLoader:
    return ResumableLoader(StreamingDataset(sources, decode, reader, rank, world_size))
