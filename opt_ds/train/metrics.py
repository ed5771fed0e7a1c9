"""Training metrics: throughput, model FLOPs and MFU, memory, data wait; TensorBoard and summary.json (rank 0).

Memory per log window, the largest rank: `memory/peak_mb` (CUDA allocated, or resident memory on CPU) and
`memory/transient_mb`, how far the steps rose above the window's start (activations, gathered ZeRO-3
parameters, temporaries: what activation checkpointing shrinks).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from opt_ds.dist.process import all_gather_object, all_reduce
from opt_ds.model.config import ModelConfig, subsampled_length
from opt_ds.model.fusion import MODALITY_ORDER
from opt_ds.model.opt import ENCODER_COMPONENTS
from opt_ds.model.size import forward_flops, lengths_for
from opt_ds.train import memory

# dense bf16 tensor-core peaks (TFLOP/s) by device name fragment
CUDA_BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def cuda_peak_tflops() -> float | None:
    name = torch.cuda.get_device_name()
    for key, peak in CUDA_BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def measure_matmul_peak_tflops(
    size: int = 2048, seconds: float = 1.0, threads: int | None = None, trials: int = 3
) -> float:
    """Achieved bf16 matmul TFLOP/s of this device (all cores on CPU): the denominator of MFU on CPU.

    The best of `trials` windows of `seconds`: a window shared with another busy process reads low.
    """
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
        b = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
        for _ in range(2):
            a @ b
        best = 0.0
        for _ in range(trials):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                a @ b
                n += 1
                if dev == "cuda":
                    torch.cuda.synchronize()
            best = max(best, 2 * size**3 * n / (time.perf_counter() - start) / 1e12)
        return best
    finally:
        torch.set_num_threads(old)


def step_flops(
    model_cfg: ModelConfig, tasks: dict, plan: list[tuple[str, float]], batch: dict, encoders_frozen: bool = False
) -> float:
    """Training FLOPs of one micro-batch on this rank: 3x the forward FLOPs of the components each task runs (1x
    for the encoders when a stage runs them without gradients)."""
    text_tokens = batch["text_ids"].shape[1]
    frames = batch["audio_mask"].shape[1]
    slots = tuple(batch[k].shape[1] if k in batch else 0 for k in ("concept_ids", "tag_ids"))
    fwd = forward_flops(model_cfg, lengths_for(model_cfg, text_tokens, frames, slots))
    passes = {c: 1.0 if encoders_frozen and c in ENCODER_COMPONENTS else 3.0 for c in fwd}
    per_sample = sum(
        passes[c] * fwd[c] * (tasks[name].fused_rows_per_sample if c == "fusion" else 1)
        for name, _ in plan
        for c in tasks[name].components
    )
    for name, _ in plan:  # text-only rows a task adds to the text encoder's batch (caption rewrites)
        if tasks[name].extra_text_key in batch:
            slots, length = batch[tasks[name].extra_text_key].shape[1:]
            text = forward_flops(model_cfg, lengths_for(model_cfg, length, frames))["text"]
            per_sample += passes["text"] * slots * text
    return per_sample * batch["text_ids"].shape[0]


def modality_tokens(batch: dict, model_cfg: ModelConfig) -> dict[str, float]:
    """Encoder input tokens of a batch: word pieces, image patches, audio tokens (4 log-mel frames each)."""
    return {
        "text": float(batch["text_mask"].sum()),
        "image": float(batch["has_image"].sum()) * model_cfg.vision.grid**2,
        "audio": float(subsampled_length(batch["audio_mask"][:, : model_cfg.audio.max_frames].sum(1)).sum()),
    }


class MetricWindow:
    """Accumulates per-step numbers between log steps; reduces across ranks when logging."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)
        self.counts: Counter[str] = Counter()
        self.tasks: Counter[str] = Counter()
        self.steps = 0
        self.samples = 0.0
        self.flops = 0.0
        self.data_wait = 0.0
        memory.reset_peak()
        self.start_bytes = memory.current_bytes()
        self.start = time.perf_counter()

    def add_step(
        self,
        metrics: dict[str, float],
        total_loss: float,
        plan,
        samples: int,
        flops: float,
        tokens: dict[str, float],
        data_wait: float,
    ) -> None:
        self.steps += 1
        for k, v in metrics.items():
            self.values[k].append(v)
        self.values["loss/total"].append(total_loss)
        for name, _ in plan:
            self.tasks[name] += 1
        self.samples += samples
        self.flops += flops
        self.counts.update(tokens)
        self.data_wait += data_wait

    def reduce(self, peak_tflops: float, world_size: int, sums: dict[str, float]) -> dict[str, float]:
        """Collective, one sum and one max over ranks: global throughput, MFU, memory and data wait, the per-task
        means averaged over ranks, and `sums` (counters of this rank) added up."""
        elapsed = time.perf_counter() - self.start
        means = {k: sum(v) / len(v) for k, v in sorted(self.values.items())}  # same keys, same order on every rank
        totals = all_reduce(
            [self.samples, self.flops]
            + [self.counts[m] for m in MODALITY_ORDER]
            + list(means.values())
            + list(sums.values())
        )
        after_tokens = 2 + len(MODALITY_ORDER)
        samples, flops, tokens = totals[0], totals[1], totals[2:after_tokens]
        rank_means, rank_sums = totals[after_tokens : after_tokens + len(means)], totals[after_tokens + len(means) :]
        peak = memory.peak_bytes()
        wait_max, peak_max, transient_max = all_reduce(
            [self.data_wait / max(elapsed, 1e-9), peak / 2**20, (peak - self.start_bytes) / 2**20], "max"
        )
        out = {k: total / world_size for k, total in zip(means, rank_means)}
        out.update(zip(sums, rank_sums))
        tflops = flops / elapsed / 1e12
        out.update(
            {
                "perf/samples_per_s": samples / elapsed,
                "perf/tflops": tflops,
                "perf/mfu": tflops / peak_tflops if peak_tflops else 0.0,
                "perf/data_wait_frac": wait_max,
                "perf/step_time_s": elapsed / max(self.steps, 1),
                "memory/peak_mb": peak_max,
                "memory/transient_mb": transient_max,
            }
        )
        for k, total in zip(MODALITY_ORDER, tokens):
            out[f"perf/{k}_tokens_per_s"] = total / elapsed
        for name, n in self.tasks.items():
            out[f"schedule/task_frac/{name}"] = n / max(self.steps, 1)
        return out


def global_skip_counts(loader) -> dict[str, float]:
    """Collective: bad-input counters summed over ranks."""
    merged: Counter[str] = Counter()
    for counts in all_gather_object(loader.skip_counts()):
        merged.update(counts)
    return {f"data/skipped/{k}": float(v) for k, v in sorted(merged.items())}


class Reporter:
    """TensorBoard scalars/text/images and summary.json; a no-op except on rank 0."""

    def __init__(self, run_dir: Path, rank: int):
        self.active = rank == 0
        self.summary_path = run_dir / "summary.json"
        self.summary: dict = {}
        self.writer = None
        if self.active:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))

    def scalars(self, step: int, values: dict[str, float], group: str = "train") -> None:
        if not self.active:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.summary[group] = {k: round(v, 6) for k, v in values.items()}
        self.summary["step"] = step
        self.write_summary()

    def text(self, step: int, tag: str, lines: list[str]) -> None:
        if self.active:
            self.writer.add_text(tag, "\n\n".join(lines), step)

    def images(self, step: int, tag: str, images: torch.Tensor) -> None:
        if self.active:
            self.writer.add_images(tag, images.float().clamp(0, 1), step)

    def write_summary(self) -> None:
        tmp = self.summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.summary, "time": time.time()}, indent=1))
        os.replace(tmp, self.summary_path)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def tensorboard_scalars(tb_dir: Path, tags: tuple[str, ...] | None = None) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} read back from a run's TensorBoard files (every tag when none are named)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in (tags or acc.Tags()["scalars"])}
