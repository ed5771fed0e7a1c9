"""`make demo`: build the synthetic demo shards (once) and stream one epoch through the training reader."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from opt_ds.data import build_shards, inspect

DEMO_DATA = Path("demo_data")


def ensure_shards(name: str, *builder_args: str) -> Path:
    """Build into a temporary folder and rename, so an interrupted build is never mistaken for a finished one."""
    out = DEMO_DATA / name
    if (out / "sizes.json").is_file():
        return out
    tmp = DEMO_DATA / f"{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    build_shards.main([*builder_args, "--out", str(tmp)])
    tmp.rename(out)
    return out


def main() -> int:
    train = ensure_shards("train", "synthetic", "--num", "2000", "--max-samples", "250", "--seed", "0")
    print(f"\nstreaming one epoch of {train} through the training reader:")
    return inspect.main([str(train), "--workers", "2"])


if __name__ == "__main__":
    sys.exit(main())
