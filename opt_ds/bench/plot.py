"""The benchmark plots: training throughput and per-rank model state against the config, from recorded runs;
a run's learning curves, from its TensorBoard files.

Reads benchmarks/records.jsonl (one JSON line per `python -m opt_ds.bench ... --record`); the newest record
of each (kind, config) wins.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from opt_ds.bench.record import PLOT, RECORDS  # noqa: E402
from opt_ds.bench.registry import Kind  # noqa: E402
from opt_ds.model.config import load_model_config  # noqa: E402
from opt_ds.model.size import parameter_count  # noqa: E402

STAGE_COLOURS = {0: "tab:blue", 1: "tab:purple", 2: "tab:orange", 3: "tab:green"}  # the same in both panels


def save(fig: plt.Figure, out: Path) -> Path:
    """Lay the figure out, write it as a PNG (its folder made if needed) and free it."""
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def newest_reports(records: Path) -> dict[str, dict[str, dict]]:
    """{kind: {config: report}} keeping the last record of each."""
    out: dict[str, dict[str, dict]] = {}
    for line in records.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            if "config" in entry["report"]:  # scale reports span several configs
                out.setdefault(entry["kind"], {})[entry["report"]["config"]] = entry["report"]
    return out


def per_rank_batch(report: dict) -> int:
    """The batch per rank of a throughput report (the same in all its rows; the global batch scales with ranks)."""
    row = report["rows"][0]
    return row["global_batch"] // row["ranks"]


def plot(records: Path, out: Path) -> Path:
    reports = newest_reports(records)
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))

    def by_size(configs):
        return sorted(configs, key=lambda c: parameter_count(load_model_config(c))["total"])

    throughput = reports.get("throughput", {})
    configs = by_size(throughput)
    runs = sorted({(row["zero"], row["ranks"]) for report in throughput.values() for row in report["rows"]})
    width = 0.8 / max(1, len(runs))
    for k, (zero, ranks) in enumerate(runs):
        xs, ratios = [], []
        for i, config in enumerate(configs):
            for row in throughput[config]["rows"]:
                if (row["zero"], row["ranks"]) == (zero, ranks):
                    xs.append(i + (k - (len(runs) - 1) / 2) * width)
                    ratios.append(row["ratio_vs_plain"])
        bars = speed.bar(
            xs,
            ratios,
            width,
            label=f"ZeRO-{zero}, {ranks} rank(s)",
            color=STAGE_COLOURS[zero],
            hatch="" if ranks == min(r for _, r in runs) else "//",
        )
        speed.bar_label(bars, fmt="%.2f", fontsize=7)
    speed.axhline(1.0, color="black", linewidth=0.8)
    speed.axhline(0.9, color="grey", linestyle="--", linewidth=0.8, label="0.9x target")
    speed.set_xticks(range(len(configs)), [f"{c}\nbatch {per_rank_batch(throughput[c])} per rank" for c in configs])
    speed.set_ylabel("samples/s relative to the plain PyTorch loop")
    speed.set_title("Training throughput (same global batch, every task each step)")
    speed.legend(fontsize=7, loc="lower right")

    mem = reports.get("memory", {})
    configs = by_size(mem)
    stages = sorted({row["zero"] for report in mem.values() for row in report["rows"]})
    width = 0.8 / max(1, len(stages))
    for k, zero in enumerate(stages):
        xs, measured, expected = [], [], []
        for i, config in enumerate(configs):
            for row in mem[config]["rows"]:
                if row["zero"] == zero:
                    xs.append(i + (k - (len(stages) - 1) / 2) * width)
                    measured.append(row["model_state_bytes"] / 2**20)
                    expected.append(row["expected_bytes"] / 2**20)
        memory.bar(xs, measured, width, label=f"ZeRO-{zero} measured", color=STAGE_COLOURS[zero])
        memory.scatter(
            xs, expected, marker="_", s=300, color="black", zorder=3, label="16 B/param accounting" if k == 0 else None
        )
    ranks = {report["ranks"] for report in mem.values()}
    memory.set_xticks(range(len(configs)), configs)
    memory.set_yscale("log")
    memory.set_ylabel("MiB per rank")
    memory.set_title(f"Model state per rank ({'/'.join(map(str, sorted(ranks)))} ranks)")
    memory.legend(fontsize=7)
    return save(fig, out)


CURVE_SCORES = {  # held-out score -> its chance level's tag (None: no chance level to draw)
    "eval/text->image/R@1": "eval/text_image/chance_R@1",
    "eval/image->text/R@1": "eval/text_image/chance_R@1",
    "eval/text->audio/R@1": "eval/text_audio/chance_R@1",
    "eval/zero_shot/image_acc": "eval/zero_shot/chance",
    "eval/captions_from_image/colour_and_shape": None,
    "eval/images_from_text/colour": None,
}


def learning_curves(run_dir: Path, out: Path) -> Path:
    """A run's learning curves from its TensorBoard files: each task's training loss (per logging window) and
    the held-out scores at each evaluation, with their chance levels dashed."""
    from opt_ds.train.metrics import tensorboard_scalars

    scalars = tensorboard_scalars(run_dir / "tb")
    losses = sorted(tag for tag in scalars if tag.endswith("/loss") and tag.count("/") == 1 and tag != "loss/total")
    scores = [tag for tag in CURVE_SCORES if scalars.get(tag)]
    if not losses and not scores:
        raise SystemExit(f"{run_dir / 'tb'}: no task losses or held-out scores logged")
    fig, (train, held_out) = plt.subplots(1, 2, figsize=(11, 4.2))
    for tag in losses:
        steps = sorted(scalars[tag])
        train.plot(steps, [scalars[tag][s] for s in steps], label=tag.removesuffix("/loss"), linewidth=1)
    train.set_yscale("log")
    train.set_xlabel("step")
    train.set_ylabel("training loss (mean over the logging window)")
    train.set_title(f"{run_dir.name}: training loss per task")
    train.legend(fontsize=7)
    for tag in scores:
        steps = sorted(scalars[tag])
        (line,) = held_out.plot(steps, [scalars[tag][s] for s in steps], marker="o", label=tag.removeprefix("eval/"))
        chance = scalars.get(CURVE_SCORES[tag] or "", {})
        if chance:
            held_out.plot(
                steps,
                [chance.get(s, float("nan")) for s in steps],
                linestyle="--",
                linewidth=0.8,
                color=line.get_color(),
            )
    held_out.set_xlabel("step")
    held_out.set_ylabel("held-out score (dashed: chance)")
    held_out.set_title("held-out scores at each evaluation")
    held_out.legend(fontsize=7)
    return save(fig, out)


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", type=Path, default=RECORDS)
    parser.add_argument("--out", type=Path, default=PLOT)


def add_curves_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="a run directory (its tb/)")
    parser.add_argument("--out", type=Path, required=True)


KIND = Kind(
    "plot",
    "draw benchmarks/bench.png from benchmarks/records.jsonl",
    add_plot_arguments,
    lambda a: str(plot(a.records, a.out)),
    measures_a_config=False,
)
CURVES = Kind(
    "curves",
    "learning curves of a run: training loss per task, held-out scores per eval",
    add_curves_arguments,
    lambda a: str(learning_curves(a.run, a.out)),
    measures_a_config=False,
)
