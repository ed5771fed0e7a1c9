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
All three are scored by one rule (opt_ds.scoring: duplicate captions correct, ties missed) on the same
held-out samples: image<->text R@1/5/10, and for opt_ds every score of `opt_ds.evaluate`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from opt_ds.config import REPO_ROOT
from opt_ds.data import build_shards
from opt_ds.launch import free_port
from opt_ds.model.config import load_model_config

OPEN_CLIP_DIR = REPO_ROOT / ".cache" / "open_clip"
OPEN_CLIP_PACKAGES = ("open-clip-torch==3.3.0", "webdataset==0.2.86", "ftfy==6.3.1", "wcwidth==0.9.4", "pandas==3.1.1",
                      "python-dateutil==4.0.0", "pytz==2026.6", "tzdata==2026.6", "six==1.17.0")
PEER_MODEL = "opt_ds_tiny_peer"
OPEN_CLIP_VOCAB = 49408  # open_clip's BPE tokenizer
ROW_NAMES = {"open_clip": "open_clip", "contrastive": "opt_ds contrastive", "full": "opt_ds all tasks"}
DEMO_CONFIG = yaml.safe_load((REPO_ROOT / "opt_ds" / "configs" / "demo.yaml").read_text())
FULL_SCHEDULE = {"mode": "sum", "stages": [{"name": "all", "tasks": DEMO_CONFIG["schedule"]["stages"][-1]["tasks"]}]}

# open_clip side: train through its own CLI with a model config registered first; score with opt_ds.scoring
OPEN_CLIP_TRAIN = """
import sys, open_clip
open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
main(sys.argv[2:])
"""
OPEN_CLIP_SCORE = """
import io, json, sys, tarfile
from pathlib import Path
import torch, open_clip
from PIL import Image
from opt_ds.scoring import chance_recall, recall_at, same_caption
config_dir, checkpoint, shards, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
open_clip.add_model_config(config_dir)
model, _, preprocess = open_clip.create_model_and_transforms(sys.argv[5], pretrained=checkpoint)
tokenizer = open_clip.get_tokenizer(sys.argv[5])
samples = {}
for shard in sorted(Path(shards).glob("*.tar")):
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
pairs = [(s["jpg"], s["txt"].decode()) for s in samples.values() if "jpg" in s and "txt" in s][:limit]
model.eval()
with torch.no_grad():
    images = torch.stack([preprocess(Image.open(io.BytesIO(jpg)).convert("RGB")) for jpg, _ in pairs])
    image = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)
    text = torch.nn.functional.normalize(model.encode_text(tokenizer([t for _, t in pairs])).float(), dim=-1)
correct = same_caption([t for _, t in pairs])
ks = (1, 5, 10)
out = {"samples": len(pairs)}
for query, scores in (("image->text", image @ text.t()), ("text->image", text @ image.t())):
    out.update({f"{query}/R@{k}": v for k, v in recall_at(scores, correct, ks).items()})
out.update({f"chance_R@{k}": v for k, v in chance_recall(correct, ks).items()})
print(json.dumps(out))
"""


def ensure_open_clip() -> Path:
    """open_clip and its pins in their own folder (a PyPI install, once)."""
    if not (OPEN_CLIP_DIR / "open_clip").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(OPEN_CLIP_DIR),
                        *OPEN_CLIP_PACKAGES], check=True)
    return OPEN_CLIP_DIR


def peer_model_config(directory: Path, model_name: str, embed_dim: int) -> Path:
    """An open_clip model config with opt_ds's towers' sizes (the text tower keeps open_clip's BPE vocabulary)."""
    cfg = load_model_config(model_name)
    v, t = cfg.vision, cfg.text
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{PEER_MODEL}.json").write_text(json.dumps({
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.hidden, "layers": v.layers,
                       "head_width": v.hidden // v.heads, "mlp_ratio": v.mlp_ratio},
        "text_cfg": {"context_length": 32, "vocab_size": OPEN_CLIP_VOCAB, "width": t.hidden, "heads": t.heads, "layers": t.layers},
    }))
    return directory


def run_open_clip(workdir: Path, train: Path, eval_shards: Path, steps: int, batch: int, optim: dict,
                  samples: int, seed: int) -> dict:
    """open_clip trained for `steps` steps of `batch` (one resampled epoch), then scored by opt_ds's rule."""
    target = ensure_open_clip()
    config_dir = peer_model_config(workdir / "open_clip_configs", "tiny", load_model_config("tiny").contrastive_dim)
    shards = sorted(train.glob("*.tar"))
    pattern = f"{train}/shard-{{{shards[0].stem.split('-')[1]}..{shards[-1].stem.split('-')[1]}}}.tar"
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{REPO_ROOT}"}
    args = ["--train-data", pattern, "--dataset-type", "webdataset", "--dataset-resampled",
            "--train-num-samples", str(steps * batch), "--epochs", "1", "--batch-size", str(batch),
            "--model", PEER_MODEL, "--device", "cpu", "--precision", "amp_bf16", "--workers", "1",
            "--lr", str(optim["lr"]), "--wd", str(optim["weight_decay"]), "--warmup", str(optim["warmup_steps"]),
            "--beta1", str(optim["betas"][0]), "--beta2", str(optim["betas"][1]), "--eps", str(optim["eps"]),
            "--logs", str(workdir / "open_clip_logs"), "--name", f"peer_seed{seed}", "--save-frequency", "1",
            "--seed", str(seed),
            "--report-to", ""]
    started = time.perf_counter()
    with (workdir / f"open_clip_seed{seed}_train.log").open("w") as log:
        subprocess.run([sys.executable, "-c", OPEN_CLIP_TRAIN, str(config_dir), *args], check=True, env=env,
                       cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    train_seconds = time.perf_counter() - started
    checkpoint = workdir / "open_clip_logs" / f"peer_seed{seed}" / "checkpoints" / "epoch_1.pt"
    scored = subprocess.run([sys.executable, "-c", OPEN_CLIP_SCORE, str(config_dir), str(checkpoint), str(eval_shards),
                             str(samples), PEER_MODEL], check=True, env=env, capture_output=True, text=True)
    return json.loads(scored.stdout.strip().splitlines()[-1]) | {"train_seconds": train_seconds}


def run_opt_ds(workdir: Path, name: str, train: Path, eval_shards: Path, schedule: dict, steps: int, batch: int,
               optim: dict, samples: int, image_tokenizer: str | None, seed: int, ranks: int = 2) -> dict:
    """A real `opt_ds.train` run (ZeRO-3 bf16, `ranks` ranks), exported and scored by `opt_ds.evaluate`; `seed`
    sets the initial weights, the task draws and the data order."""
    from opt_ds.eval_generation import Decoding
    from opt_ds.evaluate import evaluate

    config = {"model": "tiny", "image_tokenizer": image_tokenizer, "schedule": schedule, "optim": optim,
              "data": {"sources": [{"name": "train", "shards": str(train)}],
                       "decode": {"image_size": 64, "max_audio_seconds": 2.0, "max_text_tokens": 24},
                       "reader": {"batch_size": batch // ranks, "num_workers": 1, "shuffle_buffer": 500, "seed": seed}},
              "train": {"steps": steps, "log_every": 10, "save_every": 0, "grad_clip": 0.0, "seed": seed}}
    run = f"{name}_seed{seed}"
    config_path, run_dir = workdir / f"{run}.yaml", workdir / run
    config_path.write_text(yaml.safe_dump(config))
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
           "--module", "opt_ds.train", "--config", str(config_path), "--output", str(run_dir), "--resume", "none"]
    started = time.perf_counter()
    with (workdir / f"{run}_train.log").open("w") as log:
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    train_seconds = time.perf_counter() - started
    weights = workdir / f"{run}.safetensors"
    subprocess.run([sys.executable, "-m", "opt_ds.export", "--checkpoint", str(run_dir / "checkpoints"),
                    "--out", str(weights)], check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    report = evaluate(str(weights), str(eval_shards), samples, workdir / f"{run}_eval", samples, Decoding())
    scores = {k.removeprefix("eval/"): v for k, v in report["scores"].items()}
    return scores | {"samples": report["samples"], "train_seconds": train_seconds}


def synthetic_image_text(workdir: Path, held_out: int) -> tuple[Path, Path]:
    """-> (training, held-out) synthetic image+text shards under workdir: 2000 and `held_out` samples, built once."""
    train, eval_shards = workdir / "train", workdir / "eval"
    for out, args in ((train, ["--num", "2000", "--seed", "0"]), (eval_shards, ["--num", str(held_out), "--seed", "7"])):
        if not (out / "sizes.json").is_file():
            build_shards.main(["synthetic", *args, "--modalities", "image,text", "--max-samples", "250",
                               "--out", str(out), "--quiet"])
    return train, eval_shards


def learning_report(workdir: Path, train: Path | None, eval_shards: Path | None, steps: int, batch: int,
                    samples: int, image_tokenizer: str | None, runs: list[str], seeds: list[int]) -> dict:
    """The runs side by side, each once per seed (rows: run -> one score dict per seed); synthetic image+text
    shards (open_clip's modalities) are built when none are given."""
    if "full" in runs and image_tokenizer is None:
        raise ValueError("bench learning: the full run needs --image-tokenizer (an exported VQ-VAE, e.g. the demo's)")
    workdir = workdir.resolve()  # open_clip runs inside it: paths given relative to here must still resolve
    workdir.mkdir(parents=True, exist_ok=True)
    if train is None or eval_shards is None:
        train, eval_shards = synthetic_image_text(workdir, samples)
    train, eval_shards = train.resolve(), eval_shards.resolve()
    optim = {"lr": 5e-4, "weight_decay": 0.1, "warmup_steps": 30, "betas": [0.9, 0.98], "eps": 1e-6, "min_lr_ratio": 0.0}
    contrastive = {"mode": "sample", "stages": [{"name": "all", "tasks": {"contrastive": 1.0}}]}

    def one_run(run: str, seed: int) -> dict:
        if run == "open_clip":
            return run_open_clip(workdir, train, eval_shards, steps, batch, optim, samples, seed)
        if run == "contrastive":
            return run_opt_ds(workdir, run, train, eval_shards, contrastive, steps, batch, optim, samples, None, seed)
        full_optim = optim | {"lr_scale": DEMO_CONFIG["optim"].get("lr_scale", {})}  # the demo's decoder rates
        return run_opt_ds(workdir, run, train, eval_shards, FULL_SCHEDULE, steps, batch, full_optim, samples,
                          image_tokenizer, seed)

    rows = {ROW_NAMES[run]: [one_run(run, seed) | {"seed": seed} for seed in seeds] for run in runs}
    return {"steps": steps, "global_batch": batch, "train": str(train), "eval": str(eval_shards), "optim": optim,
            "full_schedule": FULL_SCHEDULE, "seeds": seeds, "rows": rows}


def learning_table(report: dict) -> str:
    """Each score's mean over the seeds; R@1 also with its lowest and highest seed."""
    first = next(iter(report["rows"].values()))[0]
    lines = [f"{report['steps']} steps, global batch {report['global_batch']}, {first['samples']} held-out samples, "
             f"seeds {report['seeds']}; a duplicate caption counts as correct, a tie as a miss; R@1 as mean (lowest-highest)",
             "", "| run | text->image R@1 / R@5 / R@10 | image->text R@1 / R@5 / R@10 | captions from image: BLEU-4 / "
             "CIDEr / colour+shape | images from text: R@1 / colour | training s |", "|---|---|---|---|---|---|"]
    for name, per_seed in report["rows"].items():
        def get(key: str, digits: int = 3) -> str:
            values = [r[key] for r in per_seed if key in r]
            return f"{sum(values) / len(values):.{digits}f}" if values else "-"

        def recall(query: str) -> str:
            ones = [r[f"{query}/R@1"] for r in per_seed]
            spread = f" ({min(ones):.3f}-{max(ones):.3f})" if len(ones) > 1 else ""
            return f"{get(f'{query}/R@1')}{spread} / {get(f'{query}/R@5')} / {get(f'{query}/R@10')}"

        lines.append(f"| {name} | {recall('text->image')} | {recall('image->text')} | "
                     f"{get('captions_from_image/BLEU-4')} / {get('captions_from_image/CIDEr')} / "
                     f"{get('captions_from_image/colour_and_shape')} | {get('images_from_text/R@1')} / "
                     f"{get('images_from_text/colour')} | {get('train_seconds', 0)} |")
    chance = first.get("chance_R@1", first.get("text_image/chance_R@1"))
    lines.append(f"\nchance R@1 {chance:.3f}")
    return "\n".join(lines)
