"""`python -m opt_ds.bench learning`: what opt_ds learns against open_clip, on the same shards and budget.

Three runs see the same training shards for the same steps and global batch, with the same encoder sizes
(the `tiny` towers: 2 layers x 128, 64 px, 8 px patches), learning rate, warm-up, weight decay and no
gradient clipping (open_clip's default):
- open_clip 3.3.0 (image-text contrastive), installed for this benchmark only into .cache/open_clip
  (pip --target: it pins webdataset <= 0.2.86, opt_ds runs 1.0.2);
- opt_ds with the contrastive task only (2 ranks, ZeRO-3 bf16);
- opt_ds with every task, which must also learn to generate: the demo's tasks and loss weights (its cross-modal
  stage) and its decoders' learning-rate scale, every task at every step (`sum`, as UNIMO sums its losses) from
  the first step. The demo instead draws one task per step (to fit 15 minutes on 2 cores) after a uni-modal
  stage; at this benchmark's 600 steps that stage alone costs ~0.1 R@1 (BENCHMARKS.md).
All three are scored by one rule (opt_ds.evaluate.scoring: duplicate captions correct, ties missed) on the same
held-out samples: image<->text R@1/5/10, and for opt_ds every score of `opt_ds.evaluate`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

from opt_ds.bench.open_clip_peer import run_open_clip
from opt_ds.bench.registry import Kind, comma_ints
from opt_ds.config.experiment import REPO_ROOT
from opt_ds.data import build_shards
from opt_ds.dist.launch import local_training_command

ROW_NAMES = {"open_clip": "open_clip", "contrastive": "opt_ds contrastive", "full": "opt_ds all tasks"}
DEMO_CONFIG = yaml.safe_load((REPO_ROOT / "opt_ds" / "configs" / "demo.yaml").read_text())
OPTIM = {"lr": 5e-4, "weight_decay": 0.1, "warmup_steps": 30, "betas": [0.9, 0.98], "eps": 1e-6, "min_lr_ratio": 0.0}
# the tasks of the demo's last stage that trains the whole model (not its captioning stage)
JOINT_TASKS = next(s["tasks"] for s in reversed(DEMO_CONFIG["schedule"]["stages"]) if "trains" not in s)
FULL_SCHEDULE = {"mode": "sum", "stages": [{"name": "all", "tasks": JOINT_TASKS}]}


def run_opt_ds(
    workdir: Path,
    name: str,
    train: Path,
    eval_shards: Path,
    schedule: dict,
    steps: int,
    batch: int,
    optim: dict,
    samples: int,
    image_tokenizer: str | None,
    seed: int,
    overrides: list[str],
    ranks: int = 2,
) -> dict:
    """A real `opt_ds.train` run (ZeRO-3 bf16, `ranks` ranks), exported and scored by `opt_ds.evaluate`; `seed`
    sets the initial weights, the task draws and the data order; `overrides` are `--set KEY=VALUE` of the run."""
    from opt_ds.evaluate.generation import Decoding
    from opt_ds.evaluate.suite import evaluate

    config = {
        "model": "tiny",
        "image_tokenizer": image_tokenizer,
        "schedule": schedule,
        "optim": optim,
        "data": {
            "sources": [{"name": "train", "shards": str(train)}],
            "decode": {"image_size": 64, "max_audio_seconds": 2.0, "max_text_tokens": 24},
            "reader": {"batch_size": batch // ranks, "num_workers": 1, "shuffle_buffer": 500, "seed": seed},
        },
        "train": {"steps": steps, "log_every": 10, "save_every": 0, "grad_clip": 0.0, "seed": seed},
    }
    run = f"{name}_seed{seed}"
    config_path, run_dir = workdir / f"{run}.yaml", workdir / run
    config_path.write_text(yaml.safe_dump(config))
    sets = [arg for override in overrides for arg in ("--set", override)]
    cmd = local_training_command(
        ranks, "--config", str(config_path), "--output", str(run_dir), "--resume", "none", *sets
    )
    started = time.perf_counter()
    with (workdir / f"{run}_train.log").open("w") as log:
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    train_seconds = time.perf_counter() - started
    weights = workdir / f"{run}.safetensors"
    subprocess.run(
        [sys.executable, "-m", "opt_ds.export", "--checkpoint", str(run_dir / "checkpoints"), "--out", str(weights)],
        check=True,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
    )
    report = evaluate(str(weights), str(eval_shards), samples, workdir / f"{run}_eval", samples, Decoding())
    scores = {k.removeprefix("eval/"): v for k, v in report["scores"].items()}
    return scores | {"samples": report["samples"], "train_seconds": train_seconds}


def synthetic_image_text(workdir: Path, held_out: int) -> tuple[Path, Path]:
    """-> (training, held-out) synthetic image+text shards under workdir: 2000 and `held_out` samples, built once."""
    train, eval_shards = workdir / "train", workdir / "eval"
    for out, args in (
        (train, ["--num", "2000", "--seed", "0"]),
        (eval_shards, ["--num", str(held_out), "--seed", "7"]),
    ):
        if not (out / "sizes.json").is_file():
            build_shards.main(
                ["synthetic", *args, "--modalities", "image,text", "--max-samples", "250", "--out", str(out), "--quiet"]
            )
    return train, eval_shards


def learning_report(
    workdir: Path,
    train: Path | None,
    eval_shards: Path | None,
    steps: int,
    batch: int,
    samples: int,
    image_tokenizer: str | None,
    runs: list[str],
    seeds: list[int],
    overrides: list[str],
) -> dict:
    """The runs side by side, each once per seed (rows: run -> one score dict per seed); synthetic image+text
    shards (open_clip's modalities) are built when none are given; `overrides` apply to the opt_ds runs."""
    if "full" in runs and image_tokenizer is None:
        raise ValueError("bench learning: the full run needs --image-tokenizer (an exported VQ-VAE, e.g. the demo's)")
    workdir = workdir.resolve()  # open_clip runs inside it: paths given relative to here must still resolve
    workdir.mkdir(parents=True, exist_ok=True)
    if train is None or eval_shards is None:
        train, eval_shards = synthetic_image_text(workdir, samples)
    train, eval_shards = train.resolve(), eval_shards.resolve()
    optim = OPTIM
    contrastive = {"mode": "sample", "stages": [{"name": "all", "tasks": {"contrastive": 1.0}}]}

    def one_run(run: str, seed: int) -> dict:
        if run == "open_clip":
            return run_open_clip(workdir, train, eval_shards, steps, batch, optim, samples, seed)
        if run == "contrastive":
            schedule, run_optim, tokenizer = contrastive, optim, None
        else:  # the demo's decoder rates
            schedule, tokenizer = FULL_SCHEDULE, image_tokenizer
            run_optim = optim | {"lr_scale": DEMO_CONFIG["optim"].get("lr_scale", {})}
        return run_opt_ds(
            workdir, run, train, eval_shards, schedule, steps, batch, run_optim, samples, tokenizer, seed, overrides
        )

    rows = {ROW_NAMES[run]: [one_run(run, seed) | {"seed": seed} for seed in seeds] for run in runs}
    return {
        "steps": steps,
        "global_batch": batch,
        "train": str(train),
        "eval": str(eval_shards),
        "optim": optim,
        "full_schedule": FULL_SCHEDULE,
        "seeds": seeds,
        "overrides": overrides,
        "rows": rows,
    }


def learning_table(report: dict) -> str:
    """Each score's mean over the seeds; R@1 also with its lowest and highest seed."""
    first = next(iter(report["rows"].values()))[0]
    lines = [
        f"{report['steps']} steps, global batch {report['global_batch']}, {first['samples']} held-out samples, "
        f"seeds {report['seeds']}; a duplicate caption counts as correct, a tie as a miss; "
        "R@1 as mean (lowest-highest)"
        + (f"; opt_ds runs with {', '.join(report['overrides'])}" if report.get("overrides") else ""),
        "",
        "| run | text->image R@1 / R@5 / R@10 | image->text R@1 / R@5 / R@10 | captions from image: BLEU-4 / "
        "CIDEr / colour+shape | images from text: R@1 / colour | training s |",
        "|---|---|---|---|---|---|",
    ]
    for name, per_seed in report["rows"].items():

        def get(key: str, digits: int = 3) -> str:
            values = [r[key] for r in per_seed if key in r]
            return f"{sum(values) / len(values):.{digits}f}" if values else "-"

        def recall(query: str) -> str:
            ones = [r[f"{query}/R@1"] for r in per_seed]
            spread = f" ({min(ones):.3f}-{max(ones):.3f})" if len(ones) > 1 else ""
            return f"{get(f'{query}/R@1')}{spread} / {get(f'{query}/R@5')} / {get(f'{query}/R@10')}"

        lines.append(
            f"| {name} | {recall('text->image')} | {recall('image->text')} | "
            f"{get('captions_from_image/BLEU-4')} / {get('captions_from_image/CIDEr')} / "
            f"{get('captions_from_image/colour_and_shape')} | {get('images_from_text/R@1')} / "
            f"{get('images_from_text/colour')} | {get('train_seconds', 0)} |"
        )
    chance = first.get("chance_R@1", first.get("text_image/chance_R@1"))
    lines.append(f"\nchance R@1 {chance:.3f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--train", type=Path, default=None, help="training shards (default: synthetic image+text, built)"
    )
    parser.add_argument("--eval", type=Path, default=None, help="held-out shards (default: synthetic, built)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32, help="global batch (opt_ds: over 2 ranks)")
    parser.add_argument("--samples", type=int, default=200, help="held-out samples scored")
    parser.add_argument(
        "--runs", default="open_clip,contrastive,full", help="comma list of open_clip, contrastive, full"
    )
    parser.add_argument("--seeds", default="0", help="comma list: each run once per seed (weights, data order)")
    parser.add_argument("--image-tokenizer", default=None, help="an exported VQ-VAE for the full run (e.g. the demo's)")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".cache" / "bench_learning")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the opt_ds runs (repeatable)"
    )


KIND = Kind(
    "learning",
    "opt_ds against open_clip: retrieval (and generation) at the same budget",
    add_arguments,
    lambda a: learning_report(
        a.workdir,
        a.train,
        a.eval,
        a.steps,
        a.batch,
        a.samples,
        a.image_tokenizer,
        a.runs.split(","),
        comma_ints(a.seeds),
        a.set,
    ),
    learning_table,
    measures_a_config=False,
)
