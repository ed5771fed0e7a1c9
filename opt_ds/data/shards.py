"""Turn a user's shard spec (brace pattern, directory, list file, object-store prefix) into a checked list of
shard URLs.

A list file names shards only: a `pipe:` line in one is refused (webdataset would run it in a shell).
"""

from __future__ import annotations

import os
from pathlib import Path

import braceexpand

from opt_ds.data.tars import OBJECT_STORES

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")


class ShardSpecError(ValueError):
    """A shard spec names nothing, or names local files that do not exist."""


def _object_store(spec: str):
    """The fsspec filesystem of an s3:// or gs:// spec, and the spec's path in it; its package missing is a spec
    error at start-up rather than every shard failing in the workers."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(spec)
    except ImportError as exc:
        raise ShardSpecError(f"cannot read {spec}: {exc}") from None


def _object_store_prefix(spec: str) -> list[str]:
    """`s3://bucket/path/`, like a local directory: its .tar objects, sorted (listed once, at start-up)."""
    fs, path = _object_store(spec)
    try:
        names = sorted(fs.glob(path.rstrip("/") + "/*.tar"))
    except Exception as exc:  # noqa: BLE001  no such bucket, no credentials, no connection: each its own type
        raise ShardSpecError(f"cannot list {spec}: {type(exc).__name__}: {exc}") from None
    if not names:
        raise ShardSpecError(
            f"shard prefix {spec} " + ("holds no .tar objects" if fs.exists(path) else "does not exist")
        )
    return [fs.unstrip_protocol(name) for name in names]


def _expand_one(spec: str) -> list[str]:
    if spec.startswith(OBJECT_STORES):
        if spec.endswith("/"):
            return _object_store_prefix(spec)
        _object_store(spec)
    if spec.startswith(REMOTE_PREFIXES):
        return list(braceexpand.braceexpand(spec))
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise ShardSpecError(f"shard directory {spec} holds no .tar files")
        return shards
    if path.suffix in (".txt", ".list") and path.is_file():
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        entries = [ln for ln in lines if ln and not ln.startswith("#")]
        if not entries:
            raise ShardSpecError(f"shard list file {spec} is empty")
        commands = [e for e in entries if e.startswith("pipe:")]
        if commands:  # webdataset runs a pipe: spec in a shell: a list file is data, and may come from anywhere
            raise ShardSpecError(
                f"shard list file {spec} holds a command ({commands[0][:80]!r}); list files name "
                "shards only: put a pipe: spec in the config's `shards` if it is meant"
            )
        base = path.parent
        return [e if e.startswith(REMOTE_PREFIXES) or os.path.isabs(e) else str(base / e) for e in entries]
    return list(braceexpand.braceexpand(spec))


def expand_shards(specs: str | os.PathLike | list[str]) -> list[str]:
    """Expand one or more specs, keep their order, and fail early on missing local files."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [os.fspath(specs)]
    if not specs:
        raise ShardSpecError("no shard spec given")
    shards: list[str] = []
    for spec in specs:
        if not spec or not spec.strip():
            raise ShardSpecError("empty shard spec")
        shards.extend(_expand_one(spec.strip()))
    missing = [s for s in shards if not s.startswith(REMOTE_PREFIXES) and not os.path.isfile(s)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ShardSpecError(f"shard not found: {', '.join(missing[:3])}{more}")
    return shards
