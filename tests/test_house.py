"""The house rules, checked by the suite: the linter's settings, module sizes, and the fast unit checks of the
components that the multi-process tests otherwise cover only end to end (task settings, checkpoints, LR)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from opt_ds.config.fields import ConfigError, from_dict
from opt_ds.tasks import TasksConfig, build_tasks

MAX_MODULE_LINES = 400


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_code_is_clean_under_pyproject_ruff_settings(command):
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--no-cache", "opt_ds", "tests", "benchmarks"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_no_package_module_over_400_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in (REPO / "opt_ds").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these modules: {long}"


def test_task_settings_default_to_the_measured_constants_and_reach_the_tasks():
    tasks = build_tasks(
        from_dict(TasksConfig, {"mlm": {"mask_ratio": 0.4}, "text_gen": {"partner_split": [0.5, 0.2, 0.3]}})
    )
    assert tasks["mlm"].settings.mask_ratio == 0.4 and tasks["mlm"].settings.whole_modality_prob == 0.3
    assert tasks["mvm"].settings.mask_ratio == 0.15
    assert tasks["text_gen"].settings.partner_split == [0.5, 0.2, 0.3]
    assert tasks["image_gen"].settings.partner_split == [0.3, 0.3, 0.4]
    assert tasks["mam"].settings.temperature == 0.1 and tasks["matching"].settings.class_probs == [0.2] * 5


@pytest.mark.parametrize(
    "section, message",
    [
        ({"mlm": {"mask_ratio": 0.0}}, "tasks.mlm.mask_ratio must be in (0, 1]"),
        ({"text_gen": {"partner_split": [0.5, 0.5, 0.5]}}, "tasks.text_gen.partner_split needs 3"),
        ({"matching": {"class_probs": [1.0]}}, "tasks.matching.class_probs needs 5"),
        ({"mam": {"temperature": 0}}, "temperature > 0"),
        ({"mlm": {"mask_rate": 0.2}}, "mask_rate"),
    ],
)
def test_bad_task_settings_name_the_key(section, message):
    with pytest.raises(
        (ConfigError, ValueError),
        match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
    ):
        from_dict(TasksConfig, section)


def test_a_bad_task_setting_fails_training_at_start_up_with_status_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "opt_ds.train",
            "--config",
            "opt_ds/configs/demo.yaml",
            "--output",
            str(tmp_path / "run"),
            "--set",
            "tasks.text_gen.partner_split=[1.0, 1.0, 0.0]",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "tasks.text_gen.partner_split" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def _complete(root: Path, step: int, complete: bool = True) -> Path:
    from opt_ds.train.checkpoint import COMPLETE, tag_for

    path = root / tag_for(step)
    path.mkdir(parents=True)
    if complete:
        (path / "meta.json").write_text(f'{{"step": {step}, "world_size": 2}}')
        (path / COMPLETE).write_text("")
    return path


def test_checkpoints_resume_from_the_newest_complete_and_prune_older_ones(tmp_path):
    from opt_ds.train.checkpoint import Checkpointer, find_resume, prune

    for step in (100, 200, 300):
        _complete(tmp_path, step)
    partial_old, partial_new = _complete(tmp_path, 150, complete=False), _complete(tmp_path, 400, complete=False)
    assert find_resume(tmp_path, "auto").name.endswith("300")  # the partial step 400 is never resumed from
    assert find_resume(tmp_path, "none") is None
    (tmp_path / "step_00000300" / "data_rank0.json").write_text('{"position": 300}')

    class ReaderPosition:  # what resume_point asks of a loader: its state back
        def load_state_dict(self, state: dict) -> None:
            self.state = state

    reader = ReaderPosition()
    point = Checkpointer(tmp_path, rank=0, world_size=2, keep_last=2).resume_point("auto", {}, reader)
    assert (point.step, point.universal, reader.state) == (300, False, {"position": 300})
    prune(tmp_path, keep_last=2)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step_00000200", "step_00000300", "step_00000400"]  # a partial save newer than all is kept
    assert not partial_old.exists() and partial_new.exists()


def test_lr_schedule_warms_up_then_decays_to_its_floor():
    from opt_ds.config.experiment import OptimConfig
    from opt_ds.zero.engine import warmup_cosine

    factor = warmup_cosine(OptimConfig(warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(60) == pytest.approx(0.55)
    assert factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)


def test_each_component_follows_the_rate_of_the_stage_it_is_in():
    """A stage that trains some components gives the others rate 0; a stage with its own lr runs a cosine from it
    over its own steps; without either, the run's warm-up and cosine go on."""
    from opt_ds.config.experiment import OptimConfig
    from opt_ds.tasks import ScheduleConfig, StageConfig, TaskScheduler
    from opt_ds.zero.engine import component_rate, warmup_cosine

    optim = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    scheduler = TaskScheduler(
        ScheduleConfig(
            stages=[
                StageConfig("joint", {"text_gen": 1.0, "contrastive": 1.0}, until_step=60),
                StageConfig("captioning", {"text_gen": 1.0}, trains=["text_decoder"], lr=2e-3),
            ]
        )
    )
    run = warmup_cosine(optim, 110)
    encoder, decoder = (component_rate(optim, scheduler, 110, c) for c in ("vision", "text_decoder"))
    for step in (0, 9, 30, 59):
        assert encoder(step) == decoder(step) == pytest.approx(run(step))
    assert encoder(60) == encoder(109) == 0.0
    assert (
        decoder(60) == pytest.approx(2.0) and decoder(85) == pytest.approx(1.1) and decoder(110) == pytest.approx(0.2)
    )


def test_metric_window_reduces_means_task_shares_and_counters_on_one_rank():
    from opt_ds.train.metrics import MetricWindow

    window = MetricWindow()
    tokens = {"text": 10.0, "image": 20.0, "audio": 0.0}
    window.add_step({"mlm/loss": 2.0}, 2.0, [("mlm", 1.0)], 8, 1e9, tokens, 0.0)
    window.add_step({"mlm/loss": 4.0, "mvm/loss": 1.0}, 5.0, [("mlm", 1.0), ("mvm", 1.0)], 8, 1e9, tokens, 0.0)
    out = window.reduce(peak_tflops=1.0, world_size=1, sums={"data/samples_seen": 16.0})
    assert out["mlm/loss"] == 3.0 and out["mvm/loss"] == 1.0 and out["loss/total"] == 3.5
    assert out["data/samples_seen"] == 16.0
    assert out["schedule/task_frac/mlm"] == 1.0 and out["schedule/task_frac/mvm"] == 0.5  # share of steps
    assert out["perf/samples_per_s"] > 0 and out["perf/step_time_s"] > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=5"], "stepz"),
        (["train.steps=many"], "train.steps"),
        (["optim.lr_scale.decoder=2"], "unknown component 'decoder'"),
        (["stage=finetune"], "stage must be one of"),
        (["train.steps"], "key=value"),
        (["optim.lr=-1e-3"], "optim.lr and optim.eps must be > 0"),
        (["optim.warmup_steps=-5"], "optim.weight_decay and optim.warmup_steps must be >= 0"),
        (["optim.min_lr_ratio=7"], "optim.min_lr_ratio must be in [0, 1], got 7"),
        (["data.reader.batch_size=0"], "data.reader.batch_size must be >= 1, got 0"),
        (["data.reader.num_workers=-1"], "data.reader.num_workers must be >= 0, got -1"),
        (["train.loss_spike_factor=0.5"], "train.loss_spike_factor must be > 1 (or 0: off), got 0.5"),
        (["data.decode.max_text_tokens=100"], "data.decode.max_text_tokens: 100, but model tiny reads at most 64"),
        (["data.eval_shards=/nowhere/eval"], "data.eval_shards: shard not found: /nowhere/eval"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    """Checked in-process here; tests/test_training.py checks that `python -m opt_ds.train` turns them into status 2."""
    from opt_ds.config.experiment import check_fits_model, load_config
    from opt_ds.model.config import load_model_config

    with pytest.raises((ConfigError, ValueError), match=re.escape(message)):
        cfg = load_config("opt_ds/configs/demo.yaml", overrides)
        check_fits_model(cfg, load_model_config(cfg.model, cfg.model_overrides))


@pytest.mark.parametrize(
    "section, message",
    [
        ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage must be 0, 1, 2 or 3, got 7"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "bf16 and fp16 are both enabled"),
        ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
        ({"zero_optimization": {"stage": 3, "reduce_bucket_sise": 5}}, "zero_optimization.reduce_bucket_sise: Extra"),
        ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "lots"}}, "zero_optimization.reduce_bucket_size: "),
    ],
)
def test_bad_deepspeed_json_names_the_key(tmp_path, section, message):
    from opt_ds.config.experiment import load_config
    from opt_ds.zero.config import load_deepspeed_config

    (tmp_path / "ds.json").write_text(json.dumps(section))
    cfg = load_config("opt_ds/configs/demo.yaml", [f"deepspeed={tmp_path / 'ds.json'}"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_deepspeed_config(cfg, 10_000_000)


def test_a_checkpoint_whose_files_differ_from_their_list_is_passed_over(tmp_path):
    from opt_ds.train.checkpoint import COMPLETE, CheckpointError, file_sizes, find_resume

    for step in (100, 200):
        path = _complete(tmp_path, step)
        (path / "shard.pt").write_bytes(b"x" * 1000)
        (path / COMPLETE).write_text(json.dumps(file_sizes(path)))
    damaged = tmp_path / "step_00000200" / "shard.pt"
    damaged.write_bytes(b"x" * 10)
    assert find_resume(tmp_path, "auto").name == "step_00000100"
    with pytest.raises(CheckpointError, match=f"damaged checkpoint: {damaged} holds 10 bytes, 1000 were written"):
        find_resume(tmp_path, str(damaged.parent))
    damaged.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        find_resume(tmp_path, str(damaged.parent))
