"""The training loop: steps, logging, evaluation, checkpoints and stop requests, in that order."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from opt_ds.config.experiment import ExperimentConfig
from opt_ds.data.stream import ResumableLoader
from opt_ds.dist.process import all_gather_object, all_reduce, any_rank, barrier, device
from opt_ds.evaluate.generation import Decoding
from opt_ds.evaluate.retrieval import eval_batches
from opt_ds.evaluate.suite import evaluate_model
from opt_ds.model.config import ModelConfig
from opt_ds.train import memory
from opt_ds.train.checkpoint import EXIT_SAVE_FAILED, Checkpointer, SaveFailed
from opt_ds.train.guard import EXIT_DIVERGED, DivergenceGuard
from opt_ds.train.metrics import (
    MetricWindow,
    Reporter,
    cuda_peak_tflops,
    global_skip_counts,
    measure_matmul_peak_tflops,
    modality_tokens,
)
from opt_ds.train.signals import EXIT_RESUMABLE, stop_request
from opt_ds.train.stages import stage_of
from opt_ds.zero.engine import compute_dtype
from opt_ds.zero.patches import clear_stale_gradients

log = logging.getLogger("opt_ds.train.trainer")


def device_peak_tflops(rank: int, world_size: int) -> float:
    """Peak of all devices in the job: vendor bf16 peak per GPU, or the measured matmul peak per CPU node."""
    if torch.cuda.is_available():
        return (cuda_peak_tflops() or measure_matmul_peak_tflops(8192)) * world_size
    nodes = max(1, world_size // int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    barrier()  # the other ranks wait idle while rank 0 measures the node
    measured = measure_matmul_peak_tflops(seconds=0.5, threads=os.cpu_count()) if rank == 0 else 0.0
    return all_reduce([measured], "max")[0] * nodes


class Trainer:
    def __init__(
        self,
        cfg: ExperimentConfig,
        model_cfg: ModelConfig,
        engine,
        lr_scheduler,
        loader: ResumableLoader,
        batches: Iterator[dict],
        step_fn,
        checkpointer: Checkpointer,
        run_dir: Path,
        rank: int,
        world_size: int,
        start_step: int,
        tokenizer=None,
        image_tokenizer=None,
        stop_at: int | None = None,
    ):
        self.cfg, self.model_cfg = cfg, model_cfg
        self.engine, self.lr_scheduler, self.step_fn, self.checkpointer = engine, lr_scheduler, step_fn, checkpointer
        # the loader's state is saved; the batches come from its running stream
        self.loader, self.batches = loader, batches
        self.run_dir, self.rank, self.world_size, self.start_step = run_dir, rank, world_size, start_step
        self.tokenizer, self.image_tokenizer = tokenizer, image_tokenizer
        self.device, self.dtype = device(), compute_dtype(engine)
        self.reporter = Reporter(run_dir, rank)
        self.stop = stop_request()
        self.guard = DivergenceGuard(cfg.train.max_skipped_in_a_row, cfg.train.loss_spike_factor)
        self.keys_file = run_dir / "logs" / f"keys_rank{rank}.jsonl" if cfg.train.log_sample_keys else None
        self.eval_set = None
        self.stop_at = stop_at

    def fit(self) -> int:
        cfg = self.cfg.train
        peak = device_peak_tflops(self.rank, self.world_size)
        self.reporter.summary["device_peak_tflops"] = peak
        window = MetricWindow()
        bar = tqdm(
            total=cfg.steps,
            initial=self.start_step,
            disable=self.rank != 0,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        if any_rank(self.stop.requested):  # during start-up: nothing trained since the state loaded
            log.warning("stopped on request before step %d; resume with --resume auto", self.start_step + 1)
            bar.close()
            return EXIT_RESUMABLE
        for step in range(self.start_step, cfg.steps):
            self.engine.train()
            plan = self.step_fn.plan(step)
            for micro_step in range(cfg.gradient_accumulation):
                waited = time.perf_counter()
                batch = next(self.batches)
                waited = time.perf_counter() - waited
                loss, metrics, flops = self.step_fn(self.engine, batch, step, plan, self.device, self.dtype)
                loss_value = float(loss.detach())  # one host sync, for the guard and the metrics
                if not self.guard.accept(loss_value, metrics, step):
                    if self.guard.diverged:
                        return self._diverged(step, bar)
                    continue
                metrics.update(self._rates())
                self.engine.backward(loss)
                if step == self.start_step + 1:  # gradients live and optimizer state created by the first step
                    self._record_model_state()
                self.engine.step()
                if micro_step == cfg.gradient_accumulation - 1 and cfg.grad_clip > 0:  # the share of updates clipped
                    metrics["optim/clipped"] = float(float(self.engine.get_global_grad_norm() or 0.0) > cfg.grad_clip)
                window.add_step(
                    metrics, loss_value, plan, len(batch["keys"]), flops, modality_tokens(batch, self.model_cfg), waited
                )
                self._record_keys(step, batch)
            clear_stale_gradients(self.engine)
            done = step + 1
            bar.update(1)
            logged = done % cfg.log_every == 0 or done == cfg.steps
            if logged:
                values = self._log(done, window, peak)
                # no loss/total when the guard skipped every step of the window
                loss_now = values.get("loss/total", float("nan"))
                bar.set_postfix(loss=f"{loss_now:.3f}", sps=f"{values['perf/samples_per_s']:.1f}")
            if self._due(done, cfg.eval_every):
                self.evaluate(done)
            stopping = any_rank(self.stop.requested) or (
                self.stop_at is not None and done >= self.stop_at and done < cfg.steps
            )
            if (stopping or self._due(done, cfg.save_every)) and self.guard.healthy:
                try:
                    self.save(done)
                except SaveFailed as exc:
                    return self._end(bar, str(exc), EXIT_SAVE_FAILED)
            if stopping:
                log.warning("stopped at step %d on request; resume with --resume auto", done)
                bar.close()
                return EXIT_RESUMABLE
            if logged:  # the next window times and measures training steps only, not evaluation or saving
                window.reset()
        bar.close()
        self.reporter.close()
        return 0

    def _rates(self) -> dict[str, float]:
        """The rate this step applies to each model component (`optim/lr/<component>`; a stage may train only some,
        `optim/lr` for a module without components)."""
        groups = self.lr_scheduler.optimizer.param_groups
        return {
            f"optim/lr/{group['component']}" if group.get("component") else "optim/lr": rate
            for group, rate in zip(groups, self.lr_scheduler.get_last_lr())
        }

    def _record_model_state(self) -> None:
        """Collective: every rank's model-state bytes by category between backward and optimizer step, into
        summary.json."""
        per_rank = all_gather_object(memory.model_state_bytes(self.engine))
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        self.reporter.summary["memory"] = {"parameters": parameters, "model_state_bytes_per_rank": per_rank}
        log.info("model state on this rank (bytes): %s", per_rank[self.rank])

    def _due(self, done: int, every: int) -> bool:
        return done == self.cfg.train.steps or (every > 0 and done % every == 0)

    def _log(self, step: int, window: MetricWindow, peak: float) -> dict:
        values = window.reduce(peak, self.world_size, {"data/samples_seen": float(self.loader.samples_read())})
        values.update(
            {
                "optim/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                "optim/loss_scale": float(self.engine.optimizer.loss_scale) if self.engine.fp16_enabled() else 1.0,
                "optim/skipped_steps": float(self.engine.skipped_steps),
                "optim/diverging_skipped": float(self.guard.skipped),
            }
        )
        scheduler = getattr(self.step_fn, "scheduler", None)  # the VQ-VAE stage has none
        if scheduler is not None:
            values["schedule/stage"] = float(scheduler.stage(step - 1)[0])
        values.update(global_skip_counts(self.loader))
        self.reporter.scalars(step, values)
        log.info(
            "step %d: %s",
            step,
            json.dumps({k: round(v, 4) for k, v in values.items() if k.startswith(("loss/", "perf/samples"))}),
        )
        return values

    def evaluate(self, step: int) -> None:
        if not stage_of(self.cfg).evaluates or not self.cfg.data.eval_shards:
            return
        data = self.cfg.data
        if self.eval_set is None:
            self.eval_set = eval_batches(data.eval_shards, data.decode, data.reader.batch_size, data.eval_samples)
        scored_tokenizer = self.image_tokenizer if self.cfg.trained_image_tokenizer else None
        self.engine.eval()
        scores, texts, real, generated = evaluate_model(
            self.engine,
            self.eval_set,
            self.device,
            self.dtype,
            self.tokenizer,
            scored_tokenizer,
            data.decode,
            data.eval_generate,
            Decoding(),
        )
        self.engine.train()
        self.reporter.scalars(step, scores, group="eval")
        shown = self.cfg.train.generations
        if texts:
            self.reporter.text(
                step,
                "eval/captions",
                [
                    " | ".join(f"{source}: {captions[i]}" for source, captions in texts.items())
                    for i in range(min(shown, len(texts["reference"])))
                ],
            )
        if len(generated):
            self.reporter.images(step, "eval/generated_images", torch.cat([real[:shown], generated[:shown]]))
        if self.rank == 0:
            recall = {k.removeprefix("eval/"): round(v, 3) for k, v in scores.items() if k.endswith("/R@1")}
            log.info("eval at step %d: %s", step, recall)
            tqdm.write(f"eval at step {step}: R@1 {recall}")

    def _diverged(self, step: int, bar: tqdm) -> int:
        """End the run: max_skipped_in_a_row micro-steps in a row were skipped; nothing more is saved."""
        message = (
            f"diverged: {self.guard.in_a_row} micro-steps in a row up to step {step} had a loss that was not finite "
            "or spiked (train.max_skipped_in_a_row, train.loss_spike_factor); no checkpoint of this state was saved. "
            "Resume from the last one with a lower optim.lr or more warm-up."
        )
        return self._end(bar, message, EXIT_DIVERGED)

    def _end(self, bar: tqdm, message: str, status: int) -> int:
        """End the run on an error every rank agreed on: one line on the console, the log, `status`."""
        bar.close()
        log.error(message)
        if self.rank == 0:
            tqdm.write(f"opt_ds.train: {message}")
        self.reporter.close()
        return status

    def save(self, step: int) -> None:
        meta = {"stage": self.cfg.stage, "model": self.cfg.model}
        path = self.checkpointer.save(self.engine, step, self.loader.state_dict(), meta)
        if self.rank == 0:
            self.reporter.summary["last_checkpoint"] = str(path)
            self.reporter.write_summary()
        barrier()

    def _record_keys(self, step: int, batch: dict) -> None:
        if self.keys_file is not None:
            with self.keys_file.open("a") as f:
                f.write(json.dumps({"step": step, "keys": batch["keys"]}) + "\n")
