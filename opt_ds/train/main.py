"""Pre-train OPT (or its VQ-VAE image tokenizer) with DeepSpeed.

python -m opt_ds.train --config opt_ds/configs/demo.yaml --output runs/demo
deepspeed --num_gpus 8 --module opt_ds.train --config ... --output ... --resume auto
torchrun / srun / mpirun: see README ("Running on a cluster")
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from opt_ds.config.experiment import check_fits_model, config_to_yaml, load_config
from opt_ds.config.fields import ConfigError
from opt_ds.data.stream import make_loader
from opt_ds.data.tokenizer import load_tokenizer
from opt_ds.data.workers import start_worker_server
from opt_ds.dist.process import close_distributed, device, init_distributed
from opt_ds.model.config import load_model_config
from opt_ds.model.size import parameter_count
from opt_ds.tasks import TASKS, TaskScheduler, TextSpecials
from opt_ds.train.checkpoint import Checkpointer
from opt_ds.train.stages import stage_of
from opt_ds.train.trainer import Trainer
from opt_ds.zero.config import load_deepspeed_config
from opt_ds.zero.engine import build_engine

log = logging.getLogger("opt_ds.train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m opt_ds.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="experiment YAML (e.g. opt_ds/configs/demo.yaml)")
    parser.add_argument(
        "--output", required=True, help="run directory: config.yaml, tb/, checkpoints/, logs/, summary.json"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    parser.add_argument(
        "--resume", default="auto", help="auto (newest complete checkpoint, if any), none, or a checkpoint dir"
    )
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="checkpoint and exit (status 75, resumable) after STEP, e.g. to split a run into jobs",
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # deepspeed launcher
    return parser.parse_args(argv)


def setup_run_dir(output: str, rank: int, cfg) -> Path:
    run_dir = Path(output)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")]
    if rank == 0:  # the console shows the progress bar and warnings; everything else goes to logs/rank*.log
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        handlers.append(console)
    logging.basicConfig(
        level=logging.INFO,
        handlers=handlers,
        force=True,
        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s: %(message)s",
    )
    if rank == 0:
        (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # bad configs fail here, before any process group or model exists
        cfg = load_config(args.config, args.set)
        model_cfg = load_model_config(cfg.model, cfg.model_overrides)
        scheduler = TaskScheduler(cfg.schedule, TASKS)
        ds_config = load_deepspeed_config(cfg, parameter_count(model_cfg)["total"])
        loader_check = make_loader(cfg.data.sources, cfg.data.decode, cfg.data.reader)  # shard specs checked
        check_fits_model(cfg, model_cfg)
        stage = stage_of(cfg)
        stage.check(cfg, scheduler)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"opt_ds.train: config error: {exc}", file=sys.stderr)
        return 2
    del loader_check
    if cfg.data.reader.num_workers:
        start_worker_server()

    rank, _, world_size = init_distributed(cfg.train.collective_timeout_s)
    run_dir = setup_run_dir(args.output, rank, cfg)
    log.info(
        "world of %d; rank %d on host %s; model %s; stage %s; %s",
        world_size,
        rank,
        socket.gethostname(),
        model_cfg.name,
        cfg.stage,
        cfg.deepspeed,
    )

    checkpointer = Checkpointer(run_dir / "checkpoints", rank, world_size, cfg.train.keep_last)
    loader = make_loader(cfg.data.sources, cfg.data.decode, cfg.data.reader, rank, world_size)
    resume = checkpointer.resume_point(args.resume, ds_config, loader)  # the loader continues where it was
    batches = iter(loader)  # the workers start now and decode their first batches while the engine is built
    engine, lr_scheduler, _hf_keepalive = build_engine(cfg, lambda: stage.build_module(model_cfg), ds_config)
    start_step = checkpointer.load(engine, resume)

    tokenizer = load_tokenizer(cfg.data.decode.tokenizer)
    step_fn, image_tokenizer = stage.step(
        cfg, model_cfg, scheduler, TextSpecials.from_tokenizer(tokenizer), rank, device()
    )
    trainer = Trainer(
        cfg,
        model_cfg,
        engine,
        lr_scheduler,
        loader,
        batches,
        step_fn,
        checkpointer,
        run_dir,
        rank,
        world_size,
        start_step,
        tokenizer,
        image_tokenizer,
        stop_at=args.stop_at,
    )
    status = trainer.fit()  # every rank ends with the same status
    close_distributed()
    return status
