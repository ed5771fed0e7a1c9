"""Write samples into size-bounded WebDataset shards with a sizes.json index and a written/skipped summary."""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import webdataset as wds

SHARD_PATTERN = "shard-%06d.tar"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(*parts: object) -> str:
    """A WebDataset key: no dots or slashes (they split the extension), deterministic from its parts."""
    return _KEY_UNSAFE.sub("_", "_".join(str(p) for p in parts)).strip("_")


class ShardSink:
    """Wraps webdataset's ShardWriter: counts per shard into sizes.json, and a tally of what was skipped."""

    def __init__(self, out_dir: str | Path, max_samples: int = 1000, max_bytes: int = 256 * 1024 * 1024):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if any(self.out_dir.glob("*.tar")):
            raise FileExistsError(f"{self.out_dir} already holds .tar shards; choose an empty --out")
        self.sizes: dict[str, int] = {}
        self.skipped: Counter[str] = Counter()
        self.partial: Counter[str] = Counter()
        self.written = 0
        self.bytes = 0
        self._keys: set[str] = set()
        self._writer = wds.ShardWriter(
            str(self.out_dir / SHARD_PATTERN),
            maxcount=max_samples,
            maxsize=max_bytes,
            verbose=0,
            post=self._closed,
            # whole seconds: a fractional mtime gives every member a pax header, a second 1 KB header to parse
            mtime=int(time.time()),
        )

    def _closed(self, fname: str) -> None:
        if self._writer.count:
            self.sizes[os.path.basename(fname)] = self._writer.count
        else:
            os.remove(fname)

    def write(self, sample: dict[str, bytes | str]) -> None:
        key = sample["__key__"]
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        self._writer.write(sample)
        self.written += 1
        self.bytes += sum(len(v) for k, v in sample.items() if k != "__key__")

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def left_out(self, reason: str) -> None:
        """A sample was written without one of its modalities."""
        self.partial[reason] += 1

    def close(self) -> str:
        """Finish the last shard, write sizes.json, and return the summary line."""
        self._writer.close()
        (self.out_dir / "sizes.json").write_text(json.dumps(self.sizes, indent=1, sort_keys=True) + "\n")
        return self.summary()

    def summary(self) -> str:
        def fmt(c: Counter[str]) -> str:
            return ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) or "none"

        return (
            f"wrote {self.written} samples in {len(self.sizes)} shards ({self.bytes / 1e6:.1f} MB) to {self.out_dir}; "
            f"skipped {sum(self.skipped.values())} ({fmt(self.skipped)}); "
            f"modalities left out: {fmt(self.partial)}"
        )
