"""DeepSpeed pre-training on 2 CPU ranks: every task mix, TensorBoard, resume exactness, export + evaluate,
world-size change, and configs that must fail at start-up."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import run_module, train_ranks, write_config
from opt_ds.config.experiment import load_config
from opt_ds.config.fields import ConfigError
from opt_ds.export.bundle import read_config
from opt_ds.tasks import TASKS
from opt_ds.train.checkpoint import CheckpointError, find_resume, tag_for


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Triplets, and a list file that gives rank 0 triplet shards and rank 1 text-, image- and audio-only ones."""
    root = tmp_path_factory.mktemp("train_data")

    def build(name: str, *args: str) -> Path:
        run_module(
            "opt_ds.data.build_shards",
            "synthetic",
            "--out",
            str(root / name),
            "--quiet",
            "--audio-seconds",
            "1.0",
            *args,
        )
        return root / name

    build("triplets", "--num", "96", "--max-samples", "16")
    build("eval", "--num", "24", "--seed", "5")
    for i, mods in enumerate(("text", "image", "audio")):
        build(f"{mods}_only", "--num", "32", "--max-samples", "16", "--seed", str(10 + i), "--modalities", mods)
    triplet_shards = sorted((root / "triplets").glob("*.tar"))
    unpaired = sorted(p for m in ("text", "image", "audio") for p in (root / f"{m}_only").glob("*.tar"))
    lines = [str(p) for pair in zip(triplet_shards, unpaired) for p in pair]
    (root / "mixed.txt").write_text("\n".join(lines) + "\n")
    run_module("opt_ds.data.concepts", str(root / "triplets"), "--min-count", "3", "--out", str(root / "concepts.json"))
    return {
        "root": root,
        "triplets": root / "triplets",
        "eval": root / "eval",
        "mixed": root / "mixed.txt",
        "concepts": root / "concepts.json",
    }


def concept_decode(data: dict[str, Path], **decode) -> dict:
    """The small runs' decode section with MVP's concepts from the triplets' vocabulary."""
    return {"max_audio_seconds": 1.0, "max_text_tokens": 16, "concepts": str(data["concepts"]), **decode}


CONCEPT_MODEL = {"concept_vocab_size": 128}  # the triplets' vocabulary holds fewer


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    out = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    out["_images"] = acc.Tags()["images"]
    out["_text"] = acc.Tags()["tensors"]
    return out


@pytest.fixture(scope="module")
def vq_export(data, tmp_path_factory) -> Path:
    """A 2-rank VQ-VAE stage, exported: the image tokenizer the pre-training runs use."""
    root = tmp_path_factory.mktemp("vq")
    config = write_config(root / "vq.yaml", data["triplets"], stage="vqvae", train={"steps": 4, "save_every": 0})
    train_ranks(2, "--config", str(config), "--output", str(root / "run"))
    out = root / "vq.safetensors"
    run_module("opt_ds.export", "--checkpoint", str(root / "run" / "checkpoints"), "--out", str(out))
    return out


@pytest.fixture(scope="module")
def mixed_run(data, vq_export, tmp_path_factory) -> Path:
    """All ten tasks every step (sum mode) while the two ranks read different modality mixes, so some samples lack
    concepts or tags; with caption rewrites, which only some samples of rank 1 (its text-only ones) have."""
    root = tmp_path_factory.mktemp("mixed")
    config = write_config(
        root / "mixed.yaml",
        data["triplets"],
        image_tokenizer=str(vq_export),
        model_overrides=CONCEPT_MODEL,
        data={
            "sources": [{"name": "mixed", "shards": str(data["mixed"])}],
            "eval_shards": str(data["eval"]),
            "eval_samples": 24,
            "decode": concept_decode(data, paraphrases_per_sample=1, hard_negatives_per_sample=2),
            "reader": {"batch_size": 4, "num_workers": 1, "shuffle_shards": False, "shuffle_buffer": 0},
        },
        schedule={"mode": "sum", "stages": [{"name": "all", "tasks": {t: 1.0 for t in TASKS}}]},
        train={"steps": 4, "log_every": 1, "save_every": 0, "generations": 2, "log_sample_keys": True},
    )
    train_ranks(2, "--config", str(config), "--output", str(root / "run"))
    return root / "run"


@pytest.mark.slow
def test_every_task_trains_when_ranks_see_different_modality_mixes(mixed_run):
    logs = [(mixed_run / "logs" / f"rank{r}.log").read_text() for r in (0, 1)]
    assert all("world of 2" in log for log in logs)
    assert re.search(r"ZeRO-3: [1-9]\d* leaf modules gathered whole; hooks dropped from [1-9]\d* submodules", logs[0])
    seen = [
        [json.loads(line)["keys"] for line in (mixed_run / "logs" / f"keys_rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert all(k.startswith("syn000_") for batch in seen[0] for k in batch)  # rank 0: triplets only
    assert not any(k.startswith("syn000_") for batch in seen[1] for k in batch)  # rank 1: unpaired only
    tb = scalars(mixed_run)
    for task in TASKS:
        values = tb[f"{task}/loss"]
        assert sorted(values) == [1, 2, 3, 4] and all(v == v and abs(v) < 1e4 for v in values.values()), task
    assert (mixed_run / "checkpoints" / tag_for(4) / "COMPLETE").is_file()


@pytest.mark.slow
def test_tensorboard_holds_the_documented_scalars(mixed_run):
    tb = scalars(mixed_run)
    expected = [
        "loss/total",
        "optim/lr/text",
        "optim/lr/text_decoder",
        "optim/grad_norm",
        "optim/loss_scale",
        "optim/skipped_steps",
        "perf/samples_per_s",
        "perf/tflops",
        "perf/mfu",
        "perf/data_wait_frac",
        "perf/text_tokens_per_s",
        "perf/image_tokens_per_s",
        "perf/audio_tokens_per_s",
        "memory/peak_mb",
        "memory/transient_mb",
        "data/samples_seen",
        "schedule/stage",
        "eval/text->image/R@1",
        "eval/audio->image/R@10",
        "eval/text->audio/R@5",
        "contrastive/image_hard_negative_acc",
        "eval/image->text/hard_negative_acc",
        "eval/audio->text/hard_negative_acc",
        "eval/captions_from_image/CIDEr",
        "eval/captions_from_audio/WER",
        "eval/images_from_text/R@1",
        "eval/zero_shot/image_acc",
        "eval/matching/acc",
        "eval/pair_matching/acc",
        "mcr/tags_acc",
        "grounding/acc",
        "hard_matching/hard_acc",
        "optim/clipped",
        "contrastive/image_audio_loss",
    ]
    for tag in expected:
        assert tag in tb, tag
    assert tb["perf/samples_per_s"][4] > 0 and 0 < tb["perf/mfu"][4] < 1 and tb["data/samples_seen"][4] == 2 * 4 * 4
    assert tb["optim/lr/text"][1] < tb["optim/lr/text"][2]  # warm-up
    assert "eval/generated_images" in tb["_images"] and any("eval/captions" in t for t in tb["_text"])
    summary = json.loads((mixed_run / "summary.json").read_text())
    assert summary["step"] == 4 and "eval/text->image/R@1" in summary["eval"] and summary["device_peak_tflops"] > 0
    assert yaml.safe_load((mixed_run / "config.yaml").read_text())["train"]["steps"] == 4


@pytest.fixture(scope="module")
def resume_runs(data, vq_export, tmp_path_factory) -> dict[str, Path]:
    """One 6-step run; and the same config stopped after step 3 and resumed (one task per step, of all ten, on a
    model with concept inputs and the conv stem, whose BatchNorm statistics must resume too)."""
    root = tmp_path_factory.mktemp("resume")
    config = write_config(
        root / "run.yaml",
        data["triplets"],
        image_tokenizer=str(vq_export),
        model_overrides=CONCEPT_MODEL | {"vision": {"stem": "conv"}},
        data={"decode": concept_decode(data)},
        schedule={"mode": "sample", "stages": [{"name": "all", "tasks": {t: 1.0 for t in TASKS}}]},
        train={"steps": 6, "log_every": 1, "save_every": 3, "log_sample_keys": True},
    )
    train_ranks(2, "--config", str(config), "--output", str(root / "straight"))
    train_ranks(2, "--config", str(config), "--output", str(root / "split"), "--stop-at", "3", expect=75)
    assert (root / "split" / "checkpoints" / tag_for(3) / "COMPLETE").is_file()
    shutil.copytree(root / "split", root / "split_copy")  # for the world-size test, before it is resumed here
    train_ranks(2, "--config", str(config), "--output", str(root / "split"), "--resume", "auto")
    return {
        "root": root,
        "config": config,
        "straight": root / "straight",
        "split": root / "split",
        "split_copy": root / "split_copy",
    }


@pytest.mark.slow
def test_concept_tasks_lower_their_losses_under_zero3_on_two_ranks(data, tmp_path):
    """MVP's three tasks and the contrastive one, summed every step on 2 ZeRO-3 ranks: each loss falls."""
    tasks = ("mcr", "grounding", "hard_matching", "contrastive")
    config = write_config(
        tmp_path / "concepts.yaml",
        data["triplets"],
        model_overrides=CONCEPT_MODEL,
        data={"decode": concept_decode(data)},
        schedule={"mode": "sum", "stages": [{"name": "all", "tasks": {t: 1.0 for t in tasks}}]},
        optim={"lr": 1e-3, "warmup_steps": 2},
        train={"steps": 24, "log_every": 1, "save_every": 0},
    )
    train_ranks(2, "--config", str(config), "--output", str(tmp_path / "run"))
    tb = scalars(tmp_path / "run")
    for task in tasks:
        losses = [tb[f"{task}/loss"][step] for step in range(1, 25)]
        assert sum(losses[-6:]) < sum(losses[:6]), (task, losses)
    assert 0 < tb["mcr/tags_acc"][24] <= 1 and tb["hard_matching/hard"][24] > 0


def keys_seen(run_dir: Path) -> list[str]:
    return sorted(
        k
        for r in (0, 1)
        for line in (run_dir / "logs" / f"keys_rank{r}.jsonl").read_text().splitlines()
        for k in json.loads(line)["keys"]
    )


@pytest.mark.slow
def test_resumed_run_matches_the_uninterrupted_one(resume_runs):
    """bf16 compute, fp32 master weights: same world size and data order, so losses agree to bf16 noise."""
    straight, split = scalars(resume_runs["straight"]), scalars(resume_runs["split"])
    for step in (4, 5, 6):
        assert split["loss/total"][step] == pytest.approx(straight["loss/total"][step], rel=1e-3), step
    assert keys_seen(resume_runs["straight"]) == keys_seen(resume_runs["split"])
    a, b = (resume_runs["root"] / "a.safetensors", resume_runs["root"] / "b.safetensors")
    run_module("opt_ds.export", "--checkpoint", str(resume_runs["straight"] / "checkpoints"), "--out", str(a))
    run_module("opt_ds.export", "--checkpoint", str(resume_runs["split"] / "checkpoints"), "--out", str(b))
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
def test_export_and_evaluate_without_deepspeed(resume_runs, data):
    weights = resume_runs["root"] / "a.safetensors"
    if not weights.exists():
        run_module("opt_ds.export", "--checkpoint", str(resume_runs["straight"] / "checkpoints"), "--out", str(weights))
    out = resume_runs["root"] / "eval_out"
    report = json.loads(
        run_module(
            "opt_ds.evaluate",
            "--weights",
            str(weights),
            "--shards",
            str(data["eval"]),
            "--json",
            "--out",
            str(out),
            "--generate",
            "3",
            "--beams",
            "2",
        ).stdout
    )
    assert report["samples"] == 24
    moved = resume_runs["root"] / "moved" / "model.safetensors"  # an export and its vocabulary, elsewhere
    moved.parent.mkdir(exist_ok=True)
    shutil.copy(weights, moved)
    shutil.copy(weights.with_suffix(".concepts.json"), moved.with_suffix(".concepts.json"))
    assert read_config(moved).data.decode.concepts == str(moved.with_suffix(".concepts.json"))
    for query in ("text->image", "image->text", "text->audio", "audio->text", "image->audio", "audio->image"):
        assert 0 <= report["scores"][f"eval/{query}/R@1"] <= report["scores"][f"eval/{query}/R@10"] <= 1
    assert len((out / "captions.txt").read_text().splitlines()) == 3 and (out / "images.png").stat().st_size > 0
    assert (out / "grid.png").stat().st_size > 0
    scores = report["scores"]
    for key in (
        "captions_from_image/BLEU-4",
        "captions_from_image/CIDEr",
        "captions_from_audio/WER",
        "captions_from_image+audio/colour_and_shape",
        "captions_from_image/shape",
        "captions_from_audio/count",
        "images_from_text/R@1",
        "images_from_text/real_R@1",
        "images_from_text/colour",
        "zero_shot/image_acc",
        "zero_shot/audio_acc",
        "zero_shot/image_shape",
        "matching/both_from_two_acc",
        "pair_matching/acc",
    ):
        assert 0 <= scores[f"eval/{key}"] <= (float("inf") if key.endswith(("WER", "CIDEr")) else 1), key
    assert scores["eval/images_from_text/real_colour"] == 1.0  # the synthetic pictures show their caption's colour
    assert 0 <= scores["eval/images_from_text/tokenizer_colour"] <= 1
    table = run_module(
        "opt_ds.evaluate",
        "--weights",
        str(weights),
        "--shards",
        str(data["eval"]),
        "--generate",
        "0",
        "--hard-negatives",
        "3",
    ).stdout
    assert "text->image" in table and "chance R@1" in table
    assert re.search(r"image->text: own caption above all hard negatives for [01]\.\d{3} of the samples", table), table


@pytest.mark.slow
def test_resume_on_a_different_world_size(resume_runs):
    """The 2-rank checkpoint of step 3 continues on 1 rank through a universal checkpoint."""
    run_dir = resume_runs["split_copy"]
    train_ranks(1, "--config", str(resume_runs["config"]), "--output", str(run_dir), "--resume", "auto")
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "world size changed (2 -> 1)" in log and "resumed from" in log
    assert (run_dir / "checkpoints" / tag_for(6) / "COMPLETE").is_file()
    assert sorted(scalars(run_dir)["loss/total"]) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_partial_and_missing_checkpoints_are_clear_errors(resume_runs, tmp_path):
    partial = tmp_path / "checkpoints" / tag_for(9)
    shutil.copytree(resume_runs["straight"] / "checkpoints" / tag_for(6), partial)
    (partial / "COMPLETE").unlink()
    assert find_resume(tmp_path / "checkpoints", "auto") is None  # ignored by auto ...
    with pytest.raises(CheckpointError, match="partial checkpoint"):  # ... refused when named
        find_resume(tmp_path / "checkpoints", str(partial))
    with pytest.raises(CheckpointError, match="not found"):
        find_resume(tmp_path / "checkpoints", str(tmp_path / "nowhere"))
    proc = run_module(
        "opt_ds.export", "--checkpoint", str(partial), "--out", str(tmp_path / "x.safetensors"), check=False
    )
    assert proc.returncode == 2 and "partial checkpoint" in proc.stderr


def test_auto_deepspeed_values_fit_the_model_and_name_every_layer_as_a_leaf(data, tmp_path):
    from deepspeed.utils import set_z3_leaf_modules

    from opt_ds.config.experiment import load_config
    from opt_ds.model.config import load_model_config
    from opt_ds.model.opt import OPTModel
    from opt_ds.zero.config import load_deepspeed_config

    ds = load_deepspeed_config(load_config(str(write_config(tmp_path / "c.yaml", data["triplets"]))), 80_000_000)
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["stage3_max_reuse_distance"] == 10_000_000
    assert ds["data_types"]["grad_accum_dtype"] == "bf16"  # no gradient accumulation
    model = OPTModel(load_model_config("tiny"))
    leaves = set_z3_leaf_modules(model, zero["leaf_module"]["classes"])
    names = {m: n for n, m in model.named_modules()}
    assert {names[m].split(".")[0] for m in leaves} == {
        "text",
        "vision",
        "audio",
        "fusion",
        "text_decoder",
        "image_decoder",
    }
    assert len(leaves) == sum(1 for m in model.modules() if type(m).__name__ in ("BertLayer", "Block"))


def test_numbers_in_exponent_notation_are_floats(data, tmp_path):
    """YAML 1.1 reads `1e-3` (no dot) as a string: a float key takes it as the number it spells."""
    cfg = load_config(str(write_config(tmp_path / "c.yaml", data["triplets"])), ["optim.lr=1e-3", "optim.eps=2E-8"])
    assert cfg.optim.lr == 0.001 and cfg.optim.eps == 2e-8
    with pytest.raises(ConfigError, match="optim.lr: expected float, got str 'fast'"):
        load_config(str(write_config(tmp_path / "c.yaml", data["triplets"])), ["optim.lr=fast"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown key 'stepz'"),
        ("train.steps=many", "train.steps: expected int"),
        ("optim.lr=[1]", "optim.lr: expected float"),
        ("schedule.mode=sometimes", "mode must be one of"),
        ("deepspeed=ds_configs/none.json", "deepspeed config not found"),
        ("data.sources=[{name: x, shards: '/nowhere/shard-{0..3}.tar'}]", "shard not found: /nowhere/shard-0.tar"),
        ("data.sources=[{name: x, shards: /nowhere/shard-{0..3}.tar}]", "the value is not valid YAML"),
        ("data.decode.hard_negatives_per_sample=-1", "data.decode: hard_negatives_per_sample must be >= 0, got -1"),
        (
            "train.steps=3",
            "image_tokenizer: the schedule runs image_gen and mvm, which predict the codes of a trained VQ-VAE",
        ),
        ("image_tokenizer=/nowhere/vq.safetensors", "image_tokenizer: /nowhere/vq.safetensors not found"),
        ("optim.lr_scale={decoder: 2}", "lr_scale: unknown component 'decoder' (known: text, vision"),
        ("data.decode.image_size=128", "data.decode.image_size: 128 px, but model tiny takes 64 px images"),
        (
            "schedule.stages=[{name: mvp, tasks: {mcr: 1.0, contrastive: 1.0}}]",
            "schedule: mcr: MVP's concept tasks need a concept vocabulary (data.decode.concepts",
        ),
        ("data.decode.concepts=/nowhere/concepts.json", "data.decode.concepts: /nowhere/concepts.json: not a concept"),
        ("data.decode.concepts=CONCEPTS", "concepts.json needs"),  # ... ids, but model tiny embeds 0
        ("model_overrides.concept_vocab_size=1", "concept_vocab_size must be 0 (off) or > 2, got 1"),
        (
            "schedule.stages=[{name: cap, tasks: {contrastive: 1.0}, trains: [text_decoder]}]",
            "stage 'cap': task 'contrastive' runs text, vision, audio, heads, none of which the stage trains",
        ),
        (
            "schedule.stages=[{name: cap, tasks: {text_gen: 1.0}, settings: {text_gen: {partner_split: [1.0]}}}]",
            "schedule.stages.cap.settings: tasks.text_gen.partner_split needs 3 non-negative shares",
        ),
    ],
)
def test_bad_configs_fail_at_start_up_naming_the_key(data, tmp_path, override, message):
    override = override.replace("CONCEPTS", str(data["concepts"]))  # the fixture's vocabulary
    config = write_config(tmp_path / "c.yaml", data["triplets"])
    proc = run_module(
        "opt_ds.train",
        "--config",
        str(config),
        "--output",
        str(tmp_path / "run"),
        "--set",
        override,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_stage_that_trains_the_decoders_alone_leaves_every_other_weight_as_it_was(data, vq_export, tmp_path):
    """Three joint steps, then a captioning stage (the decoders alone, at their own rate, text_gen from the picture
    alone) under ZeRO-3 on 2 ranks: the encoders, fusion and heads of step 6, the conv stem's BatchNorm statistics
    included, are bit for bit those of step 3."""
    config = write_config(
        tmp_path / "c.yaml",
        data["triplets"],
        image_tokenizer=str(vq_export),
        model_overrides={"vision": {"stem": "conv"}},
        schedule={
            "mode": "sum",
            "stages": [
                {"name": "joint", "until_step": 3, "tasks": {"contrastive": 1.0, "text_gen": 1.0, "image_gen": 1.0}},
                {
                    "name": "captioning",
                    "tasks": {"text_gen": 1.0, "image_gen": 1.0},
                    "trains": ["text_decoder", "image_decoder"],
                    "lr": 1e-3,
                    "settings": {"text_gen": {"partner_split": [0.0, 1.0, 0.0]}},
                },
            ],
        },
    )
    train_ranks(2, "--config", str(config), "--output", str(tmp_path / "run"))
    weights = {}
    for step in (3, 6):
        out = tmp_path / f"step{step}.safetensors"
        run_module(
            "opt_ds.export", "--checkpoint", str(tmp_path / "run" / "checkpoints" / tag_for(step)), "--out", str(out)
        )
        weights[step] = load_file(str(out))
    decoders = ("model.text_decoder.", "model.image_decoder.")
    kept = [k for k in weights[3] if k.startswith("model.") and not k.startswith(decoders)]
    assert len(kept) > 100 and any("running_mean" in k for k in kept)
    assert all(torch.equal(weights[3][k], weights[6][k]) for k in kept)
    for prefix in decoders:
        trained = [k for k in weights[3] if k.startswith(prefix)]
        assert sum(not torch.equal(weights[3][k], weights[6][k]) for k in trained) > len(trained) // 2, prefix
    tb = scalars(tmp_path / "run")
    assert tb["optim/lr/vision"][3] > 0 and tb["optim/lr/vision"][4] == tb["optim/lr/heads"][6] == 0.0
    assert tb["optim/lr/text_decoder"][4] == pytest.approx(1e-3, rel=1e-6)  # the stage's own peak, lr_scale 1
    assert tb["schedule/stage"][3] == 0 and tb["schedule/stage"][4] == 1


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero0_bf16", "zero2_bf16", "zero3_fp16"])
def test_shipped_deepspeed_configs_train(data, tmp_path, ds_config):
    """Every shipped config without offload (the offload ones need JIT-built optimizer ops) trains a few steps."""
    if ds_config.endswith("fp16"):
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            pytest.skip("DeepSpeed's accelerator here has no fp16 (its CPU path needs AVX512-FP16)")
    config = write_config(
        tmp_path / "c.yaml",
        data["triplets"],
        deepspeed=f"ds_configs/{ds_config}.json",
        schedule={"mode": "sum", "stages": [{"name": "all", "tasks": {"mlm": 1.0, "contrastive": 1.0}}]},
        train={"steps": 2, "save_every": 0},
    )
    train_ranks(1, "--config", str(config), "--output", str(tmp_path / "run"))
    tb = scalars(tmp_path / "run")
    assert sorted(tb["loss/total"]) == [1, 2] and all(v == v for v in tb["loss/total"].values())
    if ds_config.endswith("fp16"):
        assert tb["optim/loss_scale"][1] > 1  # dynamic loss scaling is on


def test_a_random_image_tokenizer_is_the_same_in_a_resumed_run():
    """'random' drew the VQ-VAE from the global RNG, which a resumed run has restored from its checkpoint: the
    resumed run learned other image codes than the uninterrupted one (losses 4% apart after a resume)."""
    from opt_ds.model.config import load_model_config
    from opt_ds.train.stages import load_image_tokenizer

    model_cfg = load_model_config("tiny")
    first = load_image_tokenizer("random", model_cfg, torch.device("cpu"), seed=0).state_dict()
    torch.manual_seed(1234)  # another RNG state, as a checkpoint restores
    again = load_image_tokenizer("random", model_cfg, torch.device("cpu"), seed=0).state_dict()
    assert all(torch.equal(first[name], again[name]) for name in first)
