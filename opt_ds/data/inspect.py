"""Stream shards through the training reader and report what is in them.

`python -m opt_ds.data.inspect SHARDS... [--limit N] [--json]`: samples per modality combination,
skipped samples and dropped modalities by reason, and decode throughput (samples/s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

from opt_ds.data.decode import DecodeConfig
from opt_ds.data.formats import MODALITIES
from opt_ds.data.shards import ShardSpecError
from opt_ds.data.stream import ReaderConfig, SourceConfig, make_loader


def modality_combination(batch: dict, i: int) -> str:
    present = [m for m in MODALITIES if bool(batch[f"has_{m}"][i])]
    return "+".join(present)


def inspect_shards(shards: list[str], limit: int | None, decode: DecodeConfig, workers: int, batch_size: int) -> dict:
    loader = make_loader(
        [SourceConfig("inspect", shards)],
        decode,
        ReaderConfig(batch_size=batch_size, num_workers=workers, shuffle_shards=False, shuffle_buffer=0, max_epochs=1),
    )
    combos: Counter[str] = Counter()
    seen = 0
    start = time.perf_counter()
    for batch in loader:
        for i in range(len(batch["keys"])):
            if limit is not None and seen >= limit:
                break
            combos[modality_combination(batch, i)] += 1
            seen += 1
        if limit is not None and seen >= limit:
            break
    seconds = time.perf_counter() - start
    return {
        "shards": len(loader.dataset.shards[0]),
        "samples": seen,
        "by_modalities": dict(combos.most_common()),
        "skipped_or_dropped": loader.skip_counts(),
        "seconds": round(seconds, 3),
        "samples_per_s": round(seen / seconds, 1) if seconds > 0 else None,
        "workers": workers,
    }


def print_table(report: dict) -> None:
    print(
        f"{report['samples']} samples from {report['shards']} shards in {report['seconds']:.1f} s "
        f"({report['samples_per_s']} samples/s, {report['workers']} workers)"
    )
    print("modalities:")
    for combo, n in report["by_modalities"].items():
        print(f"  {combo:<20} {n}")
    print("skipped samples / dropped modalities:")
    for reason, n in sorted(report["skipped_or_dropped"].items()) or [("none", 0)]:
        print(f"  {reason:<20} {n}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opt_ds.data.inspect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("shards", nargs="+", help="brace pattern, directory or list file (several allowed)")
    parser.add_argument("--limit", type=int, default=None, help="stop after N samples")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=DecodeConfig.image_size)
    parser.add_argument("--max-audio-seconds", type=float, default=DecodeConfig.max_audio_seconds)
    args = parser.parse_args(argv)
    decode = DecodeConfig(image_size=args.image_size, max_audio_seconds=args.max_audio_seconds)
    try:
        report = inspect_shards(args.shards, args.limit, decode, args.workers, args.batch_size)
    except ShardSpecError as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
