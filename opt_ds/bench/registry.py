"""Every benchmark kind in one place: the command line, the printed table and the BENCHMARKS.md record read it.

A kind is a module of this package with a `KIND`: its arguments, the run that returns a JSON-able report, and
the table that prints it. Adding a kind is one module and one line here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Kind:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict | str]  # a report, or the path of a drawn file
    table: Callable[[dict], str] | None = None  # None: the kind draws a file and prints its path
    measures_a_config: bool = True  # takes --config, --steps and --warmup


def kinds() -> dict[str, Kind]:
    from opt_ds.bench import learning, loader, memory, mfu, model, plot, scale, throughput

    return {
        k.name: k
        for k in (
            model.KIND,
            throughput.KIND,
            mfu.KIND,
            memory.KIND,
            scale.KIND,
            loader.KIND,
            learning.KIND,
            plot.KIND,
            plot.CURVES,
        )
    }


def comma_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]
