"""Consolidate a ZeRO checkpoint into one safetensors file (+ the experiment config), loadable without DeepSpeed.

    python -m opt_ds.export --checkpoint RUN/checkpoints[/step_N] --out model.safetensors

The file holds `model.*` (pre-training) or nothing but `image_tokenizer.*` (the VQ-VAE stage), plus the
image tokenizer the run used, and the run's config in its metadata (also written beside it as .yaml).
"""

from __future__ import annotations

import argparse
import sys

from opt_ds.export.bundle import export
from opt_ds.train.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opt_ds.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a run's checkpoints/ directory (newest complete) or one step_N"
    )
    parser.add_argument("--out", required=True, help="output .safetensors")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"opt_ds.export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {out} (+ {out.with_suffix('.yaml').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
