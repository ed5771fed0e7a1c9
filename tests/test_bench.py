"""The benchmark command: figures that agree with each other and with the model's sizes (never timed)."""

from __future__ import annotations

import json
import os

import pytest

from helpers import REPO, run_module
from opt_ds.model.config import load_model_config
from opt_ds.model.size import parameter_count


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_model_bench_reports_consistent_figures():
    report = last_json(
        run_module(
            "opt_ds.bench", "model", "--config", "tiny", "--batch", "2", "--steps", "2", "--warmup", "0", "--json"
        ).stdout
    )
    assert report["parameters"] == parameter_count(load_model_config("tiny"))["total"]
    assert report["samples_per_s"] == pytest.approx(report["batch"] / report["step_s"])
    assert report["train_tflops"] > 0 and report["fwd_gflops_per_sample_max_lengths"] > 1


@pytest.mark.slow
def test_throughput_bench_runs_deepspeed_against_the_plain_loop():
    report = last_json(
        run_module(
            "opt_ds.bench",
            "throughput",
            "--config",
            "tiny",
            "--zero",
            "3",
            "--ranks",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch-per-rank",
            "2",
            "--repeats",
            "2",
            "--json",
            timeout=900,
        ).stdout
    )
    (row,) = report["rows"]
    assert len(row["ratios"]) == 2 and row["ratio_vs_plain"] == min(row["ratios"])  # the lower median of two
    assert (row["zero"], row["ranks"], row["global_batch"]) == (3, 2, 4)
    assert row["samples_per_s"] == pytest.approx(4 / row["step_s"])
    assert row["ratio_vs_plain"] == pytest.approx(row["samples_per_s"] / row["plain_samples_per_s"])
    assert 0 < row["mfu"] < 1 and report["device_peak_tflops"] > 0
    assert row["tflops"] / report["device_peak_tflops"] == pytest.approx(row["mfu"])


@pytest.mark.slow
def test_loader_bench_compares_capacity_with_consumption():
    report = last_json(
        run_module(
            "opt_ds.bench",
            "loader",
            "--config",
            "tiny",
            "--workers",
            "0,1",
            "--ranks",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch-per-rank",
            "4",
            "--decode-image-sizes",
            "256,1024",
            "--decode-samples",
            "48",
            "--json",
            timeout=900,
        ).stdout
    )
    assert set(report["loader_samples_per_s"]) == {"0", "1"}
    small, large = report["decode"]["256"], report["decode"]["1024"]
    assert 8 < small["jpeg_kb"] < large["jpeg_kb"]  # photo-like detail, not a flat drawing's few KB
    for size in (small, large):
        steps = size["steps_ms"]
        assert size["worker_samples_per_s"] > 0 and steps["whole_sample"] > steps["flac_read"] > 0
        assert steps["log_mel_in_the_trainer_cpu"] > 0
    assert large["steps_ms"]["jpeg_draft_decode"] < large["steps_ms"]["jpeg_full_decode"]  # decoded at 1/4 scale
    for w, capacity in report["loader_samples_per_s"].items():
        assert capacity > 0 and report["headroom"][w] == pytest.approx(
            capacity / report["train_samples_per_s_per_rank"]
        )
    assert 0 <= report["data_wait_frac"] < 1


@pytest.mark.slow
def test_memory_bench_measures_model_state_per_zero_stage():
    report = last_json(
        run_module(
            "opt_ds.bench",
            "memory",
            "--config",
            "tiny",
            "--zero",
            "0,3",
            "--ranks",
            "2",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--batch-per-rank",
            "2",
            "--json",
            timeout=900,
        ).stdout
    )
    assert report["parameters"] == parameter_count(load_model_config("tiny"))["total"]
    zero0, zero3 = report["rows"]
    assert zero0["bytes_per_param"] == pytest.approx(16, rel=0.02)  # bf16 weights + bf16 grads + fp32 Adam, whole
    assert zero3["bytes_per_param"] == pytest.approx(8, rel=0.1)  # the same, halved over 2 ranks
    for row in (zero0, zero3):
        b = row["bytes"]
        assert row["model_state_bytes"] == b["parameters"] + b["gradients"] + b["optimizer"]
        assert row["ratio_vs_expected"] == pytest.approx(row["model_state_bytes"] / row["expected_bytes"])
    assert zero3["bytes"]["optimizer"] == pytest.approx(zero0["bytes"]["optimizer"] / 2, rel=0.02)
    assert [c["activation_checkpointing"] for c in report["checkpointing"]] == [False, True]
    assert all(c["peak_mb"] > c["transient_mb"] > 0 for c in report["checkpointing"])


@pytest.mark.slow
def test_scale_bench_trains_with_cpu_and_nvme_offload(tmp_path):
    swap = tmp_path / "swap"
    report = last_json(
        run_module(
            "opt_ds.bench",
            "scale",
            "--configs",
            "tiny",
            "--modes",
            "cpu_offload,nvme_offload",
            "--ranks",
            "1",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--nvme-path",
            str(swap),
            "--json",
            timeout=1200,
        ).stdout
    )
    rows = {row["mode"]: row for row in report["rows"]}
    assert set(rows) == {"cpu_offload", "nvme_offload"}
    assert all(row["ok"] and row["step_s"] > 0 and row["config"] == "tiny" for row in rows.values()), rows
    assert report["largest"] == {mode: {"config": "tiny", "parameters": rows[mode]["parameters"]} for mode in rows}
    assert swap.is_dir() and not any(swap.iterdir())  # the swap files of the run are removed after it


def test_plot_draws_the_recorded_figures(tmp_path):
    out = tmp_path / "bench.png"
    run_module("opt_ds.bench", "plot", "--out", str(out))  # from benchmarks/records.jsonl
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_curves_draw_a_runs_losses_and_held_out_scores_from_its_tensorboard_files(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from opt_ds.train.metrics import tensorboard_scalars

    with SummaryWriter(tmp_path / "run" / "tb") as writer:
        for step in range(10, 101, 10):
            writer.add_scalar("contrastive/loss", 3.0 / step, step)
            writer.add_scalar("contrastive/text_image_loss", 1.0, step)  # a per-pair loss: not a task's curve
        for step in (50, 100):
            writer.add_scalar("eval/text->image/R@1", step / 200, step)
            writer.add_scalar("eval/text_image/chance_R@1", 0.01, step)
    assert tensorboard_scalars(tmp_path / "run" / "tb", ("eval/text->image/R@1",)) == {
        "eval/text->image/R@1": {50: 0.25, 100: 0.5}
    }
    out = tmp_path / "curves.png"
    run_module("opt_ds.bench", "curves", "--run", str(tmp_path / "run"), "--out", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    (tmp_path / "empty" / "tb").mkdir(parents=True)
    failed = run_module("opt_ds.bench", "curves", "--run", str(tmp_path / "empty"), "--out", str(out), check=False)
    assert failed.returncode != 0 and "no task losses or held-out scores" in failed.stderr


@pytest.mark.slow
def test_learning_bench_scores_open_clip_and_opt_ds_by_one_rule(tmp_path, synthetic_shards):
    """A few steps of open_clip (installed into its own folder on first use) and of opt_ds on the same shards,
    once per seed, all scored on the same held-out samples with the same chance level; paths given relative
    to where the command runs (open_clip trains inside the work folder)."""
    shards, workdir = (os.path.relpath(p, REPO) for p in (synthetic_shards, tmp_path))
    report = last_json(
        run_module(
            "opt_ds.bench",
            "learning",
            "--train",
            shards,
            "--eval",
            shards,
            "--steps",
            "3",
            "--batch",
            "8",
            "--samples",
            "20",
            "--runs",
            "open_clip,contrastive",
            "--seeds",
            "0,1",
            "--workdir",
            workdir,
            "--json",
            timeout=1200,
        ).stdout
    )
    rows = report["rows"]
    assert set(rows) == {"open_clip", "opt_ds contrastive"}
    for per_seed in rows.values():
        assert [row["seed"] for row in per_seed] == [0, 1]
        for row in per_seed:
            assert row["samples"] == 20 and row["train_seconds"] > 0
            for query in ("text->image", "image->text"):
                assert 0 <= row[f"{query}/R@1"] <= row[f"{query}/R@5"] <= row[f"{query}/R@10"] <= 1
    assert rows["open_clip"][0]["chance_R@1"] == pytest.approx(rows["opt_ds contrastive"][0]["text_image/chance_R@1"])
    assert "captions_from_image/CIDEr" in rows["opt_ds contrastive"][0]
    assert (tmp_path / "contrastive_seed1.yaml").is_file() and "seed: 1" in (
        tmp_path / "contrastive_seed1.yaml"
    ).read_text()
