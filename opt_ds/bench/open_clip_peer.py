"""The peer of `bench learning`: open_clip 3.3.0 trained through its own CLI on the same shards, with towers of
opt_ds's sizes, and scored by opt_ds's retrieval rule. open_clip is installed for this benchmark only, into
.cache/open_clip (pip --target: it pins webdataset <= 0.2.86, opt_ds runs 1.0.2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from opt_ds.config.experiment import REPO_ROOT
from opt_ds.model.config import load_model_config

OPEN_CLIP_DIR = REPO_ROOT / ".cache" / "open_clip"
OPEN_CLIP_PACKAGES = (
    "open-clip-torch==3.3.0",
    "webdataset==0.2.86",
    "ftfy==6.3.1",
    "wcwidth==0.9.4",
    "pandas==3.1.1",
    "python-dateutil==4.0.0",
    "pytz==2026.6",
    "tzdata==2026.6",
    "six==1.17.0",
)
PEER_MODEL = "opt_ds_tiny_peer"
OPEN_CLIP_VOCAB = 49408  # open_clip's BPE tokenizer

# open_clip side: train through its own CLI with a model config registered first; score with opt_ds.evaluate.scoring
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
from opt_ds.evaluate.scoring import chance_recall, recall_at, same_caption
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
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(OPEN_CLIP_DIR),
                *OPEN_CLIP_PACKAGES,
            ],
            check=True,
        )
    return OPEN_CLIP_DIR


def peer_model_config(directory: Path, model_name: str, embed_dim: int) -> Path:
    """An open_clip model config with opt_ds's towers' sizes (the text tower keeps open_clip's BPE vocabulary)."""
    cfg = load_model_config(model_name)
    v, t = cfg.vision, cfg.text
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{PEER_MODEL}.json").write_text(
        json.dumps(
            {
                "embed_dim": embed_dim,
                "vision_cfg": {
                    "image_size": v.image_size,
                    "patch_size": v.patch_size,
                    "width": v.hidden,
                    "layers": v.layers,
                    "head_width": v.hidden // v.heads,
                    "mlp_ratio": v.mlp_ratio,
                },
                "text_cfg": {
                    "context_length": 32,
                    "vocab_size": OPEN_CLIP_VOCAB,
                    "width": t.hidden,
                    "heads": t.heads,
                    "layers": t.layers,
                },
            }
        )
    )
    return directory


def run_open_clip(
    workdir: Path, train: Path, eval_shards: Path, steps: int, batch: int, optim: dict, samples: int, seed: int
) -> dict:
    """open_clip trained for `steps` steps of `batch` (one resampled epoch), then scored by opt_ds's rule."""
    target = ensure_open_clip()
    config_dir = peer_model_config(workdir / "open_clip_configs", "tiny", load_model_config("tiny").contrastive_dim)
    shards = sorted(train.glob("*.tar"))
    pattern = f"{train}/shard-{{{shards[0].stem.split('-')[1]}..{shards[-1].stem.split('-')[1]}}}.tar"
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{REPO_ROOT}"}
    args = [
        "--train-data",
        pattern,
        "--dataset-type",
        "webdataset",
        "--dataset-resampled",
        "--train-num-samples",
        str(steps * batch),
        "--epochs",
        "1",
        "--batch-size",
        str(batch),
        "--model",
        PEER_MODEL,
        "--device",
        "cpu",
        "--precision",
        "amp_bf16",
        "--workers",
        "1",
        "--lr",
        str(optim["lr"]),
        "--wd",
        str(optim["weight_decay"]),
        "--warmup",
        str(optim["warmup_steps"]),
        "--beta1",
        str(optim["betas"][0]),
        "--beta2",
        str(optim["betas"][1]),
        "--eps",
        str(optim["eps"]),
        "--logs",
        str(workdir / "open_clip_logs"),
        "--name",
        f"peer_seed{seed}",
        "--save-frequency",
        "1",
        "--seed",
        str(seed),
        "--report-to",
        "",
    ]
    started = time.perf_counter()
    with (workdir / f"open_clip_seed{seed}_train.log").open("w") as log:
        subprocess.run(
            [sys.executable, "-c", OPEN_CLIP_TRAIN, str(config_dir), *args],
            check=True,
            env=env,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    train_seconds = time.perf_counter() - started
    checkpoint = workdir / "open_clip_logs" / f"peer_seed{seed}" / "checkpoints" / "epoch_1.pt"
    scored = subprocess.run(
        [
            sys.executable,
            "-c",
            OPEN_CLIP_SCORE,
            str(config_dir),
            str(checkpoint),
            str(eval_shards),
            str(samples),
            PEER_MODEL,
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    return json.loads(scored.stdout.strip().splitlines()[-1]) | {"train_seconds": train_seconds}
