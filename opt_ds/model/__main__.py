"""`python -m opt_ds.model --config NAME [--json]`: parameters and FLOPs per sample, per component.

Computed from the config alone: nothing is allocated, so the multi-billion configs print instantly.
"""

from __future__ import annotations

import argparse
import json
import sys

from opt_ds.model.config import load_model_config, model_config_names
from opt_ds.model.size import forward_flops, lengths_for, parameter_count


def report(name: str) -> dict:
    cfg = load_model_config(name)
    lengths = lengths_for(cfg)
    fwd = forward_flops(cfg, lengths)
    params = parameter_count(cfg)
    return {
        "config": cfg.name,
        "tokens_per_sample": {
            "text": lengths.text,
            "image": lengths.image,
            "audio": lengths.audio,
            "fusion": lengths.fusion,
        },
        "parameters": params,
        "forward_flops_per_sample": fwd,
        "train_flops_per_sample": {k: 3 * v for k, v in fwd.items()},
    }


def print_table(r: dict) -> None:
    tokens = r["tokens_per_sample"]
    print(
        f"config {r['config']}: tokens per sample text {tokens['text']}, image {tokens['image']}, "
        f"audio {tokens['audio']}, fusion {tokens['fusion']}"
    )
    print(f"{'component':<14} {'parameters':>16} {'fwd GFLOP/sample':>18} {'train GFLOP/sample':>20}")
    for part, params in r["parameters"].items():
        fwd = r["forward_flops_per_sample"][part]
        print(f"{part:<14} {params:>16,} {fwd / 1e9:>18.3f} {3 * fwd / 1e9:>20.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opt_ds.model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny", help=f"one of {', '.join(model_config_names())} or a YAML path")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    r = report(args.config)
    if args.json:
        print(json.dumps(r))
    else:
        print_table(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
